"""Inner solvers: immutable configurations called as ``solver(objective, x0, *args)``.

See :mod:`bilevel.solvers._base` for the protocol (tensor trees, batched mode, results).

| solver                         | batched | derivatives used                                       |
|--------------------------------|---------|--------------------------------------------------------|
| :class:`GradientDescent`       | yes     | gradient                                               |
| :class:`Adam`                  | yes     | gradient                                               |
| :class:`LBFGS`                 | no      | gradient (strong Wolfe line search)                    |
| :class:`NewtonCG`              | yes     | gradient + Hessian-vector products (Armijo search)     |
| :class:`ScipyMinimize`         | no      | whatever the scipy method uses (none for Nelder-Mead)  |
| :class:`FixedPointIteration`   | yes     | none (solves ``x = fn(x)``)                            |
| :class:`Broyden`               | yes     | none (``x = fn(x)`` or ``F(x) = 0``, quasi-Newton)     |
| :class:`Anderson`              | yes     | none (solves ``x = fn(x)`` mixing the last m iterates) |

Examples:
    A fixed budget (``steps``) or a tolerance (``rtol``, capped by ``maxiter``), with the
    status saying which ended the solve:

    >>> import torch
    >>> from bilevel.solvers import GradientDescent
    >>> f = lambda x: ((x - 1.0) ** 2).sum()
    >>> GradientDescent(lr=0.1, steps=5)(f, torch.zeros(2)).status.name
    'COMPLETED'
    >>> res = GradientDescent(lr=0.1, rtol=1e-4, maxiter=500)(f, torch.zeros(2))
    >>> res.status.name, [round(v, 3) for v in res.x.tolist()]
    ('SUCCESS', [1.0, 1.0])
"""

from __future__ import annotations

from ._adam import Adam
from ._anderson import Anderson
from ._base import Solver
from ._broyden import Broyden
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
    "Anderson",
    "BacktrackingArmijo",
    "Broyden",
    "FixedPointIteration",
    "GradientDescent",
    "LineSearchResult",
    "NewtonCG",
    "ScipyMinimize",
    "Solver",
    "StrongWolfe",
]
