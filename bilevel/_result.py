"""Statuses and result types shared by linear solvers and inner solvers.

A status is an :class:`enum.Enum` whose value is the human-readable message, so that
``str(result.status)`` reads well in a log and ``result.status is Status.SUCCESS`` is the
test.  Non-convergence is always reported through the status, never silently.
"""

from __future__ import annotations

import dataclasses
import enum
import warnings
from collections.abc import Sequence
from typing import Any, TypeVar

from torch import Tensor

from ._errors import ConvergenceError, ConvergenceWarning


class Status(enum.Enum):
    """Outcome of a solve.  The value is the message; compare members with ``is``.

    Examples:
        >>> from bilevel import Status
        >>> Status.COMPLETED.ok, Status.MAX_ITERATIONS.ok, Status.NEGATIVE_CURVATURE.early_stop
        (True, False, True)
    """

    SUCCESS = "converged to the requested tolerance"
    COMPLETED = "ran the configured number of steps (a fixed budget, no tolerance)"
    MAX_ITERATIONS = "reached the maximum number of iterations before the tolerance"
    NEGATIVE_CURVATURE = "found non-positive curvature (p^T A p <= 0): the operator is not positive definite"
    BREAKDOWN = "breakdown (division by a vanishing quantity)"
    NONFINITE = "a non-finite value (NaN or Inf) appeared"
    LINESEARCH_FAILED = "the line search could not make progress"
    NOT_A_MINIMUM = "stopped at a stationary point with negative curvature (a saddle or a maximum), not a minimum"
    EXTERNAL_FAILURE = "the external solver reported failure"
    UNKNOWN = "the solver reported no status"

    @property
    def ok(self) -> bool:
        """True for the statuses that mean the returned point can be trusted."""
        return self in (Status.SUCCESS, Status.COMPLETED)

    @property
    def early_stop(self) -> bool:
        """True for the statuses of a solver that stopped before its budget or tolerance
        because it could not go on (negative curvature, breakdown, NaN/Inf, a failed line
        search): the returned point is where it stopped, not an answer."""
        return self in (Status.NEGATIVE_CURVATURE, Status.BREAKDOWN, Status.NONFINITE, Status.LINESEARCH_FAILED)

    def __str__(self) -> str:
        return f"{self.name}: {self.value}"


# Integer codes let batched solvers keep one status per task in a tensor, without a
# host sync per iteration; they are turned into Status values once, at the end.
STATUS_CODES: tuple[Status, ...] = tuple(Status)


def status_from_codes(codes: Tensor) -> tuple[Status, ...]:
    """Turn a tensor of integer codes (indices into ``tuple(Status)``) into statuses."""
    return tuple(STATUS_CODES[int(c)] for c in codes.reshape(-1).tolist())


def code(status: Status) -> int:
    return STATUS_CODES.index(status)


def overall_status(statuses: tuple[Status, ...]) -> Status:
    """SUCCESS/COMPLETED only if every task is; otherwise the first failing status."""
    for s in statuses:
        if not s.ok:
            return s
    return Status.SUCCESS if all(s is Status.SUCCESS for s in statuses) else Status.COMPLETED


@dataclasses.dataclass(frozen=True)
class SolveResult:
    """What every solve returns: the base of :class:`SolverResult` and :class:`LinearSolveResult`.

    Attributes:
        x: the solution tree.
        status: overall :class:`Status` (batched: ``SUCCESS``/``COMPLETED`` only if every task is).
        iterations: iterations taken (batched: the largest over tasks).

    Each subclass also has ``task_status`` (per-task statuses in batched mode, else
    ``None``) and ``task_iterations`` (per-task iteration counts ``(B,)``, else ``None``),
    declared there to keep the subclasses' positional field order of 0.1.

    Examples:
        >>> import torch
        >>> from bilevel.linsolve import CG
        >>> res = CG()(lambda v: 2.0 * v, torch.ones(3))
        >>> res.status.ok, res.x.tolist()
        (True, [0.5, 0.5, 0.5])
    """

    x: Any
    status: Status
    iterations: int

    @property
    def success(self) -> bool:
        """Whether ``x`` can be trusted: ``status.ok`` (``SUCCESS``, or ``COMPLETED`` for a fixed budget)."""
        return self.status.ok


