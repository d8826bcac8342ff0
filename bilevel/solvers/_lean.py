"""The lean path of the fixed-step first-order solvers: no tolerance, no host sync in the loop."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._autodiff import (
    Objective,
    inside_transform,
    value_and_grad,
    value_and_grad_leaves,
)
from .._result import SolverResult, Status, code, result_from_codes
from .._traced import tracing
from .._tree import tree_flatten, tree_norm, tree_unflatten

Health = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def health_start(x: Any, batched: bool) -> Health:
    """The state of the on-device health statistics before the first gradient:
    ``(f_prev, gnorm_prev, gnorm0, monotone, descent)``, each 0-d or ``(B,)``.

    ``f_prev`` and ``gnorm_prev`` start at +inf (nothing to compare the first step with)
    and ``gnorm0`` at -1 ("not seen yet"), so that one pure update, :func:`health_update`,
    serves every step -- the same function in the eager loop and traced into a compiled step.
    """
    leaf = tree_flatten(x)[0][0]
    shape = leaf.shape[:1] if batched else ()
    inf = torch.full(shape, float("inf"), dtype=leaf.dtype, device=leaf.device)
    true = torch.ones(shape, dtype=torch.bool, device=leaf.device)
    return inf, inf, -torch.ones_like(inf), true, true


def health_update(state: Health, f: Tensor, g_leaves: list[Tensor], batched: bool) -> Health:
    """Fold the value(s) ``f`` and gradient ``g`` at the next iterate into the health state.

    The same comparisons as :class:`GradientTracker` (the monitored path): the gradient
    norm never rose between consecutive iterates (``monotone``), the objective never rose
    beyond a relative 1e-6 (``descent``).  Pure tensor code, no host read: it runs inside a
    fixed-step loop without a sync and can be traced by ``torch.compile``.
    """
    f_prev, gn_prev, gn0, mono, desc = state
    gn = tree_norm(g_leaves, batched)  # the norm GradientTracker takes
    f = f.to(gn.dtype)
    # f_prev = +inf on the first evaluation: inf + 1e-6 * inf = inf, so nothing counts as a rise.
    rise = f > f_prev + 1e-6 * f_prev.abs()
    return f, gn, torch.where(gn0 < 0, gn, gn0), mono & ~(gn > gn_prev), desc & ~rise


def health_copy(state: Health) -> Health:
    """A copy of the health state: a compiled step's outputs may live in buffers that its
    next call overwrites (CUDA graphs)."""
    f, gn, gn0, mono, desc = state
    return f.clone(), gn.clone(), gn0.clone(), mono.clone(), desc.clone()


class LeanLoop:
    """Bookkeeping of a fixed-step loop that must cost nothing beyond its gradients.

    Per step it adds the objective value(s) into one running sum on the device (one
    kernel; a NaN or Inf anywhere stays non-finite in the sum).  A NaN/Inf gradient at
    step ``k`` makes the iterate, hence the value at step ``k + 1`` or the returned point,
    non-finite.  :meth:`failed` makes the one host sync of the solve; only then does the
    solver replay the (deterministic) solve through the monitored path, which stops at the
    first non-finite value or gradient and raises :class:`NonFiniteError` naming the
    iteration and the tasks -- so a run that goes wrong costs twice, and a run that goes
    right costs nothing extra.  (The sum can overflow on values near the dtype's maximum:
    the replay then finds nothing wrong and its result is returned.)

    With ``health=True`` (a solver's ``monitor=True`` without a tolerance) each gradient
    also updates the on-device health statistics (:func:`health_update`: one norm per
    step), and the solver evaluates once more at the returned point, so that the result
    carries ``grad_norm``, ``value``, ``grad_norm_initial``, ``grad_norm_monotone`` and
    ``value_monotone`` exactly as the monitored path defines them -- still without a host
    sync inside the loop, and inside a compiled step if the solver compiles.
    """

    def __init__(self, x: Any, args: tuple, health: bool = False, batched: bool = False) -> None:
        # torch.func primitives inside a transform and while dynamo traces (it does not
        # trace torch.autograd.grad); checked once per solve, not per step.
        self.tracing = tracing()
        self.transform = self.tracing or inside_transform(x, args)
        self.fsum: Tensor | None = None
        self.n_eval = 0
        self.health: Health | None = health_start(x, batched) if health else None

    def value_and_grad(self, objective: Objective, treedef: Any, leaves: list[Tensor], args: tuple, batched: bool) -> list[Tensor]:
        """The gradient leaves at the point with these leaves; the value only joins the
        running sum (and the health statistics)."""
        if self.transform:
            f, g = value_and_grad(objective, tree_unflatten(treedef, leaves), args, batched, True)
            gl = tree_flatten(g)[0]
        else:
            f, gl = value_and_grad_leaves(objective, treedef, leaves, args, batched)
        self.n_eval += 1
        self.fsum = f if self.fsum is None else self.fsum + f
        if self.health is not None:
            self.health = health_update(self.health, f, gl, batched)
        return gl

    def failed(self, x: Any) -> bool:
        """Whether a value, the last gradient norm or the returned iterate is non-finite (the one host sync).

        Never while dynamo traces: a graph cannot branch on a value, and a NaN/Inf then
        propagates into the returned point instead of being named (:mod:`bilevel._traced`)."""
        if self.tracing:
            return False
        checks = [torch.isfinite(t).all() for t in tree_flatten(x)[0]]
        if self.fsum is not None:
            checks.append(torch.isfinite(self.fsum).all())
        if self.health is not None:
            checks.append(torch.isfinite(self.health[1]).all())
        return not bool(torch.stack(checks).all())

    def result(self, x: Any, steps: int, batched: bool) -> SolverResult:
        """``COMPLETED`` after ``steps`` steps, with the health statistics if they were kept."""
        leaves = tree_flatten(x)[0]
        n = leaves[0].shape[0] if batched else 1
        iters = torch.full((n,), steps, dtype=torch.long, device=leaves[0].device)
        stats: dict[str, Any] = {"n_fun": self.n_eval, "n_grad": self.n_eval}
        if self.health is not None:
            f, gn, gn0, mono, desc = self.health
            stats.update(grad_norm=gn, value=f, grad_norm_initial=gn0, grad_norm_monotone=mono, value_monotone=desc)
        if self.tracing:  # every task COMPLETED, known without reading a value (a graph cannot)
            if batched:
                return SolverResult(x=x, status=Status.COMPLETED, iterations=steps, task_status=(Status.COMPLETED,) * n,
                                    task_iterations=iters, **stats)
            return SolverResult(x=x, status=Status.COMPLETED, iterations=steps, **stats)
        codes = torch.full((n,), code(Status.COMPLETED), dtype=torch.long, device=leaves[0].device)
        return result_from_codes(SolverResult, x, codes, iters, batched, **stats)
