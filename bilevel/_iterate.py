"""One iterative driver (init / step / terminate) shared by the linear and the inner solvers.

Every iterative algorithm of the package -- CG, MINRES, GMRES, BiCGSTAB, Neumann, and the
inner solvers gradient descent, Adam, Newton-CG, L-BFGS and fixed-point iteration -- is
written as

* **init**: the solver builds its state and a :class:`Tally` (the per-task status masks);
* **step**: ``step(state, active) -> (state, Outcome)``, one iteration of the tasks in
  ``active``; the :class:`Outcome` says which tasks moved, which stopped and why, and
  which *claim* convergence on an estimate that the driver must verify;
* **terminate**: the driver stops when no task is active (or when the budget is spent),
  settles the outstanding claims, and :meth:`Tally.codes` gives one integer status code
  per task for the result builder (:func:`bilevel._result.result_from_codes`).

The driver (:func:`iterate`) owns what the algorithms used to repeat: the masks of
stopped tasks and their per-task iteration counts, the stopping test -- the one host sync
per iteration, skipped entirely with a fixed budget (then stopped tasks are masked on the
device and nothing is read on the host until the end, as a CUDA graph or ``torch.func``
transform needs) -- and the verification of claims with restarts (MINRES and BiCGSTAB
test convergence on a recurrence; a claim is checked on the true residual, and a task
whose claim fails restarts from its current iterate).  The shape follows optimistix's
``iterative_solve`` and lineax's ``init``/``compute`` (Kidger & Rader 2023), adapted to
batches of independent tasks with one mask each.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from ._result import Status, code

S = TypeVar("S")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one step did, per task (boolean masks shaped like the task dimension).

    Attributes:
        moved: tasks whose iterate advanced; each counts one iteration.
        stopped: :class:`~bilevel.Status` -> tasks that stop now with that status
            (``Status.SUCCESS``, ``Status.NONFINITE``, ...).  Must name statuses the tally knows.
        claimed: tasks whose convergence *estimate* meets the tolerance; they stop moving
            until the driver has verified the claim (``None``: no claims).
        exhausted: the solver's own budget is spent (e.g. GMRES counts Arnoldi steps,
            not cycles): the driver stops after this step.
    """

    moved: Tensor
    stopped: Mapping[Status, Tensor] = dataclasses.field(default_factory=dict)
    claimed: Tensor | None = None
    exhausted: bool = False


class Tally:
    """The driver's per-task bookkeeping: one stop mask per status, pending claims, iterations.

    Args:
        like: a per-task tensor (``(B,)`` batched, 0-d or ``(1,)`` otherwise) giving the
            shape and device of the masks.
        statuses: the stop statuses the algorithm can report, in priority order (the first
            true mask names a task's status).
        start: initial masks (e.g. tasks converged or non-finite at the starting point).
    """

    def __init__(self, like: Tensor, statuses: Iterable[Status], start: Mapping[Status, Tensor] | None = None) -> None:
        zeros = torch.zeros(like.shape, dtype=torch.bool, device=like.device)
        start = start or {}
        self.stops: dict[Status, Tensor] = {status: start.get(status, zeros) for status in statuses}
        unknown = set(start) - set(self.stops)
        if unknown:
            raise KeyError(f"Tally: initial masks for unknown statuses {sorted(s.name for s in unknown)}")
        self.pending = zeros
        self.iters = torch.zeros(like.shape, dtype=torch.long, device=like.device)

    @property
    def stopped(self) -> Tensor:
        """Tasks that stopped for good (any status)."""
        out = self.pending & False
        for m in self.stops.values():
            out = out | m
        return out

    @property
    def active(self) -> Tensor:
        """Tasks still iterating: neither stopped nor waiting for a claim to be verified."""
        return ~(self.stopped | self.pending)

    def mark(self, status: Status, mask: Tensor) -> None:
        """Stop the tasks in ``mask`` with ``status``."""
        self.stops[status] = self.stops[status] | mask

    def record(self, out: Outcome) -> None:
        """Account for one step."""
        self.iters = self.iters + out.moved.long()
        for status, mask in out.stopped.items():
            self.mark(status, mask)
        if out.claimed is not None:
            self.pending = self.pending | out.claimed

    def codes(self, default: Status) -> Tensor:
        """Integer status codes per task: the first true stop mask wins, else ``default``
        (``MAX_ITERATIONS``, or ``COMPLETED`` for a fixed budget)."""
        return codes_from_masks(self.iters.shape, self.iters.device, default, self.stops)


def codes_from_masks(shape: torch.Size, device: torch.device, default: Status, masks: Mapping[Status, Tensor]) -> Tensor:
    """Integer status codes: the first mask (in the mapping's order) that is true wins; else ``default``."""
    out = torch.full(shape, code(default), dtype=torch.long, device=device)
    for status, m in reversed(list(masks.items())):
        out = torch.where(m, torch.full_like(out, code(status)), out)
    return out


