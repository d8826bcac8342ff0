"""``check_implicit_grad``: ``torch.autograd.gradcheck`` for functions with implicit layers.

An implicit layer's gradient comes from the implicit function theorem, not from the
operations that produced the forward value, so a bug in the optimality condition, in the
linear solver or in the way parameters are passed does not show up in the forward pass.
This check compares the autograd gradient of a function with independent references:

* central finite differences along random unit directions (the function, re-solving its
  inner problem at each perturbed point, is the ground truth);
* optionally the autograd gradient of an *unrolled* implementation of the same function
  (differentiating through the solver's iterations).

The tolerances are derived from the declared inner/linear solver accuracy and from the
dtype (see :func:`check_implicit_grad` for the formula), so that a correct layer passes
and the usual bugs — a wrong sign, a zero gradient, a stale linear-solver residual, a
wrong proximal scaling — fail by orders of magnitude.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._errors import BilevelError, BilevelTypeError, BilevelValueError
from .._tree import TreeDef, tree_flatten, tree_unflatten

__all__ = ["GradCheckEntry", "GradCheckError", "GradCheckReport", "check_implicit_grad", "default_tolerances"]

SAFETY = 10.0
"""Safety factor ``C`` of the default tolerances (the error models below are orders of
magnitude, not bounds: unknown curvature constants are taken as 1)."""


@dataclasses.dataclass(frozen=True)
class GradCheckEntry:
    """One comparison: a directional derivative (or, for ``kind="unrolled value"``, a value).

    Attributes:
        input: which input was perturbed, e.g. ``"inputs[0]"`` (``"-"`` for value rows).
        direction: index of the random unit direction (``None`` for value rows).
        kind: ``"central difference"``, ``"unrolled"`` or ``"unrolled value"``.
        analytic: ``<grad f, d>`` from autograd through the implicit layers (for a value
            row: ``f(inputs)``).
        reference: the independent reference value.
        abs_error: ``|analytic - reference|``.
        rel_error: ``abs_error / |reference|`` (``inf`` when the reference is 0 and the
            error is not).
        tolerance: ``atol + rtol * |reference|`` for this row.
        ok: ``abs_error <= tolerance`` (and both values finite).

    Examples:
        >>> import torch
        >>> from bilevel.testing import check_implicit_grad
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> entry = check_implicit_grad(lambda t: (t ** 3).sum(), (x,), directions=1).entries[0]
        >>> entry.input, entry.kind, entry.ok, entry.abs_error <= entry.tolerance
        ('inputs[0]', 'central difference', True, True)
    """

    input: str
    direction: int | None
    kind: str
    analytic: float
    reference: float
    abs_error: float
    rel_error: float
    tolerance: float
    ok: bool


@dataclasses.dataclass(frozen=True)
class GradCheckReport:
    """Result of :func:`check_implicit_grad`; ``str(report)`` is a readable table.

    Attributes:
        entries: one :class:`GradCheckEntry` per input, direction and reference.
        value: the (cotangent-reduced) value ``f(inputs)``.
        dtype: dtype of the analytic gradient (of the first checked leaf).
        fd_dtype: dtype in which the finite differences were evaluated.
        eps: finite-difference step per checked input label.
        solver_tol: the declared solver tolerance ``tau`` used in the tolerances.
        rtol: relative tolerance used.
        atol: absolute tolerance per input label (finite differences) and for the
            ``"unrolled"`` rows (key ``"unrolled"``).
        notes: remarks found while checking (e.g. no gradient reached an input).

    Examples:
        >>> import torch
        >>> from bilevel.testing import check_implicit_grad
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> report = check_implicit_grad(lambda t: (t ** 3).sum(), (x,))
        >>> report.ok, len(report.entries), report.failures
        (True, 3, ())
        >>> print(report)
        check_implicit_grad: OK (3 checks); f(inputs) = 9, dtype float64, ...
        input      dir  reference           analytic  ...
        ...
    """

    entries: tuple[GradCheckEntry, ...]
    value: float
    dtype: torch.dtype
    fd_dtype: torch.dtype
    eps: dict[str, float]
    solver_tol: float
    rtol: float
    atol: dict[str, float]
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every comparison is within its tolerance."""
        return all(e.ok for e in self.entries)

    @property
    def failures(self) -> tuple[GradCheckEntry, ...]:
        return tuple(e for e in self.entries if not e.ok)

    @property
    def max_rel_error(self) -> float:
        return max((e.rel_error for e in self.entries), default=0.0)

    def __str__(self) -> str:
        n_fail = len(self.failures)
        head = "check_implicit_grad: " + (
            f"OK ({len(self.entries)} checks)" if n_fail == 0 else f"FAILED ({n_fail} of {len(self.entries)} checks)"
        )
        head += (
            f"; f(inputs) = {self.value:.6g}, dtype {_dt(self.dtype)}, finite differences in {_dt(self.fd_dtype)}, "
            f"solver_tol {self.solver_tol:.1e}"
        )
        cols = ("input", "dir", "reference", "analytic", "reference value", "abs err", "rel err", "tol", "result")
        rows = [
            (
                e.input,
                "-" if e.direction is None else str(e.direction),
                e.kind,
                f"{e.analytic: .8e}",
                f"{e.reference: .8e}",
                f"{e.abs_error:.2e}",
                f"{e.rel_error:.2e}",
                f"{e.tolerance:.2e}",
                "ok" if e.ok else "FAIL",
            )
            for e in self.entries
        ]
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

        out = [head, line(cols), line(["-" * w for w in widths])]
        out += [line(r) for r in rows]
        eps = ", ".join(f"{k}={v:.2e}" for k, v in self.eps.items())
        atol = ", ".join(f"{k}={v:.2e}" for k, v in self.atol.items())
        out.append(f"tol = atol + rtol*|reference|; rtol={self.rtol:.2e}; atol: {atol}; eps: {eps}")
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)


