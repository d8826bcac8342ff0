"""Gradient descent with optional (Nesterov) momentum."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from .._autodiff import Objective
from .._errors import BilevelValueError
from .._iterate import Outcome, iterate
from .._result import SolverResult
from .._tree import (
    tree_axpy,
    tree_detach,
    tree_dtype,
    tree_flatten,
    tree_map,
    tree_unflatten,
    tree_where,
    tree_zeros_like,
)
from .._validate import check_bool, check_real, normalise_budget
from ._base import BudgetedSolver
from ._checks import with_minimum_check
from ._compiled import check_compile, compiled_step, value_sum_start
from ._lean import LeanLoop, health_copy, health_start, health_update
from ._tracker import GradientTracker


@dataclasses.dataclass(frozen=True)
class GradientDescent(BudgetedSolver):
    """Fixed-step gradient descent, the inner solver of first-order (i)MAML.

    Update (the PyTorch ``SGD`` convention for momentum ``mu``)::

        v <- mu * v + g;   x <- x - lr * (g + mu * v if nesterov else v)

    Two ways to say how long to run (docs/design.md §4): a fixed budget ``steps=K`` takes
    exactly K steps and reports ``COMPLETED``; a tolerance (``rtol`` and/or ``atol``) stops
    as soon as ``||g|| <= max(rtol * max(1, ||g0||), atol)`` (``g0``: the gradient at
    ``x0``) and reports ``SUCCESS``, or ``MAX_ITERATIONS`` after ``maxiter`` steps.  In
    batched mode that test is per task and a converged task stops moving (its momentum is
    frozen too), so each task follows exactly the iterates of its own unbatched solve.

    Cost.  With ``rtol=None`` and ``monitor=False`` (the default) a solve is the lean loop
    iMAML's inner problem needs: ``steps`` gradients, fused ``torch._foreach_*`` updates of
    all leaves, no norm, no copy and no host sync per step, and no gradient at the returned
    point (``n_fun = n_grad = steps``; ``grad_norm``, ``value`` and the health flags are
    ``None``).  With ``monitor=True`` (and no tolerance) the same loop also folds each
    gradient's norm and value into on-device health statistics and evaluates the gradient
    once more at the returned point, so that ``grad_norm``, ``value``,
    ``grad_norm_initial``, ``grad_norm_monotone`` and ``value_monotone`` describe the solve
    (``n_fun = n_grad = steps + 1``) -- still with no host sync inside the loop, and inside
    the compiled step with ``compile=``.  With a tolerance each step also tests convergence
    on the host (one sync per step) and records the same statistics.
    A NaN/Inf objective value or gradient raises :class:`~bilevel.NonFiniteError` naming
    the iteration and the tasks.  The lean loop only sums the values on the device (one
    kernel per step) and checks once, at the end; if anything was non-finite it replays the
    solve monitored, which finds and names the first bad step (a failing run costs twice).

    Args:
        lr: step size (> 0).
        steps: the fixed budget, exactly this many steps (>= 0; 0 returns ``x0``); only
            without a tolerance.
        momentum: heavy-ball coefficient in [0, 1).
        nesterov: use Nesterov's look-ahead form (needs ``momentum > 0``).
        rtol: optional relative tolerance in (0, 1) on the gradient norm (see above).
        monitor: record the statistics above without a tolerance (costs one norm per step
            and one extra gradient, no host sync; compatible with ``compile``).
        check_minimum: after the solve, test the Hessian at the returned point for negative
            curvature (10 Lanczos steps) and report ``NOT_A_MINIMUM`` where it has some: a
            zero gradient does not tell a minimum from a saddle or a maximum.
        compile: ``True`` or a ``torch.compile`` mode (e.g. ``"reduce-overhead"``, which
            replays the step as a CUDA graph on a GPU): run each step of the fixed-step loop
            as one compiled function (gradient, update, the running value sum and, with
            ``monitor=True``, the health statistics).  Only with a fixed budget
            (``steps=``: a tolerance is a host-side test per step).  The first solve compiles (seconds
            to a minute); later solves with the same objective reuse it -- the layers keep
            their objective functions stable across calls.  Inside a ``torch.func``
            transform the step runs eagerly.  Measured in ``benchmarks/small_problem.py``
            (docs/performance.md).
        atol: optional absolute tolerance (>= 0) on the gradient norm.
        maxiter: the cap of a solve to a tolerance (>= 0); required with ``rtol``/``atol``.

    Examples:
        >>> import torch
        >>> from bilevel.solvers import GradientDescent
        >>> res = GradientDescent(lr=0.5, steps=20)(lambda x: ((x - 3.0) ** 2).sum(), torch.zeros(2))
        >>> res.status.name, [round(v, 4) for v in res.x.tolist()]
        ('COMPLETED', [3.0, 3.0])
    """

    lr: float
    steps: int | None = None
    momentum: float = 0.0
    nesterov: bool = False
    rtol: float | None = None
    monitor: bool = False
    check_minimum: bool = False
    compile: bool | str = False
    atol: float = 0.0
    maxiter: int | None = None

    supports_batched: ClassVar[bool] = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_real(name, "lr", self.lr, 0.0)
        normalise_budget(self, None)
        check_real(name, "momentum", self.momentum, 0.0, 1.0, lo_open=False)
        check_bool(name, "nesterov", self.nesterov)
        if self.nesterov and self.momentum == 0:
            raise BilevelValueError(f"{name}: nesterov=True needs momentum > 0")
        check_bool(name, "monitor", self.monitor)
        check_bool(name, "check_minimum", self.check_minimum)
        check_compile(name, self.compile, self.rtol is not None or self.atol > 0)

    @property
    def traceable(self) -> bool:
        """A fixed budget without ``check_minimum`` (a Lanczos test read on the host) traces."""
        return self.maxiter is None and not self.check_minimum

    def __call__(self, objective: Objective, x0: Any, *args: Any, batched: bool = False) -> SolverResult:
        res = self._run(objective, x0, *args, batched=batched)
        return with_minimum_check(res, objective, args, batched) if self.check_minimum else res

    def _run(self, objective: Objective, x0: Any, *args: Any, batched: bool = False) -> SolverResult:
        self._check_batched(batched)
        name = type(self).__name__
        tree_dtype(x0)  # validates the tree (raises on a non-tensor leaf or an empty tree)
        x = tree_detach(x0)
        if self.maxiter is None:  # a fixed budget (normalise_budget: maxiter only with a tolerance)
            return self._lean(objective, x, args, batched, name)
        return self._tracked(objective, x, args, batched, name)

    def _tracked(self, objective: Objective, x: Any, args: tuple, batched: bool, name: str) -> SolverResult:
        """The monitored path (a tolerance, or the replay of a non-finite lean solve): each
        task stops at its own convergence or first non-finite step, which is named."""
        tracker, tally = GradientTracker.start(objective, x, args, self.rtol, name, batched, atol=self.atol)
        mu, nesterov = self.momentum, self.nesterov

        def step(state: tuple[Any, Any], active: torch.Tensor) -> tuple[tuple[Any, Any], Outcome]:
            x, vel = state
            g = tracker.g
            if vel is not None:
                vel = tree_where(active, tree_axpy(mu, vel, g), vel)
                upd = tree_axpy(mu, vel, g) if nesterov else vel
            else:
                upd = g
            # Converged tasks take a zero step: they stay exactly where they converged.
            lr = torch.where(active, torch.full_like(tracker.gnorm, self.lr), torch.zeros_like(tracker.gnorm))
            x = tree_axpy(-lr, upd, x, batched)
            return (x, vel), tracker.advance(objective, x, args, active, batched)

        # With a tolerance: one host sync per step (the test); none without.
        x, _ = iterate(step, (x, tree_zeros_like(tracker.g) if mu > 0 else None), tally,
                       maxiter=self._cap, fixed=self.maxiter is None)
        return tracker.result(x, tally, batched, name)

    def _lean(self, objective: Objective, x: Any, args: tuple, batched: bool, name: str) -> SolverResult:
        """``steps`` fused updates of all leaves; nothing else but, with ``monitor=True``, the
        on-device health statistics and one gradient at the returned point (see the class docstring)."""
        xl, xd = tree_flatten(x)
        loop = LeanLoop(x, args, health=self.monitor, batched=batched)
        vel: list[torch.Tensor] | None = None
        mu, lr = self.momentum, self.lr

        def step(xl: list[torch.Tensor], _: None) -> tuple[list[torch.Tensor], None]:
            nonlocal vel
            g = loop.value_and_grad(objective, xd, xl, args, batched)
            if mu > 0:
                if vel is None:
                    vel = [t.clone() for t in g]  # v_1 = g_0 (PyTorch SGD's first step)
                else:
                    torch._foreach_mul_(vel, mu)
                    torch._foreach_add_(vel, g)
                upd = torch._foreach_add(g, vel, alpha=mu) if self.nesterov else vel
            else:
                upd = g
            return list(torch._foreach_add(xl, upd, alpha=-lr)), None  # out of place: x0 is never written

        if self.compile and not loop.transform:
            out = self._compiled(objective, x, args, batched, loop)
        else:
            out = tree_unflatten(xd, iterate(step, xl, None, maxiter=self._steps, fixed=True))
            if self.monitor:  # the gradient at the returned point, for its norm and value
                loop.value_and_grad(objective, xd, tree_flatten(out)[0], args, batched)
        if loop.failed(out):  # replay, monitored: it names the first non-finite step and raises
            return self._tracked(objective, x, args, batched, name)
        return loop.result(out, self._steps, batched)

    def _compiled(self, objective: Objective, x: Any, args: tuple, batched: bool, loop: LeanLoop) -> Any:
        """The lean loop with each step one ``torch.compile``d function (``compile=``); with
        ``monitor=True`` the step also folds its gradient into the health statistics, and
        one more call evaluates the returned point (its update is discarded)."""
        mu, lr, nesterov, monitor = self.momentum, self.lr, self.nesterov, self.monitor

        def make(value_and_grad: Callable[..., Any]) -> Callable[..., Any]:
            def step(x: Any, vel: Any, fsum: torch.Tensor, health: Any, *args: Any) -> tuple[Any, Any, torch.Tensor, Any]:
                v, g = value_and_grad(x, *args)
                if monitor:
                    health = health_update(health, v, tree_flatten(g)[0], batched)
                if mu > 0:
                    vel = tree_map(lambda vi, gi: mu * vi + gi, vel, g)  # v_1 = g_0 from v_0 = 0
                    upd = tree_map(lambda gi, vi: gi + mu * vi, g, vel) if nesterov else vel
                else:
                    upd = g
                return tree_map(lambda xi, ui: xi - lr * ui, x, upd), vel, fsum + v, health

            return step

        fn = compiled_step(objective, self, batched, self.compile, make)
        health = health_start(x, batched) if monitor else None
        state = (x, tree_zeros_like(x) if mu > 0 else None, value_sum_start(x, batched), health)
        x, vel, fsum, health = iterate(lambda st, _: (fn(*st, *args), None), state, None, maxiter=self._steps, fixed=True)
        # Copies: with mode="reduce-overhead" the outputs live in a CUDA graph's static
        # buffers, which the next call (the evaluation below, or the next solve) overwrites.
        x = tree_map(torch.clone, x)
        n_eval = self._steps
        if monitor:  # one more evaluation, at the returned point x (the step it would take is dropped)
            _, _, fsum, health = fn(x, vel, fsum, health, *args)
            health = health_copy(health)
            n_eval += 1
        loop.fsum, loop.n_eval, loop.health = fsum, n_eval, health
        return x