@dataclasses.dataclass(frozen=True)
class Verifier(Generic[S]):
    """How a solver whose stopping test runs on an estimate checks a claim.

    Attributes:
        check: ``check(state, mask) -> (state, ok, bad)``: compute the true residual of the
            tasks in ``mask`` (storing its norm in the state as the reported one), and say
            which meet the tolerance (``ok``) and which are non-finite (``bad``).
        restart: ``restart(state, mask) -> state``: restart the tasks in ``mask`` (a
            failed claim) from their current iterate.
    """

    check: Callable[[S, Tensor], tuple[S, Tensor, Tensor]]
    restart: Callable[[S, Tensor], S]


def iterate(
    step: Callable[[S, Any], tuple[S, Any]],
    state: S,
    tally: Tally | None,
    *,
    maxiter: int | None,
    fixed: bool = False,
    verifier: Verifier[S] | None = None,
) -> S:
    """Run ``step`` until no task is active, the budget is spent, or a step says so.

    Args:
        step: one iteration of the active tasks (see :class:`Outcome`).
        state: the algorithm's state after init.
        tally: the per-task masks; updated in place.  ``None``: no masks at all -- every
            task takes every one of ``maxiter`` steps, ``step`` gets ``None`` for the
            active mask and returns ``None`` for the outcome.  The lean fixed-step loops
            of gradient descent and Adam use this: their cost is their gradients alone.
        maxiter: the number of steps allowed (``None``: until a step reports
            ``exhausted``).
        fixed: a fixed budget: run all ``maxiter`` steps with stopped tasks masked on the
            device, and no host sync in the loop.  A claim is then accepted unverified
            (an estimate of zero means the Krylov space is exhausted; a verification would
            cost a matvec and a sync).
        verifier: how claims are verified (``None``: claims are accepted as convergence).

    Returns:
        The final state.  ``tally.stops[Status.SUCCESS]`` holds the verified convergence.
    """
    if tally is None:
        if maxiter is None or not fixed:
            raise ValueError("iterate: without a tally only a fixed budget can run")
        for _ in range(maxiter):
            state, _ = step(state, None)
        return state
    for _ in range(maxiter) if maxiter is not None else itertools.count():
        if not fixed:
            # The one host sync per iteration: the stopping test (and whether to verify).
            if verifier is not None:
                any_active, any_pending = (bool(f) for f in torch.stack((tally.active.any(), tally.pending.any())).tolist())
                if any_pending:
                    state = _settle(verifier, state, tally, restart=True)
                    any_active = bool(tally.active.any())
            else:
                any_active = bool(tally.active.any())
            if not any_active:
                break
        state, out = step(state, tally.active)
        tally.record(out)
        if out.exhausted:
            break
    if fixed or verifier is None:
        tally.mark(Status.SUCCESS, tally.pending)
        tally.pending = tally.pending & False
        return state
    # Report the true residual of every task not already verified; this also settles a
    # claim made on the last allowed iteration.
    unverified = ~tally.stops[Status.SUCCESS]
    if bool(unverified.any()):
        state, ok, _ = verifier.check(state, unverified)
        tally.mark(Status.SUCCESS, tally.pending & ok)
    tally.pending = tally.pending & False
    return state


def _settle(verifier: Verifier[S], state: S, tally: Tally, *, restart: bool) -> S:
    """Verify the pending claims: converged, non-finite, or restarted from where they are."""
    pending = tally.pending
    state, ok, bad = verifier.check(state, pending)
    tally.mark(Status.SUCCESS, pending & ok)
    tally.mark(Status.NONFINITE, pending & bad)
    again = pending & ~ok & ~bad
    tally.pending = pending & False
    if restart:
        state = verifier.restart(state, again)
    return state


class History:
    """A per-iteration record of one per-task quantity (a residual norm), kept on the device.

    ``step = history.recording(step, read)`` wraps a driver step so that after every step
    ``read(state)`` -- a ``(B,)`` or 0-d tensor -- is appended; recording adds no host
    read to the loop.  :meth:`tensor` stacks the record: ``(T + 1,)``
    unbatched, ``(T + 1, B)`` batched, entry 0 the starting value; a task that has stopped
    keeps its last value (the solvers leave a stopped task's state unchanged).
    """

    def __init__(self, first: Tensor) -> None:
        self.values = [first.detach()]

    def recording(self, step: Callable[[S, Any], tuple[S, Any]], read: Callable[[S], Tensor]) -> Callable[[S, Any], tuple[S, Any]]:
        def recorded(state: S, active: Any) -> tuple[S, Any]:
            state, outcome = step(state, active)
            self.values.append(read(state).detach())
            return state, outcome

        return recorded

    def tensor(self, batched: bool) -> Tensor:
        if batched:
            return torch.stack(self.values)
        return torch.stack([v.reshape(()) for v in self.values])