class GradCheckError(BilevelError, AssertionError):
    """Raised by :func:`check_implicit_grad` when a comparison fails; ``.report`` holds the report.

    An ``AssertionError`` (and a :class:`~bilevel.BilevelError`), so that a failed check
    fails a test like an ``assert``; its message is the report's table.

    Examples:
        A gradient silently cut by ``.detach()`` (autograd says ``2 t``, the truth is ``4 t``):

        >>> import torch
        >>> from bilevel.testing import GradCheckError, check_implicit_grad
        >>> buggy = lambda t: (t ** 2).sum() + (t.detach() ** 2).sum()
        >>> try:
        ...     check_implicit_grad(buggy, (torch.ones(3, dtype=torch.float64, requires_grad=True),))
        ... except GradCheckError as e:
        ...     print(isinstance(e, AssertionError), e.report.ok, len(e.report.failures))
        True False 3
    """

    def __init__(self, report: GradCheckReport) -> None:
        super().__init__("\n" + str(report))
        self.report = report


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def default_tolerances(
    dtype: torch.dtype,
    *,
    fd_dtype: torch.dtype | None = None,
    solver_tol: float | None = None,
    scale: float = 1.0,
    value_scale: float = 1.0,
    eps: float | None = None,
) -> tuple[float, float, float]:
    """The default ``(eps, rtol, atol)`` of :func:`check_implicit_grad` (see there).

    Args:
        dtype: dtype of the analytic gradient (of the inputs).
        fd_dtype: dtype in which ``fn`` is evaluated for the finite differences
            (default ``dtype``).
        solver_tol: declared relative accuracy ``tau`` of the inner and linear solves
            (default ``sqrt(eps(dtype))``, the library's default gradient tolerance).
        scale: ``max(1, ||x||_inf)`` of the perturbed input (the step is relative to it).
        value_scale: ``F = max(1, |f(x)|)``.
        eps: a fixed step; ``None`` picks the balanced one.

    Returns:
        ``(eps, rtol, atol)``: the finite-difference step (absolute), and the relative and
        absolute tolerances of a comparison.

    Examples:
        Tighter solves give tighter tolerances (formula in :func:`check_implicit_grad`):

        >>> import torch
        >>> from bilevel.testing import default_tolerances
        >>> eps, rtol, atol = default_tolerances(torch.float64, solver_tol=1e-10)
        >>> f"{rtol:.1e}"
        '1.5e-07'
        >>> default_tolerances(torch.float64, solver_tol=1e-6)[1] > rtol
        True
    """
    u_in = torch.finfo(dtype).eps
    u_fd = torch.finfo(fd_dtype or dtype).eps
    tau = math.sqrt(u_in) if solver_tol is None else float(solver_tol)
    noise = u_fd + tau
    # The central difference has truncation error ~ eps^2 |f'''| / 6 and noise error
    # ~ (u_fd + tau) |f| / eps (rounding, plus the inner solve re-converging to a slightly
    # different point at x + eps d and x - eps d); eps = (u_fd + tau)^(1/3) balances them.
    h = (noise ** (1.0 / 3.0)) * scale if eps is None else float(eps)
    h_rel = h / scale
    atol = SAFETY * value_scale * (noise / h_rel + h_rel**2)
    # The analytic gradient is accurate to ~tau relative (inner + linear solve) plus the
    # rounding of the backward in the input dtype (~sqrt(u_in) after a linear solve).
    rtol = SAFETY * (tau + math.sqrt(u_in))
    return h, rtol, atol


