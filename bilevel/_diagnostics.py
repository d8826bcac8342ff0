"""What a layer remembers of its last forward and backward solve (statistics only)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ._result import LinearSolveResult, SolverResult


@dataclasses.dataclass
class Diagnostics:
    """Statistics of the last forward (inner) and backward (linear) solve of a layer.

    Only detached statistics are stored — never the solution, the inputs or a graph — so
    that reading diagnostics can never keep a meta-iteration's memory alive.

    Every call of the layer is numbered (``calls``); ``forward_call`` and
    ``backward_call`` say which call ``forward`` and ``backward`` describe.  A call clears
    ``forward`` when it starts, so a call that raises before its inner solve finishes
    leaves ``forward`` at ``None`` rather than the previous call's statistics; with
    interleaved calls (two forwards, then two backwards) the numbers tell them apart,
    and :meth:`__str__` says when the two describe different calls.

    Attributes:
        forward: the inner solver's :class:`~bilevel.SolverResult` with ``x=None`` (or
            ``None`` before the first call).  Per task in batched mode
            (``task_status``, ``task_iterations``, ``grad_norm`` of shape ``(B,)``).
        backward: the linear solve's :class:`~bilevel.LinearSolveResult` with ``x=None``.
        calls: number of eager calls of the layer so far (a call traced into a
            ``torch.compile`` graph is not counted: a graph cannot count on the host).
        forward_call: the call ``forward`` belongs to (``None``: none yet, or the current
            call has not finished its forward).
        backward_call: the call ``backward`` belongs to.
        strategy: how the last batched call of :class:`~bilevel.Argmin` /
            :class:`~bilevel.Proximal` ran its tasks, ``"vmap"`` or ``"loop"`` (``None``:
            not batched); with ``batched=True`` / ``"auto"`` the faster one, measured.
        strategy_seconds: the measurement behind an ``"auto"`` choice: seconds of one
            gradient and one Hessian-vector product for all tasks, per strategy (``None``
            when the strategy was given or not measured).
        solve_dtype: the precision :class:`~bilevel.Argmin`, :class:`~bilevel.Proximal`
            or :class:`~bilevel.FixedPoint` solved the last call's inner problem in, when
            not the inputs' own (``None``): ``torch.float32`` for float16/bfloat16 inputs
            with ``solve_dtype="auto"``.
        forward_norm: what ``forward.grad_norm`` measures, for the printed line:
            ``"gradient norm"`` (a minimisation), ``"residual norm"`` (a fixed point:
            ``||fn(x) - x||``).
        traced: whether the last call ran inside a ``torch.compile`` graph (the traced
            path of fixed-budget layers, docs/works-with.md): a graph reads nothing on
            the host, so ``forward`` and ``backward`` are then left at ``None``.

    Examples:
        >>> import torch, bilevel
        >>> layer = bilevel.Argmin(lambda x, a: ((x - a) ** 2).sum())
        >>> a = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> layer(torch.zeros(2), a).sum().backward()
        >>> d = layer.diagnostics
        >>> d.calls, d.forward.status.name, d.backward.status.name, d.forward.x is None
        (1, 'SUCCESS', 'SUCCESS', True)
        >>> print(d)
        forward : SUCCESS: converged to the requested tolerance after ... iterations, gradient norm ...
        backward: SUCCESS: converged to the requested tolerance after ... iterations, residual norm ...
    """

    forward: SolverResult | None = None
    backward: LinearSolveResult | None = None
    calls: int = 0
    forward_call: int | None = None
    backward_call: int | None = None
    strategy: str | None = None
    strategy_seconds: dict[str, float] | None = None
    solve_dtype: torch.dtype | None = None
    traced: bool = False
    forward_norm: str = "gradient norm"

    def start_call(self) -> int:
        """Number a new call and clear the forward statistics (returns the call's number)."""
        self.calls += 1
        self.forward = None
        self.forward_call = None
        return self.calls

    def __str__(self) -> str:
        lines = []
        if self.traced:
            lines.append("traced: the last call ran inside a torch.compile graph (no statuses or statistics)")
        if self.forward is not None:
            f = self.forward
            gn = "" if f.grad_norm is None else f", {self.forward_norm} {_fmt(f.grad_norm)}"
            lines.append(f"forward : {f.status} after {f.iterations} iterations{gn}")
        if self.backward is not None:
            lines.append(f"backward: {self.backward.summary()}")
        if self.solve_dtype is not None:
            lines.append(f"precision: the inner problem solved in {str(self.solve_dtype).replace('torch.', '')}")
        if self.strategy is not None:
            how = ""
            if self.strategy_seconds:
                how = " (measured, s per gradient + Hessian product of all tasks: " + ", ".join(
                    f"{k} {v:.3g}" for k, v in self.strategy_seconds.items()) + ")"
            lines.append(f"batching: {self.strategy}{how}")
        if self.forward_call is not None and self.backward_call is not None and self.forward_call != self.backward_call:
            lines.append(f"(forward of call {self.forward_call}, backward of call {self.backward_call})")
        return "\n".join(lines) or "no solve yet"


def _fmt(t: Any) -> str:
    vals = t.detach().cpu().reshape(-1).tolist()
    return ", ".join(f"{v:.3g}" for v in vals)


def strip_forward(res: Any) -> SolverResult:
    """A :class:`SolverResult` without the solution (for storage in :class:`Diagnostics`)."""
    from ._result import Status

    if isinstance(res, SolverResult):
        return dataclasses.replace(
            res,
            x=None,
            raw=None,
            grad_norm=None if res.grad_norm is None else res.grad_norm.detach(),
            value=None if res.value is None else res.value.detach(),
            grad_norm_initial=None if res.grad_norm_initial is None else res.grad_norm_initial.detach(),
            grad_norm_monotone=None if res.grad_norm_monotone is None else res.grad_norm_monotone.detach(),
            value_monotone=None if res.value_monotone is None else res.value_monotone.detach(),
            residual_history=None if res.residual_history is None else res.residual_history.detach(),
        )
    status = getattr(res, "status", None)
    if isinstance(status, str) and status.upper() in Status.__members__:  # a user solver's "SUCCESS"
        status = Status[status.upper()]
    return SolverResult(
        x=None,
        status=status if isinstance(status, Status) else Status.UNKNOWN,
        iterations=int(getattr(res, "iterations", 0) or 0),
        message=str(status) if status is not None and not isinstance(status, Status) else "",
    )


def strip_backward(res: LinearSolveResult) -> LinearSolveResult:
    return dataclasses.replace(res, x=None, residual_norm=res.residual_norm.detach())
