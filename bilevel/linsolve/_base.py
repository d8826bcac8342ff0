"""Common configuration, validation and bookkeeping of the matrix-free linear solvers."""

from __future__ import annotations

import abc
import contextvars
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._errors import BilevelTypeError, BilevelValueError, UnsupportedError
from .._iterate import Tally, Verifier
from .._result import LinearSolveResult, Status, overall_status, result_from_codes
from .._traced import tracing
from .._transforms import is_vmapped
from .._tree import (
    default_tol,
    tree_dtype,
    tree_flatten,
    tree_map,
    tree_norm,
    tree_scale,
    tree_size,
    tree_sub,
    tree_where,
    tree_zeros_like,
)
from .._validate import check_int, check_real, check_tol

#: Set while a solve runs under ``torch.func.vmap`` (``jacrev``, ``jacfwd``): the values
#: are batched, so nothing may be read on the host -- no stopping test, no status codes,
#: no iteration counts.  ``"fixed"``: a fixed budget (``steps``), reported ``COMPLETED``.
#: ``"tolerance"``: a tolerance run without a stopping test -- all ``maxiter`` iterations,
#: converged slices masked on the device; a slice that did not converge becomes NaN.
_UNDER_VMAP: contextvars.ContextVar[str | None] = contextvars.ContextVar("bilevel_linsolve_under_vmap", default=None)

MatVec = Callable[[Any], Any]
"""``matvec(v) -> A v`` on tensor trees shaped like the right-hand side.

The operator is never materialised (except by :class:`~bilevel.linsolve.Dense`): a solver
only calls ``matvec``.  In batched mode ``v`` carries the leading task dimension and the
operator must act on each task's slice separately (block-diagonal).

Examples:
    A diagonal operator on a ``{"w", "b"}`` tree:

    >>> import torch
    >>> from bilevel.linsolve import CG, MatVec
    >>> matvec: MatVec = lambda v: {"w": 2.0 * v["w"], "b": 4.0 * v["b"]}
    >>> CG()(matvec, {"w": torch.ones(2), "b": torch.ones(())}).x
    {'w': tensor([0.5000, 0.5000]), 'b': tensor(0.2500)}
"""


