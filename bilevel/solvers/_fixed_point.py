"""Damped fixed-point (Picard / Krasnosel'skii-Mann) iteration ``x <- (1 - t) x + t fn(x)``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._errors import BilevelValueError
from .._iterate import History, Outcome, Tally, iterate
from .._result import SolverResult, Status, result_from_codes
from .._tree import (
    default_tol,
    tree_detach,
    tree_dtype,
    tree_flatten,
    tree_map,
    tree_norm,
    tree_sub,
    tree_unflatten,
    tree_where,
)
from .._validate import check_int, check_real, check_tol, warn_renamed
from ._base import Solver
from ._checks import leaves_like_x0


@dataclasses.dataclass(frozen=True)
class FixedPointIteration(Solver):
    """Find ``x = fn(x, *args)`` by relaxed (Krasnosel'skii-Mann) fixed-point iteration.

    Called as ``solver(fn, x0, *args, batched=False)`` where ``fn`` maps a tree to a tree
    of the same structure and shapes.  Iterates ``x <- (1 - t) x + t fn(x)`` (``t``:
    ``relaxation``) until the residual satisfies
    ``||fn(x) - x|| <= max(rtol * max(1, ||x||), atol)``.  Converges for any contraction
    ``fn`` (Banach), and with ``t < 1`` also for non-expansive maps (Krasnosel'skii-Mann).

    Statuses: ``SUCCESS`` (the returned ``x`` satisfies the test), ``MAX_ITERATIONS``,
    or ``NONFINITE`` when ``fn`` produced NaN/Inf — then the last iterate whose image
    ``fn(x)`` was finite (so that its residual is known) is returned.  Non-finite values
    are reported in the status rather than raised: a diverging fixed-point map is an
    expected outcome of a badly relaxed iteration, which the caller may retry.
    ``grad_norm`` holds the final residual norm ``||fn(x) - x||`` of the returned ``x``;
    ``value`` is ``None``; ``n_fun`` counts evaluations of ``fn``.  In batched mode every
    quantity is per task and a converged (or non-finite) task stops moving.

    Args:
        rtol: residual tolerance in (0, 1); ``None`` means
            :func:`bilevel._tree.default_tol` of the dtype of ``x0`` (float64 ~2e-12,
            float32 ~6e-6).  The residual is a difference of iterates, not of function
            values, so unlike the gradient tests of the minimisers it can reach
            ``eps**0.75`` for contractions that are not too close to 1.
        maxiter: the cap on iterations (>= 0).
        damping: deprecated name of ``relaxation`` (``damping`` is the Tikhonov shift of the
            backward system elsewhere in the library).
        relaxation: ``t`` in (0, 1] (1: plain iteration ``x <- fn(x)``).
        atol: absolute residual tolerance (>= 0, default 0).

    Examples:
        >>> import torch
        >>> from bilevel.solvers import FixedPointIteration
        >>> res = FixedPointIteration(rtol=1e-10)(lambda x: 0.5 * x + 1.0, torch.zeros(2, dtype=torch.float64))
        >>> res.status.name, [round(v, 6) for v in res.x.tolist()]
        ('SUCCESS', [2.0, 2.0])
    """

    rtol: float | None = None
    maxiter: int = 500
    damping: float | None = None
    relaxation: float = 1.0
    atol: float = 0.0

    supports_batched: ClassVar[bool] = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_tol(name, self.rtol)
        check_int(name, "maxiter", self.maxiter, 0)
        if self.damping is not None:
            if self.relaxation != 1.0:
                raise BilevelValueError(f"{name}: give relaxation or the deprecated damping, not both")
            warn_renamed(name, "damping (a relaxation factor here)", "relaxation")
            object.__setattr__(self, "relaxation", self.damping)
            object.__setattr__(self, "damping", None)
        check_real(name, "relaxation", self.relaxation, 0.0, 1.0, hi_open=False)
        check_real(name, "atol", self.atol, 0.0, lo_open=False)

    def __call__(
        self, fn: Callable[..., Any], x0: Any, *args: Any, batched: bool = False
    ) -> SolverResult:
        self._check_batched(batched)
        name = type(self).__name__
        tol = self.rtol if self.rtol is not None else default_tol(tree_dtype(x0))
        leaves0, treedef = tree_flatten(x0)
        shapes, dtypes = [x.shape for x in leaves0], [x.dtype for x in leaves0]
        single = isinstance(x0, Tensor)
        t = self.relaxation

        def apply(x: Any) -> Any:
            with torch.no_grad():
                y = fn(x, *args)
            if single and isinstance(y, Tensor) and y.shape == shapes[0] and y.dtype == dtypes[0]:
                return y.detach()  # the usual case, checked in one comparison per iteration
            leaves = leaves_like_x0(name, "fn", y, treedef, shapes)
            # The iterate keeps x0's dtypes, as Anderson and Broyden do (an autocast fn or a
            # float64 argument may return another precision).
            return tree_unflatten(treedef, [y_.detach().to(dt) for y_, dt in zip(leaves, dtypes)])

        x = tree_detach(x0)
        fx = apply(x)
        counts = {"fun": 1}

        def converged(res: Tensor, x: Any) -> Tensor:
            return res <= torch.clamp(tol * torch.clamp(tree_norm(x, batched), min=1.0), min=self.atol)

        res = tree_norm(tree_sub(fx, x), batched)
        bad0 = ~torch.isfinite(res)
        tally = Tally(res, (Status.SUCCESS, Status.NONFINITE), {Status.SUCCESS: ~bad0 & converged(res, x), Status.NONFINITE: bad0})

        def step(st: tuple[Any, Any, Tensor], active: Tensor) -> tuple[tuple[Any, Any, Tensor], Outcome]:
            x, fx, res = st
            x_new = fx if t == 1.0 else tree_map(lambda xi, yi: xi + t * (yi - xi), x, fx)
            fx_new = apply(x_new)
            counts["fun"] += 1
            res_new = tree_norm(tree_sub(fx_new, x_new), batched)
            bad = active & ~torch.isfinite(res_new)
            moved = active & ~bad  # a task whose new point is not finite keeps its last one
            x = tree_where(moved, x_new, x)
            fx = tree_where(moved, fx_new, fx)
            res = torch.where(moved, res_new, res)
            return (x, fx, res), Outcome(moved=moved, stopped={Status.NONFINITE: bad, Status.SUCCESS: moved & converged(res, x)})

        history = History(res)
        # One host sync per iteration (the stopping test).
        x, _, res = iterate(history.recording(step, lambda st: st[2]), (x, fx, res), tally, maxiter=self.maxiter)
        return result_from_codes(SolverResult, x, tally.codes(Status.MAX_ITERATIONS), tally.iters, batched,
                                 grad_norm=res, n_fun=counts["fun"], n_grad=0, residual_history=history.tensor(batched))
