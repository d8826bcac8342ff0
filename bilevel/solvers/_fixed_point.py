"""Damped fixed-point (Picard / Krasnosel'skii-Mann) iteration ``x <- (1 - t) x + t fn(x)``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from .._errors import BilevelValueError
from .._result import SolverResult, Status
from .._tree import (
    default_tol,
    tree_detach,
    tree_dtype,
    tree_flatten,
    tree_map,
    tree_norm,
    tree_sub,
    tree_where,
)
from ._base import Solver, check_int, check_real, check_tol, finish_result, status_codes


@dataclasses.dataclass(frozen=True)
class FixedPointIteration(Solver):
    """Find ``x = fn(x, *args)`` by damped fixed-point iteration.

    Called as ``solver(fn, x0, *args, batched=False)`` where ``fn`` maps a tree to a tree
    of the same structure and shapes.  Iterates ``x <- (1 - damping) x + damping fn(x)``
    until the residual satisfies ``||fn(x) - x|| <= rtol * max(1, ||x||)`` (mixed
    absolute/relative test).  Converges for any contraction ``fn`` (Banach), and with
    ``damping < 1`` also for non-expansive maps (Krasnosel'skii-Mann).

    Statuses: ``SUCCESS`` (the returned ``x`` satisfies the test), ``MAX_ITERATIONS``,
    or ``NONFINITE`` when ``fn`` produced NaN/Inf — then the last iterate whose image
    ``fn(x)`` was finite (so that its residual is known) is returned.  Non-finite values
    are reported in the status rather than raised: a diverging fixed-point map is an
    expected outcome of a badly damped iteration, which the caller may retry.
    ``grad_norm`` holds the final residual norm ``||fn(x) - x||`` of the returned ``x``;
    ``value`` is ``None``; ``n_fun`` counts evaluations of ``fn``.  In batched mode every
    quantity is per task and a converged (or non-finite) task stops moving.

    Args:
        rtol: residual tolerance in (0, 1); ``None`` means
            :func:`bilevel._tree.default_tol` of the dtype of ``x0`` (float64 ~2e-12,
            float32 ~6e-6).  The residual is a difference of iterates, not of function
            values, so unlike the gradient tests of the minimisers it can reach
            ``eps**0.75`` for contractions that are not too close to 1.
        maxiter: maximum number of iterations (>= 0).
        damping: ``t`` in (0, 1].
    """

    rtol: float | None = None
    maxiter: int = 500
    damping: float = 1.0

    supports_batched: ClassVar[bool] = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_tol(name, self.rtol)
        check_int(name, "maxiter", self.maxiter, 0)
        check_real(name, "damping", self.damping, 0.0, 1.0, hi_open=False)

    def __call__(
        self, fn: Callable[..., Any], x0: Any, *args: Any, batched: bool = False
    ) -> SolverResult:
        self._check_batched(batched)
        name = type(self).__name__
        tol = self.rtol if self.rtol is not None else default_tol(tree_dtype(x0))
        _, treedef = tree_flatten(x0)
        t = self.damping

        def apply(x: Any) -> Any:
            with torch.no_grad():
                y = fn(x, *args)
            leaves, d = tree_flatten(y)
            if d != treedef:
                raise BilevelValueError(f"{name}: fn must return a tree shaped like x0 ({treedef!r}), got {d!r}")
            return tree_detach(y)

        x = tree_detach(x0)
        fx = apply(x)
        n_fun = 1
        res = tree_norm(tree_sub(fx, x), batched)
        xnorm = tree_norm(x, batched)
        nonfinite = ~torch.isfinite(res)
        converged = ~nonfinite & (res <= tol * torch.clamp(xnorm, min=1.0))
        iters = torch.zeros(res.shape, dtype=torch.long, device=res.device)

        for _ in range(self.maxiter):
            active = ~(converged | nonfinite)
            if not bool(active.any()):  # one host sync per iteration (the test)
                break
            if t == 1.0:
                x_new = fx
            else:
                x_new = tree_map(lambda xi, yi: xi + t * (yi - xi), x, fx)
            fx_new = apply(x_new)
            n_fun += 1
            res_new = tree_norm(tree_sub(fx_new, x_new), batched)
            bad = active & ~torch.isfinite(res_new)
            nonfinite = nonfinite | bad
            moved = active & ~bad  # a task whose new point is not finite keeps its last one
            x = tree_where(moved, x_new, x)
            fx = tree_where(moved, fx_new, fx)
            res = torch.where(moved, res_new, res)
            iters = iters + moved.long()
            xnorm = tree_norm(x, batched)
            converged = converged | (moved & (res <= tol * torch.clamp(xnorm, min=1.0)))

        codes = status_codes(res.shape, res.device, Status.MAX_ITERATIONS, SUCCESS=converged, NONFINITE=nonfinite)
        return finish_result(x, codes, iters, res, None, batched, n_fun=n_fun, n_grad=0)