@dataclasses.dataclass(frozen=True)
class LinearSolver(abc.ABC):  # noqa: B024 (abstract: subclasses implement _solve)
    """Base class: an immutable configuration, called as ``solver(matvec, b, x0=None)``.

    Two ways to say how long to iterate (scipy's names):

    * **to a tolerance** — ``rtol``, ``atol``, ``maxiter``: the solve stops when
      ``||r|| <= max(rtol * ||b||, atol)`` and reports ``SUCCESS``, or ``MAX_ITERATIONS``
      after ``maxiter`` iterations.  Testing the residual costs one host sync per
      iteration.
    * **a fixed budget** — ``steps``: exactly ``steps`` iterations (a task stops early only
      on an exact zero residual, a breakdown, non-positive curvature or a non-finite
      value), reported as ``COMPLETED``, like an inner solver without a tolerance.  CG,
      MINRES and Neumann then run without any host sync inside the loop (one at the end,
      to build the statuses) and report the residual their recurrence tracks, not a
      recomputed one; this is iMAML's "a few CG steps" (Rajeswaran et al. 2019, Sec. 4)
      without the cost of a stopping test it does not use.

    Under ``torch.func.vmap`` (``jacrev``, ``jacfwd``) no value can be read on the host:
    a fixed budget runs as above, and CG, MINRES and Neumann (``vmap_tolerance``) also run
    to a tolerance there -- all ``maxiter`` iterations, converged slices masked on the
    device, and a slice that missed the tolerance returned as NaN (no status can say so).
    The other solvers need ``steps`` there.

    Args:
        rtol: relative tolerance in (0, 1); ``None`` picks a default from the dtype of ``b``
            (:func:`bilevel._tree.default_tol`).
        atol: absolute tolerance (default 0).
        maxiter: iteration cap; ``None`` means ``10 * n`` (at least 10), where ``n`` is
            the number of unknowns (per task).
        steps: a fixed number of iterations (>= 1), exclusive with ``rtol``, ``atol`` and
            ``maxiter``.

    Subclasses set ``requires_symmetric`` when they are only valid for symmetric operators.

    Examples:
        The two ways to say how long to iterate, on the same system:

        >>> import torch
        >>> from bilevel.linsolve import CG, LinearSolver
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> b = torch.tensor([1.0, 2.0])
        >>> isinstance(CG(), LinearSolver)
        True
        >>> CG(rtol=1e-5)(lambda v: A @ v, b).status.name     # to a tolerance
        'SUCCESS'
        >>> CG(steps=1)(lambda v: A @ v, b).status.name       # a fixed budget
        'COMPLETED'
        >>> try:
        ...     CG(steps=1, rtol=1e-5)
        ... except ValueError as e:
        ...     print(e)
        CG: steps (a fixed budget) excludes rtol, atol and maxiter (a tolerance); give one or the other
    """

    rtol: float | None = None
    atol: float = 0.0
    maxiter: int | None = None
    steps: int | None = None

    requires_symmetric: ClassVar[bool] = False
    requires_positive_definite: ClassVar[bool] = False
    #: Whether a tolerance solve can run under ``torch.func.vmap`` (``jacrev``/``jacfwd``):
    #: its loop has no host-side control flow besides the driver's stopping test.
    vmap_tolerance: ClassVar[bool] = False

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_tol(name, self.rtol)
        check_real(name, "atol", self.atol, 0.0, lo_open=False)
        if self.maxiter is not None:
            check_int(name, "maxiter", self.maxiter, 1)
        if self.steps is not None:
            check_int(name, "steps", self.steps, 1)
            if self.rtol is not None or self.atol != 0 or self.maxiter is not None:
                raise BilevelValueError(
                    f"{name}: steps (a fixed budget) excludes rtol, atol and maxiter (a tolerance); "
                    "give one or the other"
                )

    @property
    def fixed_budget(self) -> bool:
        """Whether the solver runs a fixed number of iterations (``steps``) without a stopping test."""
        return self.steps is not None

    @property
    def traceable(self) -> bool:
        """Whether ``torch.compile`` can trace a solve into a graph: a fixed budget
        (``steps``) on a loop with no host-side control flow besides the stopping test
        (CG, MINRES, Neumann, Broyden); a layer's backward then runs in the graph
        (docs/works-with.md)."""
        return self.steps is not None and self.vmap_tolerance

    @property
    def _syncless(self) -> bool:
        """Run the driver without its stopping test: a fixed budget, or any solve under vmap."""
        return self.steps is not None or _UNDER_VMAP.get() is not None

    @property
    def _exhausted(self) -> Status:
        """Status of a task that used its whole budget: ``COMPLETED`` (fixed) or ``MAX_ITERATIONS``."""
        return Status.COMPLETED if self.steps is not None else Status.MAX_ITERATIONS

    # -- helpers for subclasses -------------------------------------------------------
    def _tol(self, b: Any) -> float:
        if self.steps is not None:
            return 0.0  # a fixed budget: only an exact zero residual stops a task early
        return self.rtol if self.rtol is not None else default_tol(tree_dtype(b))

    def _maxiter(self, b: Any, batched: bool) -> int:
        if self.steps is not None:
            return self.steps
        if self.maxiter is not None:
            return self.maxiter
        return max(10, 10 * tree_size(b, batched))

    def __call__(self, matvec: MatVec, b: Any, x0: Any = None, *, batched: bool = False) -> LinearSolveResult:
        """Solve ``A x = b``.

        The driver shared by every solver: it validates ``b``, solves the equivalent
        system ``A (x/s) = b/s`` with ``s`` a power of two just above the largest entry of
        ``|b|`` per task -- exact, so a well-scaled solve is bit-for-bit the unscaled one,
        and no norm of a representable ``b`` overflows or underflows whatever its scale
        (``||b||²`` overflows float32 from entries of about 1e19) -- then scales back.  A
        task whose ``b`` holds a NaN/Inf gets the status ``NONFINITE`` (and ``x = 0``, its
        residual norm NaN); the layers raise :class:`~bilevel.NonFiniteError` for it
        whatever their ``on_failure``, so that it never becomes a silent zero gradient.

        Args:
            matvec: ``v -> A v`` on trees shaped like ``b``.
            b: right-hand side, a tensor tree.
            x0: optional initial guess (zeros by default).
            batched: every leaf has a leading task dimension ``B``; the tasks are
                independent systems solved together, with per-task step sizes, residuals
                and convergence.  ``matvec`` must be block-diagonal over tasks.
        """
        check_rhs(b, batched)
        # Dynamo tracing a fixed budget (a layer's traced path): nothing may be read on the
        # host either, so the solve runs as under vmap.
        traced = self.traceable and tracing()
        if traced or any(is_vmapped(t) for t in tree_flatten(b)[0]):
            if self.steps is None and not self.vmap_tolerance:
                raise UnsupportedError(
                    f"{type(self).__name__}: a solve to a tolerance under torch.func.vmap (jacrev, jacfwd, vmap of grad) "
                    f"needs a loop without data-dependent host control: use {type(self).__name__}(steps=m), or CG, "
                    "MINRES or Neumann, which run all their maxiter iterations there"
                )
            if traced:  # dynamo cannot trace a ContextVar: finish() asks tracing() itself
                return self._solve_syncless(matvec, b, x0, batched)
            token = _UNDER_VMAP.set("fixed" if self.steps is not None else "tolerance")
            try:
                return self._solve_syncless(matvec, b, x0, batched)
            finally:
                _UNDER_VMAP.reset(token)
        scale = tree_amax(b, batched)
        bad = ~torch.isfinite(scale)
        # A power of two (the exponent of max |b|): scaling by it is exact, so a solve of a
        # well-scaled b is bit-for-bit the unscaled one.  Zero and non-finite right-hand
        # sides are left unscaled (x = 0, resp. NaN below).
        ok = ~bad & (scale > 0)
        exponent = torch.frexp(torch.where(ok, scale, torch.ones_like(scale))).exponent
        s = torch.ldexp(torch.ones_like(scale), exponent)
        b_hat = tree_where(bad, tree_zeros_like(b), tree_scale(1 / s, b, batched))
        x0_hat = None if x0 is None else tree_scale(1 / s, x0, batched)
        atol = torch.as_tensor(self.atol, dtype=s.dtype, device=s.device) / s
        res = self._solve(matvec, b_hat, x0_hat, batched, atol)
        x = tree_scale(s, res.x, batched)
        rnorm = torch.where(bad, torch.full_like(s, float("nan")), res.residual_norm * s.reshape(res.residual_norm.shape))
        return nonfinite_tasks(dataclasses.replace(res, x=x, residual_norm=rnorm), bad, batched)

    def _solve_syncless(self, matvec: MatVec, b: Any, x0: Any, batched: bool) -> LinearSolveResult:
        """The solve under vmap or while dynamo traces: unscaled, every iteration, nothing read on the host."""
        atol = torch.as_tensor(self.atol, dtype=tree_dtype(b))
        res = self._solve(matvec, b, x0, batched, atol)
        return dataclasses.replace(res, iterations=self._maxiter(b, batched))

    def _solve(self, matvec: MatVec, b: Any, x0: Any, batched: bool, atol: Tensor) -> LinearSolveResult:
        """The algorithm, on a right-hand side scaled to ``max |b|`` in [1/2, 1) per task (or 0).

        ``atol`` is the absolute tolerance in those units (a 0-d or ``(B,)`` tensor).  A
        subclass implements this (and inherits the driver), or overrides ``__call__``.
        """
        raise UnsupportedError(f"{type(self).__name__} implements neither _solve nor __call__")


