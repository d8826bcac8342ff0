"""Damped fixed-point (Picard / Krasnosel'skii-Mann) iteration ``x <- (1 - t) x + t fn(x)``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._errors import BilevelValueError
from .._iterate import Outcome, Tally, iterate
from .._result import SolverResult, Status, solver_result
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
from .._validate import check_int, check_real, check_tol
from ._base import Solver


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
        counts = {"fun": 1}

        def converged(res: Tensor, x: Any) -> Tensor:
            return res <= tol * torch.clamp(tree_norm(x, batched), min=1.0)

        res = tree_norm(tree_sub(fx, x), batched)
        bad0 = ~torch.isfinite(res)
        tally = Tally(res, ("SUCCESS", "NONFINITE"), {"SUCCESS": ~bad0 & converged(res, x), "NONFINITE": bad0})

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
            return (x, fx, res), Outcome(moved=moved, stopped={"NONFINITE": bad, "SUCCESS": moved & converged(res, x)})

        # One host sync per iteration (the stopping test).
        x, _, res = iterate(step, (x, fx, res), tally, maxiter=self.maxiter)
        return solver_result(x, tally.codes(Status.MAX_ITERATIONS), tally.iters, res, None, batched, n_fun=counts["fun"], n_grad=0)
