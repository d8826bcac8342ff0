"""The monitored path of the first-order solvers (gradient descent, Adam): per-task value,
gradient, convergence test and health statistics under the one driver."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from .._autodiff import Objective, value_and_grad
from .._errors import NonFiniteError
from .._iterate import Outcome, Tally
from .._result import SolverResult, Status, result_from_codes
from .._tree import tree_norm, tree_where
from ._checks import checked_grad_norm


@dataclasses.dataclass
class GradientTracker:
    """Per-task value, gradient and health statistics of a monitored first-order solver.

    It is the state that the steps of gradient descent and Adam share under the driver
    (:func:`bilevel._iterate.iterate`), which owns the stop masks and iteration counts in
    its :class:`~bilevel._iterate.Tally`.  With a tolerance a task converges once
    ``||g|| <= max(rtol * max(1, ||g0||), atol)`` and stops moving; without one every task
    runs all steps (the driver then makes no host sync).  The objective and gradient are evaluated
    once at ``x0`` and once after each step.

    Non-finite values after a step are recorded on the device (the first iteration per
    task) rather than tested on the host, and the failing task stops (``NONFINITE`` in the
    tally); :meth:`result` raises :class:`NonFiniteError` naming the first such iteration
    and the tasks.  The starting point is checked at once.

    Attributes:
        f: objective value(s) at the current iterate.
        g: gradient tree at the current iterate.
        gnorm: gradient norm(s).
        thresh: convergence threshold(s) on ``gnorm`` (0 without a tolerance).
        use_tol: whether a tolerance is in force.
        first_bad: per task, the first iteration with a non-finite value or gradient (-1: none).
        bad_value: per task, whether that was the objective value (else the gradient).
        gnorm0: gradient norm(s) at the starting point.
        monotone: per task, whether the gradient norm never rose between two steps.
        descent: per task, whether the objective never rose between two steps (beyond a
            relative 1e-6, rounding).
        n_eval: objective (= gradient) evaluations so far.
        k: steps taken so far (the iteration number of the next evaluation, minus one).
    """

    f: Tensor
    g: Any
    gnorm: Tensor
    thresh: Tensor
    use_tol: bool
    first_bad: Tensor
    bad_value: Tensor
    gnorm0: Tensor
    monotone: Tensor
    descent: Tensor
    n_eval: int = 1
    k: int = 0

    @classmethod
    def start(
        cls, objective: Objective, x: Any, args: tuple, rtol: float | None, solver: str, batched: bool,
        atol: float = 0.0,
    ) -> tuple[GradientTracker, Tally]:
        """Evaluate at the starting point ``x`` (iteration 0); the tracker and the driver's tally."""
        f, g = value_and_grad(objective, x, args, batched)
        gnorm = checked_grad_norm(f, g, 0, solver, batched)
        use_tol = rtol is not None or atol > 0
        thresh = torch.clamp((rtol if rtol is not None else 0.0) * torch.clamp(gnorm, min=1.0), min=atol)
        tally = Tally(gnorm, (Status.SUCCESS, Status.NONFINITE), {Status.SUCCESS: gnorm <= thresh} if use_tol else None)
        tracker = cls(
            f=f,
            g=g,
            gnorm=gnorm,
            thresh=thresh,
            use_tol=use_tol,
            first_bad=torch.full(gnorm.shape, -1, dtype=torch.long, device=gnorm.device),
            bad_value=torch.zeros(gnorm.shape, dtype=torch.bool, device=gnorm.device),
            gnorm0=gnorm,
            monotone=torch.ones(gnorm.shape, dtype=torch.bool, device=gnorm.device),
            descent=torch.ones(gnorm.shape, dtype=torch.bool, device=gnorm.device),
        )
        return tracker, tally

    def advance(self, objective: Objective, x: Any, args: tuple, active: Tensor, batched: bool) -> Outcome:
        """Record a step of the ``active`` tasks to ``x``: evaluate there and update the tasks that moved."""
        self.k += 1
        f_new, g_new = value_and_grad(objective, x, args, batched)
        self.n_eval += 1
        gn_new = tree_norm(g_new, batched)
        value_bad = ~torch.isfinite(f_new)
        bad = active & (value_bad | ~torch.isfinite(gn_new))
        newly = bad & (self.first_bad < 0)
        self.first_bad = torch.where(newly, torch.full_like(self.first_bad, self.k), self.first_bad)
        self.bad_value = torch.where(newly, value_bad, self.bad_value)
        moved = active & ~bad
        # On the device, no sync: the health statistic of a fixed-step loop.
        self.monotone = self.monotone & ~(moved & (gn_new > self.gnorm))
        self.descent = self.descent & ~(moved & (f_new > self.f + 1e-6 * self.f.abs()))
        self.f = torch.where(moved, f_new, self.f)
        self.g = tree_where(moved, g_new, self.g)
        self.gnorm = torch.where(moved, gn_new, self.gnorm)
        stopped = {Status.NONFINITE: bad}
        if self.use_tol:
            stopped[Status.SUCCESS] = moved & (self.gnorm <= self.thresh)
        return Outcome(moved=moved, stopped=stopped)

    def raise_if_nonfinite(self, solver: str) -> None:
        """Raise :class:`NonFiniteError` for the first non-finite iteration (one host sync)."""
        failed = self.first_bad >= 0
        if not bool(failed.any()):
            return
        first = int(self.first_bad[failed].min())
        what = "objective value" if bool(self.bad_value[failed & (self.first_bad == first)].any()) else "gradient"
        where = f" for task(s) {(failed & (self.first_bad == first)).nonzero().reshape(-1).tolist()}" if failed.dim() == 1 else ""
        raise NonFiniteError(f"{solver}: the {what} became non-finite at iteration {first}{where}")

    def result(self, x: Any, tally: Tally, batched: bool, solver: str = "solver") -> SolverResult:
        """``SUCCESS`` for converged tasks, else ``MAX_ITERATIONS`` (``COMPLETED`` without a tolerance).

        Raises:
            NonFiniteError: if a step produced a non-finite value or gradient.
        """
        self.raise_if_nonfinite(solver)
        default = Status.MAX_ITERATIONS if self.use_tol else Status.COMPLETED
        return result_from_codes(SolverResult, x, tally.codes(default), tally.iters, batched, grad_norm=self.gnorm,
                                 value=self.f, n_fun=self.n_eval, n_grad=self.n_eval, grad_norm_initial=self.gnorm0,
                                 grad_norm_monotone=self.monotone, value_monotone=self.descent)