def tree_amax(b: Any, batched: bool) -> Tensor:
    """Largest ``|entry|`` of a tree (per task when batched); NaN if any entry is NaN."""
    leaves, _ = tree_flatten(b)
    if batched:
        per = [t.reshape(t.shape[0], -1).abs().amax(1) if t[0].numel() else torch.zeros(t.shape[0], dtype=t.dtype, device=t.device) for t in leaves]
        nan = torch.stack([torch.isnan(t.reshape(t.shape[0], -1)).any(1) for t in leaves]).any(0)
    else:
        per = [t.abs().amax() if t.numel() else torch.zeros((), dtype=t.dtype, device=t.device) for t in leaves]
        nan = torch.stack([torch.isnan(t).any() for t in leaves]).any()
    m = torch.stack([t.to(per[0].dtype) for t in per]).amax(0)
    return torch.where(nan, torch.full_like(m, float("nan")), m)


def nonfinite_tasks(res: LinearSolveResult, bad: Tensor, batched: bool) -> LinearSolveResult:
    """Mark the tasks in ``bad`` (a NaN/Inf right-hand side) ``NONFINITE``."""
    if batched:
        flags = bad.reshape(-1).tolist()
        if not any(flags) or res.task_status is None:
            return res
        statuses = tuple(Status.NONFINITE if f else st for f, st in zip(flags, res.task_status))
        return dataclasses.replace(res, task_status=statuses, status=overall_status(statuses))
    if bool(bad):
        return dataclasses.replace(res, status=Status.NONFINITE)
    return res