@dataclasses.dataclass(frozen=True)
class LinearSolveResult(SolveResult):
    """Result of a linear solve ``A x = b`` (a :class:`SolveResult`).

    Attributes:
        residual_norm: final residual norm ``||b - A x||`` (0-d, or ``(B,)`` per task).
        task_status: per-task statuses in batched mode, else ``None``.
        task_iterations: per-task iteration counts ``(B,)`` in batched mode, else ``None``.

    Examples:
        Two tasks solved at once (``batched=True``), each with its own convergence:

        >>> import torch
        >>> from bilevel.linsolve import CG
        >>> b = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
        >>> res = CG(rtol=1e-6)(lambda v: 2.0 * v, b, batched=True)
        >>> res.x
        tensor([[0.5000, 0.5000],
                [1.0000, 0.0000]])
        >>> [s.name for s in res.task_status], res.residual_norm.shape
        (['SUCCESS', 'SUCCESS'], torch.Size([2]))
    """

    residual_norm: Tensor
    task_status: tuple[Status, ...] | None = None
    task_iterations: Tensor | None = None

    def summary(self) -> str:
        """One line: status, iterations, residual norm(s)."""
        rn = [f"{r:.3g}" for r in self.residual_norm.detach().cpu().reshape(-1).tolist()]
        return f"{self.status} after {self.iterations} iterations, residual norm {', '.join(rn)}"


@dataclasses.dataclass(frozen=True)
class SolverResult(SolveResult):
    """Result of an inner solve ``x* = argmin f(x)`` (or a root / fixed point; a :class:`SolveResult`).

    Attributes:
        grad_norm: final gradient (or residual) norm, 0-d or ``(B,)``.
        value: final objective value, 0-d or ``(B,)`` (``None`` if not computed).
        n_fun: number of objective evaluations.
        n_grad: number of gradient evaluations.
        n_hvp: number of Hessian-vector products.
        raw: the external solver's own result object (e.g. ``scipy.optimize.OptimizeResult``).
        message: extra detail (e.g. the iteration at which a non-finite value appeared).
        grad_norm_initial: gradient norm at the starting point, 0-d or ``(B,)`` (first-order
            solvers; ``None`` otherwise).  ``grad_norm / grad_norm_initial`` says how far a
            fixed-budget solve got.
        grad_norm_monotone: bool, 0-d or ``(B,)``: the gradient norm never rose from one
            step to the next (first-order solvers).  Not guaranteed even for a stable step
            on a non-convex objective (negative curvature makes it grow).
        value_monotone: bool, 0-d or ``(B,)``: the objective never rose from one step to
            the next (beyond rounding; first-order solvers).  For gradient descent with a
            step below ``2 / L`` (L the largest curvature met) the descent lemma guarantees
            it, so ``False`` signals a step size too large for the problem: oscillation.
        task_status: per-task statuses in batched mode, else ``None``.
        task_iterations: per-task iteration counts ``(B,)`` in batched mode, else ``None``.
        residual_history: the residual norm at ``x0`` and after every iteration, ``(T + 1,)``
            or ``(T + 1, B)`` batched (``T = iterations``; a task that stopped earlier
            repeats its last value): ``||fn(x) - x||`` for the fixed-point solvers
            (:class:`~bilevel.solvers.FixedPointIteration`, :class:`~bilevel.solvers.Anderson`,
            :class:`~bilevel.solvers.Broyden`), ``||F(x)||`` for ``Broyden.root``; ``None``
            for the other solvers.  Kept on the device: recording it adds no host read.

    Examples:
        >>> import torch
        >>> from bilevel.solvers import NewtonCG
        >>> res = NewtonCG()(lambda x: ((x - 1.0) ** 2).sum(), torch.zeros(3))
        >>> res.status.name, res.success, res.n_hvp > 0
        ('SUCCESS', True, True)
        >>> [round(v, 4) for v in res.x.tolist()], float(res.grad_norm) < 1e-3
        ([1.0, 1.0, 1.0], True)
    """

    grad_norm: Tensor | None = None
    value: Tensor | None = None
    n_fun: int = 0
    n_grad: int = 0
    n_hvp: int = 0
    task_status: tuple[Status, ...] | None = None
    task_iterations: Tensor | None = None
    raw: Any = None
    message: str = ""
    grad_norm_initial: Tensor | None = None
    grad_norm_monotone: Tensor | None = None
    value_monotone: Tensor | None = None
    residual_history: Tensor | None = None