class _Input:
    """Bookkeeping of one positional input: its tree, leaves and which are checked."""

    def __init__(self, index: int, obj: Any) -> None:
        self.index = index
        self.label = f"inputs[{index}]"
        self.obj = obj
        self.leaves: list[Tensor] = []
        self.treedef: TreeDef | None = None
        try:
            self.leaves, self.treedef = tree_flatten(obj)
        except TypeError:
            pass  # a static (non-tensor) argument: passed through unchanged
        self.checked = [
            i for i, t in enumerate(self.leaves) if t.requires_grad and t.dtype.is_floating_point
        ]

    def rebuild(self, replace: dict[int, Tensor], cast: torch.dtype | None) -> Any:
        if self.treedef is None:
            return self.obj
        leaves = []
        for i, t in enumerate(self.leaves):
            if i in replace:
                leaves.append(replace[i])
            else:
                t2 = t.detach()
                leaves.append(t2.to(cast) if cast is not None and t2.dtype.is_floating_point else t2)
        return tree_unflatten(self.treedef, leaves)


def _reduce(out: Any, cot: list[Tensor] | None, seed: int) -> tuple[Tensor, list[Tensor]]:
    """Scalar ``<c, out>`` with a fixed random cotangent ``c`` (``out`` itself if a scalar)."""
    try:
        leaves, _ = tree_flatten(out)
    except TypeError as e:
        raise BilevelTypeError(f"check_implicit_grad: fn must return a tensor or a tensor tree: {e}") from None
    if not leaves:
        raise BilevelValueError("check_implicit_grad: fn returned an empty tree")
    if len(leaves) == 1 and leaves[0].dim() == 0:
        return leaves[0], []
    if cot is None:
        g = torch.Generator().manual_seed(seed + 7919)
        cot = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in leaves]
    if len(cot) != len(leaves) or any(c.shape != t.shape for c, t in zip(cot, leaves)):
        raise BilevelValueError("check_implicit_grad: fn returned outputs of different shapes at different inputs")
    s = sum((c.to(dtype=t.dtype, device=t.device) * t).sum() for c, t in zip(cot, leaves))
    return s, cot  # type: ignore[return-value]


