"""Matrix-free linear solvers for the implicit-function-theorem systems.

Each solver is an immutable configuration, called as ``solver(matvec, b, x0=None,
batched=False)`` on tensor trees, returning a :class:`~bilevel.LinearSolveResult`
(``.x``, ``.status``, ``.iterations``, ``.residual_norm``).

| solver            | operators                                  | typical use                  |
|-------------------|--------------------------------------------|------------------------------|
| :class:`CG`       | symmetric positive definite                | Argmin / Proximal (default)  |
| :class:`MINRES`   | symmetric, possibly indefinite             | non-convex inner problems    |
| :class:`GMRES`    | any (non-symmetric)                        | FixedPoint, custom roots     |
| :class:`BiCGSTAB` | any (non-symmetric)                        | FixedPoint, custom roots     |
| :class:`Broyden`  | any; best near the identity (``I - J``)    | FixedPoint (quasi-Newton)    |
| :class:`Neumann`  | spectral radius of ``I - alpha A`` below 1 | cheap truncated series       |
| :class:`Dense`    | any (materialised; small problems, tests)  | references                   |

Examples:
    The backward of a layer solves its adjoint system with one of them (``CG`` for an
    argmin by default); any of them can be called directly:

    >>> import torch, bilevel
    >>> from bilevel.linsolve import CG, MINRES
    >>> layer = bilevel.Argmin(lambda x, a: ((x - a) ** 2).sum(), linsolve=MINRES())
    >>> res = CG()(lambda v: 2.0 * v, torch.ones(3))
    >>> res.x, res.status.name
    (tensor([0.5000, 0.5000, 0.5000]), 'SUCCESS')
"""

from __future__ import annotations

from ._base import LinearSolver, MatVec
from ._bicgstab import BiCGSTAB
from ._broyden import Broyden
from ._cg import CG
from ._dense import Dense
from ._gmres import GMRES
from ._minres import MINRES
from ._neumann import Neumann

__all__ = ["CG", "GMRES", "MINRES", "BiCGSTAB", "Broyden", "Dense", "LinearSolver", "MatVec", "Neumann"]
