"""Line searches shared by the inner solvers.

A line search looks at the one-dimensional function ``phi(a) = f(x + a d)`` of the step
``a`` along a direction ``d`` (a tensor tree shaped like ``x``), starting from the value
``f0 = phi(0)`` and the slope ``phi'(0) = <g0, d>``.  It never raises on failure: it
returns ``success=False`` and the caller reports ``Status.LINESEARCH_FAILED``.  Trial
points whose value is NaN/Inf are treated as "step too long" (the usual behaviour of
backtracking), never as an error: only *accepted* points must be finite.

Rounding: near a minimiser the true change of ``f`` along a step falls below the
rounding noise of ``f`` and the exact tests become coin flips (the value of an
ill-conditioned quadratic moves by tens of ``eps |f|`` under perturbations far too small
to change it).  Both searches therefore tolerate an increase up to
``eps_f = noise * eps * |f(x)|`` (``eps`` of the dtype; default ``noise=100``, above that
noise): the relaxed Armijo condition of Berahas, Byrd & Nocedal (SIAM J. Optim.
29(2), 2019) for backtracking, and the approximate Wolfe conditions of Hager & Zhang
(SIAM J. Optim. 16(1), 2005) for the Wolfe search, which also demand the derivative form
of sufficient decrease ``phi'(a) <= (2 c1 - 1) phi'(0)`` and treat values within
``eps_f`` of each other as ties decided by derivatives.  Far from a solution ``eps_f`` is
negligible against the decrease; ``noise=0`` gives the exact textbook tests.

References:
    J. Nocedal and S. J. Wright, *Numerical Optimization*, 2nd ed., Springer, 2006:
    Alg. 3.1 (backtracking), Alg. 3.5/3.6 (strong Wolfe: bracketing and zoom), and
    eq. (3.59) (cubic interpolation).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from .._autodiff import Objective, value, value_and_grad
from .._errors import BilevelValueError, UnsupportedError
from .._tree import tree_axpy, tree_vdot
from .._validate import check_int, check_real, warn_renamed


@dataclasses.dataclass(frozen=True)
class LineSearchResult:
    """Outcome of a line search.

    Attributes:
        x: the new point ``x + step * d`` (equal to ``x`` for a task whose search failed).
        step: accepted step, 0-d (or ``(B,)`` per task when batched; 0 where it failed).
        value: ``f(x + step * d)`` (``f0`` where the search failed).
        grad: gradient tree at the new point if the search computed it (strong Wolfe), else ``None``.
        n_fun: objective evaluations (one per trial; a batched evaluation counts once).
        n_grad: gradient evaluations.
        success: bool tensor, 0-d (or ``(B,)``): the conditions hold at the returned step.

    Examples:
        Steepest descent on ``f(x) = ||x||²`` from ``(1, 1)``: the full step overshoots to
        ``(-1, -1)`` (no decrease), the halved one is accepted:

        >>> import torch
        >>> from bilevel.solvers import BacktrackingArmijo
        >>> f = lambda x: (x ** 2).sum()
        >>> x = torch.tensor([1.0, 1.0])
        >>> g = 2 * x
        >>> res = BacktrackingArmijo()(f, x, -g, f0=f(x), g0=g)
        >>> res.step, res.x, bool(res.success), res.n_fun
        (tensor(0.5000), tensor([0., 0.]), True, 2)
    """

    x: Any
    step: Tensor
    value: Tensor
    grad: Any
    n_fun: int
    n_grad: int
    success: Tensor


# ----------------------------------------------------------------------------------------
# Line searches
# ----------------------------------------------------------------------------------------
def _renamed_max_steps(search: Any, default_maxiter: int) -> None:
    """``max_steps`` (a cap, so ``maxiter`` in the library's vocabulary) still works, with a warning."""
    name = type(search).__name__
    if search.max_steps is not None:
        if search.maxiter != default_maxiter:
            raise BilevelValueError(f"{name}: give maxiter or the deprecated max_steps, not both")
        check_int(name, "max_steps", search.max_steps, 1)
        warn_renamed(name, "max_steps", "maxiter", stacklevel=5)
        object.__setattr__(search, "maxiter", search.max_steps)
        object.__setattr__(search, "max_steps", None)
    check_int(name, "maxiter", search.maxiter, 1)


@dataclasses.dataclass(frozen=True)
class BacktrackingArmijo:
    """Backtracking line search for the Armijo (sufficient decrease) condition.

    Tries ``a = initial_step, shrink * a, shrink^2 * a, ...`` and accepts the first step
    with ``f(x + a d) <= f(x) + c1 * a * <g, d> + eps_f`` (Nocedal & Wright 2006, Alg.
    3.1, relaxed by the rounding allowance ``eps_f = noise * eps * |f(x)|`` described in
    the module docstring).  The returned step always satisfies that inequality (as
    evaluated, with a finite value) when ``success`` is true; a non-descent direction
    (``<g, d> >= 0``) fails at once, without evaluations.

    In batched mode each task backtracks on its own: a task that has satisfied its Armijo
    condition keeps its step (and value) while the others keep shrinking; the objective is
    evaluated for all tasks at once (one host sync per trial, for the stopping test).

    Args:
        c1: sufficient-decrease constant in (0, 1).
        shrink: step reduction factor in (0, 1).
        max_steps: deprecated name of ``maxiter``.
        initial_step: first trial step (> 0); a caller may override it per call.
        noise: rounding allowance in units of ``eps * |f(x)|`` (>= 0; 0: exact test).
        maxiter: the cap on trial steps before giving up (>= 1).

    Examples:
        The line search of :class:`NewtonCG`, configured:

        >>> import torch
        >>> from bilevel.solvers import BacktrackingArmijo, NewtonCG
        >>> NewtonCG(line_search=BacktrackingArmijo(maxiter=10)).line_search.maxiter
        10

        Called directly, the accepted step satisfies the Armijo condition:

        >>> search = BacktrackingArmijo(c1=1e-4)
        >>> f = lambda x: (x ** 2).sum()
        >>> x = torch.tensor([1.0, 1.0])
        >>> g = 2 * x
        >>> res = search(f, x, -g, f0=f(x), g0=g)
        >>> bool(res.value <= f(x) + search.c1 * res.step * (g @ -g))
        True
    """

    c1: float = 1e-4
    shrink: float = 0.5
    max_steps: int | None = None
    initial_step: float = 1.0
    noise: float = 100.0
    maxiter: int = 30

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_real(name, "c1", self.c1, 0.0, 1.0)
        check_real(name, "shrink", self.shrink, 0.0, 1.0)
        _renamed_max_steps(self, 30)
        check_real(name, "initial_step", self.initial_step, 0.0)
        check_real(name, "noise", self.noise, 0.0, lo_open=False)

    def __call__(
        self,
        objective: Objective,
        x: Any,
        d: Any,
        args: tuple = (),
        *,
        f0: Tensor,
        g0: Any,
        batched: bool = False,
        active: Tensor | None = None,
        initial_step: float | None = None,
    ) -> LineSearchResult:
        """Search along ``d`` from ``x``.

        Args:
            objective: ``objective(x, *args)`` (a ``(B,)`` tensor when batched).
            x: current point (a tree).
            d: search direction (a tree of the same structure as ``x``).
            args: extra objective arguments.
            f0: ``objective(x, *args)``.
            g0: gradient tree at ``x``.
            batched: per-task steps (leading task dimension on every leaf).
            active: optional bool mask (0-d or ``(B,)``); inactive tasks do not move and
                count as successful.
            initial_step: overrides ``self.initial_step`` for this call.
        """
        slope = tree_vdot(g0, d, batched)
        if active is None:
            active = torch.ones_like(slope, dtype=torch.bool)
        descent = slope < 0
        # Tasks still searching; a non-descent direction fails without evaluations.
        searching = active & descent & torch.isfinite(slope) & torch.isfinite(f0)
        accepted = torch.zeros_like(searching)
        a0 = self.initial_step if initial_step is None else float(initial_step)
        trial = torch.full_like(slope, a0)
        step = torch.zeros_like(slope)
        f_new = f0.clone()
        eps_f = self.noise * torch.finfo(f0.dtype).eps * f0.abs()
        n_fun = 0
        for _ in range(self.maxiter):
            if not bool(searching.any()):  # one host sync per trial: the stopping test
                break
            xt = tree_axpy(torch.where(searching, trial, torch.zeros_like(trial)), d, x, batched)
            ft = value(objective, xt, args, batched)
            n_fun += 1
            # NaN compares false, so a non-finite trial value is simply "not accepted".
            ok = searching & torch.isfinite(ft) & (ft <= f0 + self.c1 * trial * slope + eps_f)
            step = torch.where(ok, trial, step)
            f_new = torch.where(ok, ft, f_new)
            accepted = accepted | ok
            searching = searching & ~ok
            trial = trial * self.shrink
        success = accepted | ~active
        x_new = tree_axpy(step, d, x, batched)
        return LineSearchResult(x=x_new, step=step, value=f_new, grad=None, n_fun=n_fun, n_grad=0, success=success)


def _cubic_min(a: float, fa: float, da: float, b: float, fb: float, db: float) -> float | None:
    """Minimiser of the cubic interpolating ``(a, fa, da)`` and ``(b, fb, db)``
    (Nocedal & Wright 2006, eq. 3.59); ``None`` if it does not exist."""
    d1 = da + db - 3.0 * (fa - fb) / (a - b)
    rad = d1 * d1 - da * db
    if not math.isfinite(rad) or rad < 0:
        return None
    d2 = math.copysign(math.sqrt(rad), b - a)
    den = db - da + 2.0 * d2
    if den == 0 or not math.isfinite(den):
        return None
    t = b - (b - a) * (db + d2 - d1) / den
    return t if math.isfinite(t) else None


@dataclasses.dataclass(frozen=True)
class StrongWolfe:
    """Line search for the strong Wolfe conditions (unbatched).

    Finds a step ``a`` with ``|<g(x + a d), d>| <= c2 |<g, d>|`` and either
    ``f(x + a d) <= f(x) + c1 a <g, d>`` (strong Wolfe) or, where that difference is lost
    in rounding, ``f(x + a d) <= f(x) + eps_f`` and ``<g(x + a d), d> <= (2 c1 - 1) <g, d>``
    (approximate Wolfe, Hager & Zhang 2005; ``eps_f = noise * eps * |f(x)|``, see the
    module docstring), by bracketing (Alg. 3.5) and zoom (Alg. 3.6) of
    Nocedal & Wright 2006, with safeguarded cubic interpolation (bisection when the cubic
    has no minimiser inside the bracket, or a bracket end is non-finite).  Every trial
    computes value and gradient, and the gradient at the accepted point is returned, so
    quasi-Newton solvers need no extra evaluation.  When ``success`` is true both
    conditions hold at the returned step as evaluated.

    Args:
        c1: sufficient-decrease constant in (0, 1).
        c2: curvature constant in (c1, 1) (0.9 for quasi-Newton methods, 0.1 for CG).
        max_steps: deprecated name of ``maxiter``.
        noise: rounding allowance in units of ``eps * |f(x)|`` (>= 0; 0: exact strong Wolfe).
        maxiter: the cap on trial evaluations, bracketing and zoom together (>= 1).

    Examples:
        The line search of :class:`LBFGS`, configured:

        >>> import torch
        >>> from bilevel.solvers import LBFGS, StrongWolfe
        >>> LBFGS(line_search=StrongWolfe(c2=0.9, maxiter=40)).line_search.maxiter
        40

        Called directly, it returns the gradient at the accepted point too:

        >>> f = lambda x: (x ** 2).sum()
        >>> x = torch.tensor([1.0, 1.0])
        >>> res = StrongWolfe()(f, x, -2 * x, f0=f(x), g0=2 * x)
        >>> res.step, res.grad, bool(res.success)
        (tensor(0.5000), tensor([0., 0.]), True)
    """

    c1: float = 1e-4
    c2: float = 0.9
    max_steps: int | None = None
    noise: float = 100.0
    maxiter: int = 25

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_real(name, "c1", self.c1, 0.0, 1.0)
        check_real(name, "c2", self.c2, 0.0, 1.0)
        if not self.c1 < self.c2:
            raise BilevelValueError(f"{name}: need c1 < c2, got c1={self.c1!r}, c2={self.c2!r}")
        _renamed_max_steps(self, 25)
        check_real(name, "noise", self.noise, 0.0, lo_open=False)

    def __call__(
        self,
        objective: Objective,
        x: Any,
        d: Any,
        args: tuple = (),
        *,
        f0: Tensor,
        g0: Any,
        batched: bool = False,
        initial_step: float = 1.0,
    ) -> LineSearchResult:
        """Search along ``d`` from ``x`` (see :class:`BacktrackingArmijo` for the arguments)."""
        if batched:
            raise UnsupportedError("StrongWolfe does not support batched (multi-task) line searches")
        check_real(type(self).__name__, "initial_step", initial_step, 0.0)
        phi0 = float(f0)
        dphi0 = float(tree_vdot(g0, d))
        evals = {"n": 0}
        last: dict[float, Any] = {}  # the most recent trial: step -> (x, value, gradient)

        def fail() -> LineSearchResult:
            n = evals["n"]
            return LineSearchResult(
                x=x, step=torch.zeros_like(f0), value=f0, grad=None, n_fun=n, n_grad=n, success=torch.tensor(False)
            )

        def done(a: float) -> LineSearchResult:
            xa, fa, ga = last[a]  # accepted steps are always the trial just evaluated
            n = evals["n"]
            step = torch.tensor(a, dtype=f0.dtype, device=f0.device)
            return LineSearchResult(x=xa, step=step, value=fa, grad=ga, n_fun=n, n_grad=n, success=torch.tensor(True))

        def phi(a: float) -> tuple[float, float]:
            xa = tree_axpy(a, d, x)
            fa, ga = value_and_grad(objective, xa, args)
            evals["n"] += 1
            last.clear()
            last[a] = (xa, fa, ga)
            fv = float(fa)
            if not math.isfinite(fv):
                return math.nan, math.nan
            return fv, float(tree_vdot(ga, d))

        if not (math.isfinite(phi0) and math.isfinite(dphi0)) or dphi0 >= 0:
            return fail()

        eps_f = self.noise * torch.finfo(f0.dtype).eps * abs(phi0)

        def armijo(a: float, fa: float, da: float) -> bool:
            # Sufficient decrease, exact or (approximate Wolfe) within the rounding allowance.
            if not math.isfinite(fa):
                return False
            if fa <= phi0 + self.c1 * a * dphi0:
                return True
            return fa <= phi0 + eps_f and da <= (2.0 * self.c1 - 1.0) * dphi0

        def curvature(da: float) -> bool:
            return abs(da) <= -self.c2 * dphi0

        def zoom(lo: float, f_lo: float, d_lo: float, hi: float, f_hi: float, d_hi: float) -> LineSearchResult:
            # Invariant (N&W Alg. 3.6): lo satisfies Armijo and has the lowest value seen
            # among such steps; d_lo * (hi - lo) < 0, so a strong Wolfe step lies between.
            # Values within eps_f of f_lo are ties lost in rounding: the derivative decides
            # (as in Hager & Zhang's approximate-Wolfe updates), not the noise.
            while evals["n"] < self.maxiter:
                width = hi - lo
                if abs(width) <= 1e-12 * max(abs(lo), abs(hi)) or width == 0:
                    return fail()  # bracket collapsed to rounding level
                t = None
                if math.isfinite(f_hi) and math.isfinite(d_hi):
                    t = _cubic_min(lo, f_lo, d_lo, hi, f_hi, d_hi)
                # Safeguard: stay 10% away from the ends so the bracket shrinks geometrically.
                left, right = min(lo, hi), max(lo, hi)
                margin = 0.1 * (right - left)
                if t is None or not (left + margin <= t <= right - margin):
                    t = 0.5 * (lo + hi)
                ft, dt = phi(t)
                if not armijo(t, ft, dt) or ft >= f_lo + eps_f:
                    hi, f_hi, d_hi = t, ft, dt
                else:
                    if curvature(dt):
                        return done(t)
                    if dt * (hi - lo) >= 0:
                        hi, f_hi, d_hi = lo, f_lo, d_lo
                    lo, f_lo, d_lo = t, ft, dt
            return fail()

        a_prev, f_prev, d_prev = 0.0, phi0, dphi0
        a = float(initial_step)
        first = True
        while evals["n"] < self.maxiter:
            fa, da = phi(a)
            if not armijo(a, fa, da) or (not first and fa >= f_prev + eps_f):
                return zoom(a_prev, f_prev, d_prev, a, fa, da)
            if curvature(da):
                return done(a)
            if da >= 0:
                return zoom(a, fa, da, a_prev, f_prev, d_prev)
            a_prev, f_prev, d_prev = a, fa, da
            a = 2.0 * a  # extrapolate: the step is still too short
            first = False
        return fail()