def check_rhs(b: Any, batched: bool) -> None:
    leaves, _ = tree_flatten(b)
    if not leaves:
        raise BilevelValueError("the right-hand side is an empty tree")
    for leaf in leaves:
        if not leaf.dtype.is_floating_point:
            raise BilevelTypeError(f"linear solvers need floating-point tensors, got {leaf.dtype}")
        if batched and leaf.dim() == 0:
            raise BilevelValueError("batched mode needs a leading task dimension on every leaf")


def finish(x: Any, rnorm: Tensor, tally: Tally, default: Status, batched: bool) -> LinearSolveResult:
    """Build a :class:`LinearSolveResult` from the driver's tally (one host sync)."""
    # While dynamo traces a fixed budget (its default status is COMPLETED): as under vmap.
    mode = "fixed" if default is Status.COMPLETED and tracing() else _UNDER_VMAP.get()
    if mode is not None:  # nothing can be read on the host
        if mode == "tolerance":
            # No status can be reported from inside vmap: a slice that did not reach the
            # tolerance in maxiter iterations is made NaN (loud) rather than returned inexact.
            x = tree_where(tally.stops[Status.SUCCESS], x, tree_map(lambda t: torch.full_like(t, float("nan")), x))
        return LinearSolveResult(x=x, status=Status.COMPLETED, iterations=-1, residual_norm=rnorm)
    return result_from_codes(LinearSolveResult, x, tally.codes(default), tally.iters, batched, residual_norm=rnorm)


def initial_guess(matvec: MatVec, b: Any, x0: Any) -> tuple[Any, Any]:
    """The starting iterate (a copy of ``x0``; zeros by default) and its residual ``b - A x``."""
    if x0 is None:
        return tree_zeros_like(b), b
    x = tree_map(lambda t: t.clone(), x0)
    return x, tree_sub(b, matvec(x))


def start_tally(rnorm: Tensor, thresh: Tensor, statuses: tuple[Status, ...]) -> Tally:
    """The driver's masks at the starting iterate: converged where ``rnorm <= thresh``,
    ``NONFINITE`` where the residual is not finite.

    An infinite ``b`` gives an infinite threshold: finiteness is part of convergence.
    """
    return Tally(rnorm, statuses, {Status.SUCCESS: torch.isfinite(rnorm) & (rnorm <= thresh), Status.NONFINITE: ~torch.isfinite(rnorm)})


def residual_verifier(
    matvec: MatVec, b: Any, thresh: Tensor, batched: bool, restart: Callable[[dict[str, Any], Tensor], dict[str, Any]]
) -> Verifier[dict[str, Any]]:
    """The :class:`~bilevel._iterate.Verifier` of the solvers whose convergence test runs on
    a recurrence (BiCGSTAB, MINRES): one matvec computes the true residual ``b - A x`` of
    the state's ``x``; its norm becomes the reported ``rnorm`` of the checked tasks, and the
    residual (``rtrue``, ``rt``) is kept in the state for ``restart``."""

    def check(st: dict[str, Any], mask: Tensor) -> tuple[dict[str, Any], Tensor, Tensor]:
        rtrue = tree_sub(b, matvec(st["x"]))
        rt = tree_norm(rtrue, batched)
        st = {**st, "rtrue": rtrue, "rt": rt, "rnorm": torch.where(mask, rt, st["rnorm"])}
        return st, mask & (rt <= thresh), mask & ~torch.isfinite(rt)

    return Verifier(check=check, restart=restart)


def merge_state(
    mask: Tensor, new: dict[str, Any], old: dict[str, Any], trees: tuple[str, ...], scalars: tuple[str, ...]
) -> dict[str, Any]:
    """Per task: ``new`` solver state where ``mask``, else ``old`` (tree and scalar entries)."""
    out: dict[str, Any] = dict(old)
    out.update({k: tree_where(mask, new[k], old[k]) for k in trees})
    out.update({k: torch.where(mask, new[k], old[k]) for k in scalars})
    return out