R = TypeVar("R", SolverResult, LinearSolveResult)


def result_from_codes(cls: type[R], x: Any, codes: Tensor, iters: Tensor, batched: bool, **fields: Any) -> R:
    """A result of type ``cls`` from per-task integer status codes and iteration counts
    (:meth:`bilevel._iterate.Tally.codes`); one host sync.  Unbatched, the per-task tensor
    ``fields`` of one element become 0-d."""
    statuses = status_from_codes(codes)
    n = (int(iters.max()) if iters.numel() else 0) if batched else int(iters.reshape(-1)[0])
    # A history has one entry per step run; a last step in which no task moved (all that
    # were left turned non-finite) only repeated the last values: T + 1 entries are kept.
    fields = {k: v[: n + 1] if k.endswith("_history") and isinstance(v, Tensor) else v for k, v in fields.items()}
    if batched:
        return cls(x=x, status=overall_status(statuses), iterations=n, task_status=statuses, task_iterations=iters,
                   **fields)
    fields = {k: v.reshape(()) if isinstance(v, Tensor) and v.numel() == 1 and not k.endswith("_history") else v
              for k, v in fields.items()}
    return cls(x=x, status=statuses[0], iterations=n, **fields)


def stack_results(results: Sequence[R], x: Any) -> R:
    """Per-task results of unbatched solves as one batched result of the same type (``x``:
    the stacked solution): statuses and iterations per task, per-task tensors stacked
    (``None`` if any task lacks one), counts summed, messages joined with their task."""
    import torch

    cls = type(results[0])
    statuses = tuple(r.status for r in results)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in ("x", "status", "iterations", "task_status", "task_iterations"):
            continue
        vals = [getattr(r, f.name) for r in results]
        if f.name == "raw":
            fields[f.name] = None
        elif f.name == "message":
            fields[f.name] = "; ".join(f"task {i}: {m}" for i, m in enumerate(vals) if m)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            fields[f.name] = sum(vals)
        elif f.name.endswith("_history") and all(isinstance(v, Tensor) for v in vals):
            # (T_i + 1,) per task -> (max T + 1, B): a task that stopped repeats its last value.
            n = max(v.shape[0] for v in vals)
            fields[f.name] = torch.stack([torch.cat([v, v[-1:].expand(n - v.shape[0])]) for v in vals], 1)
        elif all(isinstance(v, Tensor) for v in vals):
            fields[f.name] = torch.stack([v.reshape(()) for v in vals])
        else:
            fields[f.name] = None
    return cls(x=x, status=overall_status(statuses), iterations=max(r.iterations for r in results),
               task_status=statuses, task_iterations=torch.tensor([r.iterations for r in results]), **fields)


def report(status_ok: bool, message: str, on_failure: str) -> None:
    """Warn, raise or ignore a failed solve according to ``on_failure``."""
    if status_ok or on_failure == "ignore":
        return
    if on_failure == "raise":
        raise ConvergenceError(message)
    warnings.warn(message, ConvergenceWarning, stacklevel=4)
