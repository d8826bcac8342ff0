"""bilevel: differentiable solutions of inner optimisation problems for PyTorch.

Implicit MAML (Rajeswaran, Finn, Kakade & Levine, NeurIPS 2019) as a general library:
any black-box inner solver, a backward pass by the implicit function theorem solved
matrix-free, memory independent of the number of inner steps.

Public API:

* layers — :class:`ImplicitLayer` (abstract), :class:`Argmin`, :class:`Proximal`,
  :class:`FixedPoint`, and the :func:`custom_root` decorator;
* :mod:`bilevel.linsolve` — CG, MINRES, GMRES, BiCGSTAB, Neumann, Dense;
* :mod:`bilevel.solvers` — GradientDescent, Adam, LBFGS, NewtonCG, ScipyMinimize, ...;
* :mod:`bilevel.testing` — hypothesis strategies and :func:`check_implicit_grad`;
* :mod:`bilevel.distributed` — meta-gradient averaging over a ``torch.distributed`` group;
* types — :data:`OnFailure`, :data:`HvpMode`, :data:`Batched` (``Literal`` modes) and
  the protocols :class:`InnerSolver` and :class:`LinearSolverLike` that any forward or
  backward solver satisfies (``bilevel/_types.py``);
* :mod:`bilevel.tree` — the tensor-tree helpers (per-task norms, relative errors, ...);
* :func:`hessian_extremes` — the extreme eigenvalues of an objective's Hessian (Lanczos, batched);
* :func:`time_alternatives` — the timing rule of ``batched="auto"``, for a program's own
  choices between equivalent computations;
* results and diagnostics — :class:`Status`, :class:`SolveResult` (the base of
  :class:`SolverResult` and :class:`LinearSolveResult`), :class:`Diagnostics`;
* errors and warnings (one module, ``bilevel/_errors.py``) — every exception derives from
  :class:`BilevelError` (and the matching built-in: ``ValueError``, ``TypeError``, ...):
  :class:`BilevelValueError`, :class:`BilevelTypeError`, :class:`UnsupportedError`,
  :class:`ConvergenceError`, :class:`NonFiniteError`, :class:`NotDifferentiableError`;
  every warning from :class:`BilevelWarning`: :class:`ConvergenceWarning`,
  :class:`ClosedOverTensorWarning`.

Examples:
    One implicit-MAML meta-gradient (Rajeswaran et al. 2019): adapt ``phi`` to a task from
    the meta-parameters ``theta`` by any inner solver, then differentiate the task's
    validation loss through ``phi*(theta)`` by the implicit function theorem, with memory
    independent of the number of inner steps:

    >>> import torch, bilevel
    >>> from bilevel.solvers import GradientDescent
    >>> x_train, x_val = torch.tensor([1.0, 2.0]), torch.tensor([1.5, 2.5])
    >>> layer = bilevel.Proximal(lambda phi, x: ((phi - x) ** 2).sum(), lam=1.0,
    ...                          solver=GradientDescent(lr=0.1, steps=100))
    >>> theta = torch.zeros(2, requires_grad=True)
    >>> phi = layer(theta, x_train)                      # phi* = (2 x + theta) / 3
    >>> ((phi - x_val) ** 2).sum().backward()           # the meta-gradient, into theta.grad
    >>> dphi_dtheta = 1 / 3                              # lam (H + lam I)^-1, H = 2 I
    >>> torch.allclose(theta.grad, dphi_dtheta * 2 * (phi.detach() - x_val))
    True
"""

from __future__ import annotations

from . import distributed, linsolve, solvers, tree
from ._argmin import Argmin
from ._curvature import hessian_extremes
from ._diagnostics import Diagnostics
from ._errors import (
    BilevelError,
    BilevelTypeError,
    BilevelValueError,
    BilevelWarning,
    ClosedOverTensorWarning,
    ConvergenceError,
    ConvergenceWarning,
    NonFiniteError,
    NotDifferentiableError,
    UnsupportedError,
)
from ._layer_base import ImplicitLayer
from ._proximal import Proximal
from ._result import LinearSolveResult, SolveResult, SolverResult, Status
from ._root_layers import FixedPoint, custom_root
from ._timing import time_alternatives
from ._types import Batched, HvpMode, InnerSolver, LinearSolverLike, OnFailure
from ._version import __version__ as __version__

__all__ = [
    "Argmin",
    "Batched",
    "BilevelError",
    "BilevelTypeError",
    "BilevelValueError",
    "BilevelWarning",
    "ClosedOverTensorWarning",
    "ConvergenceError",
    "ConvergenceWarning",
    "Diagnostics",
    "FixedPoint",
    "HvpMode",
    "ImplicitLayer",
    "InnerSolver",
    "LinearSolveResult",
    "LinearSolverLike",
    "NonFiniteError",
    "NotDifferentiableError",
    "OnFailure",
    "Proximal",
    "SolveResult",
    "SolverResult",
    "Status",
    "UnsupportedError",
    "custom_root",
    "distributed",
    "hessian_extremes",
    "linsolve",
    "solvers",
    "time_alternatives",
    "tree",
]
