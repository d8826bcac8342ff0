"""Tolerances and finiteness checks of the inner solvers, and the minimum check of a result.

A solver never returns NaN silently: a non-finite value, gradient or Hessian-vector
product raises :class:`~bilevel.NonFiniteError` naming the iteration (and the tasks), or
becomes the ``NONFINITE`` status where the algorithm can stop a task there.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from .._autodiff import Objective
from .._curvature import has_negative_curvature
from .._errors import BilevelValueError, NonFiniteError
from .._result import SolverResult, Status, overall_status
from .._tree import TreeDef, tree_flatten, tree_norm, tree_size


def check_finite_value(v: Tensor, iteration: int, solver: str) -> None:
    """Raise :class:`NonFiniteError` naming the iteration (and tasks) if ``v`` is not finite."""
    bad = ~torch.isfinite(v)
    if bool(bad.any()):
        where = ""
        if v.dim() == 1:
            where = f" for task(s) {bad.nonzero().reshape(-1).tolist()}"
        raise NonFiniteError(f"{solver}: the objective value became non-finite at iteration {iteration}{where}")



def gradient_tol(dtype: torch.dtype) -> float:
    """Default tolerance on the gradient norm of the minimisers: ``eps**0.5`` of ``dtype``.

    float64: ~1.5e-8, float32: ~3.5e-4 (relative, as the solvers use it: ``||g|| <= rtol *
    max(1, ||g0||)``).  Not :func:`bilevel._tree.default_tol` (``eps**0.75``), which is not
    reliably reachable by line-search methods: near a minimiser a step decreases ``f`` by
    about ``||g||^2 / (2 L)``, which drops below the rounding of ``f`` once ``||g||`` is
    about ``sqrt(2 L eps |f|)`` -- ``eps**0.5`` at unit scale.  The rounding allowance of
    the line searches (module docstring) lets Newton-CG go further, but L-BFGS's curvature
    pairs ``(s, y)`` are then dominated by rounding too, and L-BFGS (ours, and equally
    scipy's L-BFGS-B and ``torch.optim.LBFGS``) stalls short of ``eps**0.75`` on an
    ill-conditioned quadratic.  ``eps**0.5`` is reached in all our test problems in float32
    and float64 and leaves implicit gradients accurate to about ``rtol / lambda_min(H)``;
    pass a smaller ``rtol`` explicitly for more (Newton-CG goes further).
    """
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    return float(eps**0.5)


def check_finite_grad(gnorm: Tensor, iteration: int, solver: str) -> None:
    """Raise :class:`NonFiniteError` if a gradient (norm) is NaN/Inf, naming the iteration."""
    bad = ~torch.isfinite(gnorm)
    if bool(bad.any()):
        where = f" for task(s) {bad.nonzero().reshape(-1).tolist()}" if gnorm.dim() == 1 else ""
        raise NonFiniteError(f"{solver}: the gradient became non-finite at iteration {iteration}{where}")


def checked_grad_norm(f: Tensor, g: Any, iteration: int, solver: str, batched: bool = False) -> Tensor:
    """The (per-task) norm of ``g``, after checking that value ``f`` and gradient are finite.

    Raises:
        NonFiniteError: naming the iteration (and tasks) where ``f`` or ``g`` is NaN/Inf.
    """
    check_finite_value(f, iteration, solver)
    gnorm = tree_norm(g, batched)
    check_finite_grad(gnorm, iteration, solver)
    return gnorm


#: Lanczos steps of the minimum check (``check_minimum=True``, and Newton-CG's final test).
MINIMUM_CHECK_ITERS = 10


def with_minimum_check(res: SolverResult, objective: Objective, args: tuple, batched: bool) -> SolverResult:
    """``res`` with the tasks whose returned point has negative curvature marked ``NOT_A_MINIMUM``
    (the ``check_minimum=True`` option of the first-order solvers; :func:`bilevel.hessian_extremes`)."""
    bad = has_negative_curvature(objective, res.x, args, batched, MINIMUM_CHECK_ITERS)
    flags = bad.reshape(-1).tolist()
    if not any(flags):
        return res
    steps = max(1, min(MINIMUM_CHECK_ITERS, tree_size(res.x, batched)))
    if batched and res.task_status is not None:
        statuses = tuple(Status.NOT_A_MINIMUM if f else st for f, st in zip(flags, res.task_status))
        return dataclasses.replace(res, task_status=statuses, status=overall_status(statuses), n_hvp=res.n_hvp + steps)
    return dataclasses.replace(res, status=Status.NOT_A_MINIMUM, n_hvp=res.n_hvp + steps)


def _layout(treedef: TreeDef, shapes: list[Any]) -> str:
    if repr(treedef) == "*":  # a single tensor
        return f"a tensor of shape {tuple(shapes[0])}"
    return f"{treedef!r} with shapes {[tuple(s) for s in shapes]}"


def leaves_like_x0(name: str, what: str, y: Any, treedef: TreeDef, shapes: list[Any]) -> list[Tensor]:
    """The leaves of ``y = fn(x, ...)``, checked to be shaped like ``x0`` (``treedef``,
    ``shapes``), with both layouts in the message when they are not -- one check for every
    fixed-point and root solver."""
    try:
        leaves, d = tree_flatten(y)
    except TypeError as e:
        raise BilevelValueError(f"{name}: {what} must return a tree shaped like x0 ({_layout(treedef, shapes)}), "
                                f"got {type(y).__name__}") from e
    if d != treedef or [t.shape for t in leaves] != list(shapes):
        raise BilevelValueError(
            f"{name}: {what} must return a tree shaped like x0 ({_layout(treedef, shapes)}), "
            f"got {_layout(d, [t.shape for t in leaves])}"
        )
    return leaves