def _entry(inp: str, k: int | None, kind: str, a: float, r: float, atol: float, rtol: float) -> GradCheckEntry:
    err = abs(a - r)
    tol = atol + rtol * abs(r)
    finite = math.isfinite(a) and math.isfinite(r)
    rel = err / abs(r) if r != 0 else (0.0 if err == 0 else math.inf)
    return GradCheckEntry(inp, k, kind, a, r, err if finite else math.inf, rel if finite else math.inf, tol, finite and err <= tol)


def check_implicit_grad(
    fn: Callable[..., Any],
    inputs: Any,
    *,
    directions: int = 3,
    eps: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    solver_tol: float | None = None,
    unrolled: Callable[..., Any] | None = None,
    upcast: bool = False,
    raise_exception: bool = True,
    seed: int = 0,
) -> GradCheckReport:
    """Check the autograd gradient of ``fn`` (which may contain implicit layers).

    ``fn(*inputs)`` returns a scalar tensor or a tensor tree (reduced to a scalar with a
    fixed random cotangent).  Every input leaf that requires grad is checked; each input
    (a tensor or a tensor tree; non-tensor inputs are passed through) is perturbed along
    ``directions`` random unit directions ``d`` (unit norm over its checked leaves), and
    the directional derivative ``a = <grad f, d>`` from autograd is compared with

    * the central difference ``r = (f(x + eps d) - f(x - eps d)) / (2 eps)``, and
    * if ``unrolled`` is given, ``<grad unrolled, d>`` (autograd through the unrolled
      computation of the same function), plus the values ``f(x)`` and ``unrolled(x)``.

    **fn must re-solve its inner problem tightly at every call**: the finite differences
    evaluate it at perturbed inputs, so a solver that stops loosely (or a warm start that
    hides the perturbation) makes the reference noisy.  Declare the accuracy through
    ``solver_tol``; it widens the tolerances accordingly.  ``fn`` is called
    ``1 + 2 * directions * (number of checked inputs)`` times (``unrolled`` once); put
    several tensors in one tree input to check them together along shared directions.

    Tolerances (documented formula; ``C = 10`` is a safety factor for the unknown
    curvature constants, ``u_in``/``u_fd`` the machine epsilons of the input dtype and of
    the dtype the finite differences are evaluated in, ``tau = solver_tol``,
    ``F = max(1, |f(x)|)``, ``s = max(1, ||x||_inf)`` over the perturbed leaves)::

        eps  = (u_fd + tau)^(1/3) * s                  balances truncation and noise
        atol = C * F * ((u_fd + tau) / (eps/s) + (eps/s)^2)     central-difference error
        rtol = C * (tau + sqrt(u_in))                  inner + linear solve, backward rounding
        pass iff |a - r| <= atol + rtol * |r|

    The unrolled rows use ``atol = C * F * (tau + sqrt(u_in))`` (no step), the same rtol.
    Explicit ``eps``/``rtol``/``atol`` override the defaults.  float64 with ``tau = 1e-10``
    gives ``eps ~ 5e-4``, ``atol ~ 4e-6 F``, ``rtol ~ 2e-7``; float32 is inherently much
    looser — prefer float64, or ``upcast=True`` if ``fn`` accepts float64 inputs.

    Args:
        fn: the function to check, ``fn(*inputs)``.
        inputs: a tuple of inputs (a single tensor or tree is wrapped in a tuple).
        directions: random directions per input (>= 1).
        eps: finite-difference step (absolute); default by the formula above.
        rtol: overrides the default relative tolerance (all rows).
        atol: overrides the default absolute tolerance (all rows).
        solver_tol: relative accuracy ``tau`` of ``fn``'s inner and linear solves
            (roughly: inner gradient tolerance / strong-convexity constant, and the linear
            solver's relative tolerance times the condition number).  Default
            ``sqrt(u_in)`` (the library's default gradient tolerance).
        unrolled: optional callable computing the same function by differentiable
            unrolling; its gradient is compared too.
        upcast: evaluate the finite differences with floating inputs cast to float64
            (``fn`` must accept float64 inputs); the analytic gradient stays in the input
            dtype.
        raise_exception: raise :class:`GradCheckError` (an ``AssertionError`` carrying the
            table) on failure; otherwise just return the report.
        seed: seeds the directions and the output cotangent.

    Returns:
        a :class:`GradCheckReport` (``report.ok``, ``str(report)``).

    Raises:
        GradCheckError: if a comparison fails and ``raise_exception``.
        ValueError: if no input requires grad, or ``directions < 1``.

    Examples:
        The meta-gradient of an implicit-MAML layer on a random quadratic problem:

        >>> import torch
        >>> from bilevel.testing import check_implicit_grad, make_quadratic
        >>> problem = make_quadratic(4, 10.0, torch.float64, "tensor", seed=0)
        >>> meta_loss = problem.proximal_meta_loss()          # outer(phi*(theta))
        >>> report = check_implicit_grad(meta_loss, (problem.theta_leaf(),), solver_tol=problem.solver_tol)
        >>> report.ok
        True

        Against an unrolled reference too (differentiating through 300 gradient steps):

        >>> report = check_implicit_grad(meta_loss, (problem.theta_leaf(),), solver_tol=problem.solver_tol,
        ...                              unrolled=problem.unrolled_proximal_meta_loss())
        >>> report.ok, sorted({e.kind for e in report.entries})
        (True, ['central difference', 'unrolled', 'unrolled value'])
    """
    if isinstance(directions, bool) or not isinstance(directions, int) or directions < 1:
        raise BilevelValueError(f"check_implicit_grad: directions must be an int >= 1, got {directions!r}")
    if solver_tol is not None and not (solver_tol >= 0 and math.isfinite(solver_tol)):
        raise BilevelValueError(f"check_implicit_grad: solver_tol must be finite and >= 0, got {solver_tol!r}")
    if eps is not None and not (eps > 0 and math.isfinite(eps)):
        raise BilevelValueError(f"check_implicit_grad: eps must be finite and > 0, got {eps!r}")
    if not isinstance(inputs, tuple):
        inputs = (inputs,)
    ins = [_Input(i, obj) for i, obj in enumerate(inputs)]
    checked = [inp for inp in ins if inp.checked]
    if not checked:
        raise BilevelValueError("check_implicit_grad: no input requires grad; nothing to check")
    dtype = checked[0].leaves[checked[0].checked[0]].dtype
    fd_dtype = torch.float64 if upcast else dtype
    cast = torch.float64 if upcast else None
    notes: list[str] = []

    # 1. Analytic directional derivatives (one forward + one backward through fn).
    out = fn(*inputs)
    s, cot = _reduce(out, None, seed)
    targets = [inp.leaves[i] for inp in checked for i in inp.checked]
    grads: list[Tensor | None] = [None] * len(targets)
    if s.requires_grad:
        grads = list(torch.autograd.grad(s, targets, allow_unused=True))
    else:
        notes.append("fn's output does not require grad: no gradient reaches any input (taken as zero)")
    value = float(s.detach())
    value_scale = max(1.0, abs(value))
    gi = iter(grads)
    grad_of: dict[tuple[int, int], Tensor] = {}
    for inp in checked:
        unused: list[int] = []
        for i in inp.checked:
            g = next(gi)
            if g is None:
                unused.append(i)
                g = torch.zeros_like(inp.leaves[i])
            grad_of[(inp.index, i)] = g.detach().to(torch.float64)
        if unused and s.requires_grad:
            notes.append(f"{inp.label}: leaf/leaves {unused} received no gradient (taken as zero)")

    # 2. Optional unrolled reference: value and gradient.
    ugrad_of: dict[tuple[int, int], Tensor] = {}
    tau = math.sqrt(torch.finfo(dtype).eps) if solver_tol is None else float(solver_tol)
    entries: list[GradCheckEntry] = []
    _, rtol_d, _ = default_tolerances(dtype, fd_dtype=fd_dtype, solver_tol=solver_tol)
    rtol_used = rtol_d if rtol is None else float(rtol)
    atols: dict[str, float] = {}
    if unrolled is not None:
        uout = unrolled(*inputs)
        us, _ = _reduce(uout, cot if cot else None, seed)
        utargets = [inp.leaves[i] for inp in checked for i in inp.checked]
        ugrads = torch.autograd.grad(us, utargets, allow_unused=True) if us.requires_grad else [None] * len(utargets)
        it = iter(ugrads)
        for inp in checked:
            for i in inp.checked:
                g = next(it)
                ugrad_of[(inp.index, i)] = (torch.zeros_like(inp.leaves[i]) if g is None else g.detach()).to(torch.float64)
        atol_u = SAFETY * value_scale * (tau + math.sqrt(torch.finfo(dtype).eps)) if atol is None else float(atol)
        atols["unrolled"] = atol_u
        entries.append(_entry("-", None, "unrolled value", value, float(us.detach()), atol_u, rtol_used))

    # 3. Central differences along random unit directions, per input.
    gen = torch.Generator().manual_seed(seed)
    eps_used: dict[str, float] = {}
    for inp in checked:
        dirs = []
        for _ in range(directions):
            d = {i: torch.randn(inp.leaves[i].shape, generator=gen, dtype=torch.float64) for i in inp.checked}
            nrm = math.sqrt(sum(float((t * t).sum()) for t in d.values()))
            dirs.append({i: t / nrm for i, t in d.items()} if nrm > 0 else d)
        xs = max(
            [1.0] + [float(inp.leaves[i].detach().abs().max()) for i in inp.checked if inp.leaves[i].numel() > 0]
        )
        h, _, atol_d = default_tolerances(
            dtype, fd_dtype=fd_dtype, solver_tol=solver_tol, scale=xs, value_scale=value_scale, eps=eps
        )
        eps_used[inp.label] = h
        atol_used = atol_d if atol is None else float(atol)
        atols[inp.label] = atol_used
        for k, d in enumerate(dirs):
            a = sum(float((grad_of[(inp.index, i)] * d[i]).sum()) for i in inp.checked)
            vals = []
            for sign in (1.0, -1.0):
                new_inputs = []
                for other in ins:
                    if other is inp:
                        rep = {}
                        for i in inp.checked:
                            base = inp.leaves[i].detach().to(torch.float64)
                            pert = base + sign * h * d[i].to(base.device)
                            rep[i] = pert.to(fd_dtype)
                        new_inputs.append(other.rebuild(rep, cast))
                    else:
                        new_inputs.append(other.rebuild({}, cast))
                # Grad mode is left as the caller set it (fn may differentiate internally);
                # the perturbed inputs are fresh tensors that do not require grad.
                o = fn(*new_inputs)
                sv, _ = _reduce(o, cot if cot else None, seed)
                vals.append(float(sv.detach()))
            r = (vals[0] - vals[1]) / (2.0 * h)
            entries.append(_entry(inp.label, k, "central difference", a, r, atol_used, rtol_used))
            if unrolled is not None:
                ua = sum(float((ugrad_of[(inp.index, i)] * d[i]).sum()) for i in inp.checked)
                entries.append(_entry(inp.label, k, "unrolled", a, ua, atols["unrolled"], rtol_used))

    report = GradCheckReport(
        entries=tuple(entries),
        value=value,
        dtype=dtype,
        fd_dtype=fd_dtype,
        eps=eps_used,
        solver_tol=tau,
        rtol=rtol_used,
        atol=atols,
        notes=tuple(notes),
    )
    if raise_exception and not report.ok:
        raise GradCheckError(report)
    return report
