"""Adam (Kingma & Ba, 2015) as an inner solver."""

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
class Adam(BudgetedSolver):
    """Adam with bias correction (Kingma & Ba, "Adam: A Method for Stochastic
    Optimization", ICLR 2015, Algorithm 1)::

        m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        x <- x - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    Stopping and statuses follow :class:`GradientDescent`: a fixed budget ``steps=K`` runs
    K steps (``COMPLETED``); with a tolerance the run stops when
    ``||g|| <= max(rtol * max(1, ||g0||), atol)`` (``SUCCESS``) or after ``maxiter`` steps
    (``MAX_ITERATIONS``).  In batched mode the test is per task and a converged task stops
    moving (its moments and step counter freeze), so each task follows the iterates of its
    own unbatched solve.  Note that Adam's step does not shrink with the gradient (it is
    about ``lr`` per coordinate), so it only approaches a minimiser to within about
    ``lr``; a tight ``rtol`` needs a small ``lr``.  The cost and the ``monitor`` switch are
    those of :class:`GradientDescent` (the lean default: fused updates, no per-step norm,
    no host sync, no gradient at the returned point).

    Args:
        lr: step size (> 0).
        steps: the fixed budget (>= 0; default 100 when no tolerance is given).
        betas: ``(b1, b2)``, each in [0, 1).
        eps: denominator offset (> 0).
        rtol: optional gradient-norm tolerance in (0, 1).
        monitor: record per-step statistics without a tolerance (see :class:`GradientDescent`).
        check_minimum: report ``NOT_A_MINIMUM`` where the returned point has negative
            curvature (see :class:`GradientDescent`).
        compile: compile each step of the lean loop (see :class:`GradientDescent`).
        atol: optional absolute gradient-norm tolerance (>= 0).
        maxiter: the cap of a solve to a tolerance (default 100).

    Examples:
        >>> import torch
        >>> from bilevel.solvers import Adam
        >>> res = Adam(lr=0.1, rtol=1e-3, maxiter=2000)(lambda x: ((x - 1.0) ** 2).sum(), torch.zeros(3))
        >>> res.status.name
        'SUCCESS'
    """

    lr: float = 1e-3
    steps: int | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
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
        normalise_budget(self, 100)
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2):
            raise BilevelValueError(f"{name}: betas must be a pair (b1, b2), got {self.betas!r}")
        check_real(name, "betas[0]", self.betas[0], 0.0, 1.0, lo_open=False)
        check_real(name, "betas[1]", self.betas[1], 0.0, 1.0, lo_open=False)
        object.__setattr__(self, "betas", (float(self.betas[0]), float(self.betas[1])))
        check_real(name, "eps", self.eps, 0.0)
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
        tree_dtype(x0)  # validates the tree
        x = tree_detach(x0)
        if self.maxiter is None:  # a fixed budget (normalise_budget: maxiter only with a tolerance)
            return self._lean(objective, x, args, batched, name)
        return self._tracked(objective, x, args, batched, name)

    def _tracked(self, objective: Objective, x: Any, args: tuple, batched: bool, name: str) -> SolverResult:
        """The monitored path (see :meth:`GradientDescent._tracked`)."""
        b1, b2 = self.betas
        tracker, tally = GradientTracker.start(objective, x, args, self.rtol, name, batched, atol=self.atol)

        def step(state: tuple[Any, Any, Any], active: torch.Tensor) -> tuple[tuple[Any, Any, Any], Outcome]:
            x, m, v = state
            g, gnorm = tracker.g, tracker.gnorm
            t = (tally.iters + 1).to(gnorm.dtype)  # per-task step counter (frozen once converged)
            m = tree_where(active, tree_map(lambda mi, gi: b1 * mi + (1 - b1) * gi, m, g), m)
            v = tree_where(active, tree_map(lambda vi, gi: b2 * vi + (1 - b2) * gi * gi, v, g), v)
            c1 = 1 - b1**t
            c2 = 1 - b2**t
            lr = torch.where(active, torch.full_like(gnorm, self.lr), torch.zeros_like(gnorm))

            def update(xi: torch.Tensor, mi: torch.Tensor, vi: torch.Tensor) -> torch.Tensor:
                shape = (-1,) + (1,) * (xi.dim() - 1) if batched else ()
                s, a, b = lr.reshape(shape), c1.reshape(shape), c2.reshape(shape)
                return xi - s * (mi / a) / ((vi / b).sqrt() + self.eps)

            x = tree_map(update, x, m, v)
            return (x, m, v), tracker.advance(objective, x, args, active, batched)

        # With a tolerance: one host sync per step (the test); none without.
        zeros = tree_zeros_like(tracker.g)
        x, _, _ = iterate(step, (x, zeros, zeros), tally, maxiter=self._cap, fixed=self.maxiter is None)
        return tracker.result(x, tally, batched, name)

    def _lean(self, objective: Objective, x: Any, args: tuple, batched: bool, name: str) -> SolverResult:
        """``steps`` fused Adam updates of all leaves; nothing else (see :class:`GradientDescent`)."""
        b1, b2 = self.betas
        xl, xd = tree_flatten(x)
        loop = LeanLoop(x, args, health=self.monitor, batched=batched)
        m: list[torch.Tensor] = []
        v: list[torch.Tensor] = []

        def step(state: tuple[list[torch.Tensor], int], _: None) -> tuple[tuple[list[torch.Tensor], int], None]:
            xl, k = state
            g = loop.value_and_grad(objective, xd, xl, args, batched)
            if not m:
                m.extend(torch.zeros_like(t) for t in g)
                v.extend(torch.zeros_like(t) for t in g)
            torch._foreach_mul_(m, b1)
            torch._foreach_add_(m, g, alpha=1 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, g, g, value=1 - b2)
            t = k + 1  # every task takes every step: the bias corrections are plain floats
            c1, c2 = 1 - b1**t, 1 - b2**t
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, c2**0.5)
            torch._foreach_add_(denom, self.eps)
            return (list(torch._foreach_addcdiv(xl, m, denom, value=-self.lr / c1)), t), None  # out of place: x0 is never written

        if self.compile and not loop.transform:
            out = self._compiled(objective, x, args, batched, loop)
        else:
            out = tree_unflatten(xd, iterate(step, (xl, 0), None, maxiter=self._steps, fixed=True)[0])
            if self.monitor:  # the gradient at the returned point, for its norm and value
                loop.value_and_grad(objective, xd, tree_flatten(out)[0], args, batched)
        if loop.failed(out):  # replay, monitored: it names the first non-finite step and raises
            return self._tracked(objective, x, args, batched, name)
        return loop.result(out, self._steps, batched)

    def _compiled(self, objective: Objective, x: Any, args: tuple, batched: bool, loop: LeanLoop) -> Any:
        """The lean loop with each step one ``torch.compile``d function (``compile=``); with
        ``monitor=True`` see :meth:`GradientDescent._compiled`."""
        (b1, b2), lr, eps, monitor = self.betas, self.lr, self.eps, self.monitor

        def make(value_and_grad: Callable[..., Any]) -> Callable[..., Any]:
            # The bias corrections arrive as 0-d tensors: as Python numbers they would be
            # specialised into the graph, one recompilation per step.
            def step(x: Any, m: Any, v: Any, fsum: torch.Tensor, health: Any, c1: torch.Tensor, sqrt_c2: torch.Tensor,
                     *args: Any) -> tuple[Any, Any, Any, torch.Tensor, Any]:
                f, g = value_and_grad(x, *args)
                if monitor:
                    health = health_update(health, f, tree_flatten(g)[0], batched)
                m = tree_map(lambda mi, gi: b1 * mi + (1 - b1) * gi, m, g)
                v = tree_map(lambda vi, gi: b2 * vi + (1 - b2) * gi * gi, v, g)
                x = tree_map(lambda xi, mi, vi: xi - (lr / c1) * mi / (vi.sqrt() / sqrt_c2 + eps), x, m, v)
                return x, m, v, fsum + f, health

            return step

        fn = compiled_step(objective, self, batched, self.compile, make)
        leaf = tree_flatten(x)[0][0]

        def corrections(t: int) -> tuple[torch.Tensor, torch.Tensor]:
            return (torch.tensor(1 - b1**t, dtype=leaf.dtype, device=leaf.device),
                    torch.tensor((1 - b2**t) ** 0.5, dtype=leaf.dtype, device=leaf.device))

        def body(st: tuple[Any, Any, Any, torch.Tensor, Any, int], _: None) -> tuple[tuple[Any, Any, Any, torch.Tensor, Any, int], None]:
            x, m, v, fsum, health, k = st
            return (*fn(x, m, v, fsum, health, *corrections(k + 1), *args), k + 1), None

        zeros = tree_zeros_like(x)
        health = health_start(x, batched) if monitor else None
        x, m, v, fsum, health, _ = iterate(body, (x, zeros, zeros, value_sum_start(x, batched), health, 0), None,
                                           maxiter=self._steps, fixed=True)
        x = tree_map(torch.clone, x)  # a copy: see GradientDescent._compiled
        n_eval = self._steps
        if monitor:  # one more evaluation, at the returned point x (the step it would take is dropped)
            _, _, _, fsum, health = fn(x, m, v, fsum, health, *corrections(self._steps + 1), *args)
            health = health_copy(health)
            n_eval += 1
        loop.fsum, loop.n_eval, loop.health = fsum, n_eval, health
        return x
