"""Matrix-free linear solvers for the implicit-function-theorem systems.

Each solver is an immutable configuration, called as ``solver(matvec, b, x0=None,
batched=False)`` on tensor trees, returning a :class:`~bilevel.LinearSolveResult`
(``.x``, ``.status``, ``.iterations``, ``.residual_norm``).

==============  ==========================================  ===============================
solver          operators                                   typical use
==============  ==========================================  ===============================
``CG``          symmetric positive definite                 Argmin / Proximal (default)
``MINRES``      symmetric, possibly indefinite              non-convex inner problems
``GMRES``       any (non-symmetric)                         FixedPoint, custom roots
``BiCGSTAB``    any (non-symmetric)                         FixedPoint, custom roots
``Neumann``     ``||I - alpha A|| < 1``                       cheap truncated series
``Dense``       any (materialised; small problems, tests)   references
==============  ==========================================  ===============================
"""

from __future__ import annotations

from ._base import LinearSolver, MatVec
from ._bicgstab import BiCGSTAB
from ._cg import CG
from ._dense import Dense
from ._gmres import GMRES
from ._minres import MINRES
from ._neumann import Neumann

__all__ = ["CG", "GMRES", "MINRES", "BiCGSTAB", "Dense", "LinearSolver", "MatVec", "Neumann"]
