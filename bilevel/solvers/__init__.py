"""Inner solvers: immutable configurations called as ``solver(objective, x0, *args)``.

See :mod:`bilevel.solvers._base` for the protocol (tensor trees, batched mode, results).

=========================  =======  ===================================================
solver                     batched  derivatives used
=========================  =======  ===================================================
:class:`GradientDescent`   yes      gradient
:class:`Adam`              yes      gradient
:class:`LBFGS`             no       gradient (strong Wolfe line search)
:class:`NewtonCG`          yes      gradient + Hessian-vector products (Armijo search)
:class:`ScipyMinimize`     no       whatever the scipy method uses (none for Nelder-Mead)
:class:`FixedPointIteration` yes    none (solves ``x = fn(x)``)
=========================  =======  ===================================================
"""

from __future__ import annotations

from ._adam import Adam
from ._base import Solver
from ._fixed_point import FixedPointIteration
from ._gradient_descent import GradientDescent
from ._lbfgs import LBFGS
from ._linesearch import BacktrackingArmijo, LineSearchResult, StrongWolfe
from ._newton_cg import NewtonCG
from ._scipy_minimize import SCIPY_METHODS, ScipyMinimize

__all__ = [
    "LBFGS",
    "SCIPY_METHODS",
    "Adam",
    "BacktrackingArmijo",
    "FixedPointIteration",
    "GradientDescent",
    "LineSearchResult",
    "NewtonCG",
    "ScipyMinimize",
    "Solver",
    "StrongWolfe",
]
