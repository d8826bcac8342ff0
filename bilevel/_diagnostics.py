"""What a layer remembers of its last forward and backward solve (statistics only)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ._result import LinearSolveResult, SolverResult


@dataclasses.dataclass
class Diagnostics:
    """Statistics of the last forward (inner) and backward (linear) solve of a layer.

    Only detached statistics are stored — never the solution, the inputs or a graph — so
    that reading diagnostics can never keep a meta-iteration's memory alive.

    Attributes:
        forward: the inner solver's :class:`~bilevel.SolverResult` with ``x=None`` (or
            ``None`` before the first call).  Per task in batched mode
            (``task_status``, ``task_iterations``, ``grad_norm`` of shape ``(B,)``).
        backward: the linear solve's :class:`~bilevel.LinearSolveResult` with ``x=None``.
    """

    forward: SolverResult | None = None
    backward: LinearSolveResult | None = None

    def __str__(self) -> str:
        lines = []
        if self.forward is not None:
            f = self.forward
            gn = "" if f.grad_norm is None else f", gradient norm {_fmt(f.grad_norm)}"
            lines.append(f"forward : {f.status} after {f.iterations} iterations{gn}")
        if self.backward is not None:
            lines.append(f"backward: {self.backward.summary()}")
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
        )
    status = getattr(res, "status", None)
    return SolverResult(
        x=None,
        status=status if isinstance(status, Status) else Status.UNKNOWN,
        iterations=int(getattr(res, "iterations", 0) or 0),
        message=str(status) if status is not None and not isinstance(status, Status) else "",
    )


def strip_backward(res: LinearSolveResult) -> LinearSolveResult:
    return dataclasses.replace(res, x=None, residual_norm=res.residual_norm.detach())
