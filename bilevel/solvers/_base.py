"""Common protocol of the inner solvers and the AD helpers they share.

An inner solver is an immutable configuration called as
``solver(objective, x0, *args, batched=False) -> SolverResult``.  It never knows whether
it is being differentiated: the layers call it under ``torch.no_grad()`` with detached
arguments, and it computes the derivatives it needs itself with :mod:`torch.func`
(whose transforms ignore an outer ``no_grad``).

Batched mode (``batched=True``): every leaf of ``x0`` has a leading task dimension ``B``
and ``objective(x, *args)`` returns a ``(B,)`` tensor of per-task values, task ``b``
depending only on slice ``b`` of ``x``.  Gradients are then those of the sum, which are
the per-task gradients; step sizes, convergence tests and statuses are per task.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._errors import (
    BilevelTypeError,
    BilevelValueError,
    NonFiniteError,
    NotDifferentiableError,
    UnsupportedError,
)
from .._iterate import Outcome, Tally
from .._result import SolverResult, Status, code, overall_status, solver_result
from .._transforms import any_wrapped, leaves_of
from .._tree import (
    tree_axpy,
    tree_detach,
    tree_flatten,
    tree_norm,
    tree_scale,
    tree_size,
    tree_unflatten,
    tree_vdot,
    tree_where,
)

Objective = Callable[..., Tensor]


@dataclasses.dataclass(frozen=True)
class Solver(abc.ABC):
    """Base class of the inner solvers (immutable, validated at construction)."""

    supports_batched: ClassVar[bool] = False

    @abc.abstractmethod
    def __call__(self, objective: Objective, x0: Any, *args: Any, batched: bool = False) -> SolverResult:
        """Minimise ``objective(x, *args)`` starting from ``x0`` (a tensor tree)."""

    def _check_batched(self, batched: bool) -> None:
        if batched and not self.supports_batched:
            raise UnsupportedError(f"{type(self).__name__} does not support batched (multi-task) solves")


def _total(objective: Objective, batched: bool) -> Callable[..., tuple[Tensor, Tensor]]:
    """``(scalar, values)``: a scalar whose gradient is the (per-task) gradient of ``objective``, and its values."""

    def f(x: Any, *args: Any) -> tuple[Tensor, Tensor]:
        v = objective(x, *args)
        if not isinstance(v, Tensor):
            raise BilevelTypeError(f"the objective must return a tensor, got {type(v).__name__}")
        if batched:
            if v.dim() != 1:
                raise BilevelValueError(f"in batched mode the objective must return a (B,) tensor, got shape {tuple(v.shape)}")
            return v.sum(), v
        if v.dim() != 0:
            raise BilevelValueError(f"the objective must return a scalar (0-d) tensor, got shape {tuple(v.shape)}")
        return v, v

    return f


def _inside_transform(x: Any, args: tuple) -> bool:
    """Whether a ``torch.func`` transform wraps ``x`` or a tensor argument."""
    return any_wrapped(leaves_of(x, *args))


def value_and_grad(
    objective: Objective, x: Any, args: tuple, batched: bool = False, transform: bool | None = None
) -> tuple[Tensor, Any]:
    """Objective value(s) and gradient tree at ``x`` (works under an outer ``no_grad``).

    Plain reverse mode (``torch.autograd.grad`` on a detached copy of ``x``) unless a
    ``torch.func`` transform encloses the call, where ``torch.func.grad_and_value`` is the
    only correct choice.  Why: in eager PyTorch the functorch transform costs a fixed
    ~0.2 ms per call, which dominated small problems -- measured on a d = 200 least-squares
    objective, 1 thread: 349 µs per gradient with ``torch.func`` against 157 µs with
    autograd (``benchmarks/small_problem.py``).  ``transform``: whether a transform
    encloses the call, if the caller already knows (a loop asks once per solve).
    """
    if transform if transform is not None else _inside_transform(x, args):
        g, (_, v) = torch.func.grad_and_value(_total(objective, batched), has_aux=True)(x, *args)
        return v.detach(), tree_detach(g)
    leaves, treedef = tree_flatten(x)
    v, gl = value_and_grad_leaves(objective, treedef, leaves, args, batched)
    return v, tree_unflatten(treedef, gl)


def value_and_grad_leaves(
    objective: Objective, treedef: Any, leaves: list[Tensor], args: tuple, batched: bool
) -> tuple[Tensor, list[Tensor]]:
    """:func:`value_and_grad` by plain reverse mode on the leaves of ``x`` (no transform
    encloses the call): the gradient leaves, without rebuilding trees a loop does not need."""
    with torch.enable_grad():
        xr = [t.detach().requires_grad_(True) for t in leaves]
        s, v = _total(objective, batched)(tree_unflatten(treedef, xr), *args)
        if not s.requires_grad:
            raise NotDifferentiableError(
                "the objective's value does not depend on x through torch operations (did it leave torch, e.g. "
                "through .numpy() or .item()?): a gradient-based solver cannot use it; use a derivative-free "
                "one such as ScipyMinimize('Nelder-Mead' or 'Powell')"
            )
        gs = torch.autograd.grad(s, xr, allow_unused=True)
    return v.detach(), [torch.zeros_like(t) if gi is None else gi for gi, t in zip(gs, leaves)]


def value(objective: Objective, x: Any, args: tuple, batched: bool = False) -> Tensor:
    """Objective value(s) without a gradient."""
    with torch.no_grad():
        return _total(objective, batched)(x, *args)[1].detach()


def hvp(objective: Objective, x: Any, v: Any, args: tuple, batched: bool = False) -> Any:
    """Hessian-vector product (block-diagonal over tasks when batched).

    Reverse-over-reverse (the gradient with a graph, then its VJP with ``v``) unless a
    ``torch.func`` transform encloses the call, where forward-over-reverse
    (``torch.func.jvp`` of ``torch.func.grad``) is used.  Why: in eager PyTorch a
    reverse-over-reverse product costs about 1.2-1.3 gradients against 4-10 for the
    forward-mode one (``benchmarks/README.md``), and forward mode's first use makes torch
    2.13 emit a ``torch.jit.script`` DeprecationWarning from its own decompositions.
    """
    if _inside_transform(x, args):

        def g(y: Any) -> Any:
            return torch.func.grad(lambda z: _total(objective, batched)(z, *args)[0])(y)

        return tree_detach(torch.func.jvp(g, (x,), (v,))[1])
    leaves, treedef = tree_flatten(x)
    vl, _ = tree_flatten(v)
    with torch.enable_grad():
        xr = [t.detach().requires_grad_(True) for t in leaves]
        s, _ = _total(objective, batched)(tree_unflatten(treedef, xr), *args)
        gs = torch.autograd.grad(s, xr, create_graph=True, allow_unused=True)
        pairs = [(gi, vi) for gi, vi in zip(gs, vl) if gi is not None and gi.requires_grad]
        hv: tuple[Tensor | None, ...] = (None,) * len(xr)
        if pairs:
            hv = torch.autograd.grad([p[0] for p in pairs], xr, grad_outputs=[p[1] for p in pairs], allow_unused=True)
    return tree_unflatten(treedef, [torch.zeros_like(t) if h is None else h.detach() for h, t in zip(hv, leaves)])


def check_finite_value(v: Tensor, iteration: int, solver: str) -> None:
    """Raise :class:`NonFiniteError` naming the iteration (and tasks) if ``v`` is not finite."""
    bad = ~torch.isfinite(v)
    if bool(bad.any()):
        where = ""
        if v.dim() == 1:
            where = f" for task(s) {bad.nonzero().reshape(-1).tolist()}"
        raise NonFiniteError(f"{solver}: the objective value became non-finite at iteration {iteration}{where}")


# ----------------------------------------------------------------------------------------
# Tolerances and finiteness checks shared by the solvers of this package.
# ----------------------------------------------------------------------------------------
def gradient_tol(dtype: torch.dtype) -> float:
    """Default tolerance on the gradient norm of the minimisers: ``eps**0.5`` of ``dtype``.

    float64: ~1.5e-8, float32: ~3.5e-4 (relative, as the solvers use it: ``||g|| <= rtol *
    max(1, ||g0||)``).  Not :func:`bilevel._tree.default_tol` (``eps**0.75``), which is not
    reliably reachable by line-search methods: near a minimiser a step decreases ``f`` by
    about ``||g||^2 / (2 L)``, which drops below the rounding of ``f`` once ``||g||`` is
    about ``sqrt(2 L eps |f|)`` -- ``eps**0.5`` at unit scale.  The rounding allowance of
    the line searches (module docstring) lets Newton-CG go further, but L-BFGS's curvature
    pairs ``(s, y)`` are then dominated by rounding too: measured on a float64 quadratic
    with condition number 1e3, L-BFGS (ours, and equally scipy's L-BFGS-B and
    ``torch.optim.LBFGS`` with exact textbook line searches) stalls between 1e-10 and 1e-7
    in the gradient norm.  ``eps**0.5`` is reached in all our test problems in float32 and
    float64 and leaves implicit gradients accurate to about ``rtol / lambda_min(H)``; pass
    a smaller ``rtol`` explicitly for more (Newton-CG reaches ~1e-12 in float64).
    """
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    return float(eps**0.5)


def check_finite_grad(gnorm: Tensor, iteration: int, solver: str) -> None:
    """Raise :class:`NonFiniteError` if a gradient (norm) is NaN/Inf, naming the iteration."""
    bad = ~torch.isfinite(gnorm)
    if bool(bad.any()):
        where = f" for task(s) {bad.nonzero().reshape(-1).tolist()}" if gnorm.dim() == 1 else ""
        raise NonFiniteError(f"{solver}: the gradient became non-finite at iteration {iteration}{where}")


def checked_grad_norm(f: Tensor, g: Any, iteration: int, solver: str, batched: bool = False) -> Tensor:
    """The (per-task) norm of ``g``, after checking that value ``f`` and gradient are finite.

    Raises:
        NonFiniteError: naming the iteration (and tasks) where ``f`` or ``g`` is NaN/Inf.
    """
    check_finite_value(f, iteration, solver)
    gnorm = tree_norm(g, batched)
    check_finite_grad(gnorm, iteration, solver)
    return gnorm


# ----------------------------------------------------------------------------------------
# Bookkeeping of the fixed-step first-order solvers (gradient descent, Adam).
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class GradientTracker:
    """Per-task value, gradient and health statistics of a monitored first-order solver.

    It is the state that the steps of gradient descent and Adam share under the driver
    (:func:`bilevel._iterate.iterate`), which owns the stop masks and iteration counts in
    its :class:`~bilevel._iterate.Tally`.  With a tolerance a task converges once
    ``||g|| <= rtol * max(1, ||g0||)`` and stops moving; without one every task runs all
    steps (the driver then makes no host sync).  The objective and gradient are evaluated
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
        cls, objective: Objective, x: Any, args: tuple, rtol: float | None, solver: str, batched: bool
    ) -> tuple[GradientTracker, Tally]:
        """Evaluate at the starting point ``x`` (iteration 0); the tracker and the driver's tally."""
        f, g = value_and_grad(objective, x, args, batched)
        gnorm = checked_grad_norm(f, g, 0, solver, batched)
        use_tol = rtol is not None
        thresh = (rtol if rtol is not None else 0.0) * torch.clamp(gnorm, min=1.0)
        tally = Tally(gnorm, ("SUCCESS", "NONFINITE"), {"SUCCESS": gnorm <= thresh} if use_tol else None)
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
        stopped = {"NONFINITE": bad}
        if self.use_tol:
            stopped["SUCCESS"] = moved & (self.gnorm <= self.thresh)
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
        res = solver_result(x, tally.codes(default), tally.iters, self.gnorm, self.f, batched, n_fun=self.n_eval, n_grad=self.n_eval)
        return dataclasses.replace(res, grad_norm_initial=self.gnorm0, grad_norm_monotone=self.monotone,
                                   value_monotone=self.descent)


# ----------------------------------------------------------------------------------------
# The lean path of the fixed-step first-order solvers: no tolerance, no monitoring.
# ----------------------------------------------------------------------------------------
Health = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def health_start(x: Any, batched: bool) -> Health:
    """The state of the on-device health statistics before the first gradient:
    ``(f_prev, gnorm_prev, gnorm0, monotone, descent)``, each 0-d or ``(B,)``.

    ``f_prev`` and ``gnorm_prev`` start at +inf (nothing to compare the first step with)
    and ``gnorm0`` at -1 ("not seen yet"), so that one pure update, :func:`health_update`,
    serves every step -- the same function in the eager loop and traced into a compiled step.
    """
    leaf = tree_flatten(x)[0][0]
    shape = leaf.shape[:1] if batched else ()
    inf = torch.full(shape, float("inf"), dtype=leaf.dtype, device=leaf.device)
    true = torch.ones(shape, dtype=torch.bool, device=leaf.device)
    return inf, inf, -torch.ones_like(inf), true, true


def health_update(state: Health, f: Tensor, g_leaves: list[Tensor], batched: bool) -> Health:
    """Fold the value(s) ``f`` and gradient ``g`` at the next iterate into the health state.

    The same comparisons as :class:`GradientTracker` (the monitored path): the gradient
    norm never rose between consecutive iterates (``monotone``), the objective never rose
    beyond a relative 1e-6 (``descent``).  Pure tensor code, no host read: it runs inside a
    fixed-step loop without a sync and can be traced by ``torch.compile``.
    """
    f_prev, gn_prev, gn0, mono, desc = state
    gn = tree_norm(g_leaves, batched)  # the norm GradientTracker takes
    f = f.to(gn.dtype)
    # f_prev = +inf on the first evaluation: inf + 1e-6 * inf = inf, so nothing counts as a rise.
    rise = f > f_prev + 1e-6 * f_prev.abs()
    return f, gn, torch.where(gn0 < 0, gn, gn0), mono & ~(gn > gn_prev), desc & ~rise


def health_copy(state: Health) -> Health:
    """A copy of the health state: a compiled step's outputs may live in buffers that its
    next call overwrites (CUDA graphs)."""
    f, gn, gn0, mono, desc = state
    return f.clone(), gn.clone(), gn0.clone(), mono.clone(), desc.clone()


class LeanLoop:
    """Bookkeeping of a fixed-step loop that must cost nothing beyond its gradients.

    Per step it adds the objective value(s) into one running sum on the device (one
    kernel; a NaN or Inf anywhere stays non-finite in the sum).  A NaN/Inf gradient at
    step ``k`` makes the iterate, hence the value at step ``k + 1`` or the returned point,
    non-finite.  :meth:`failed` makes the one host sync of the solve; only then does the
    solver replay the (deterministic) solve through the monitored path, which stops at the
    first non-finite value or gradient and raises :class:`NonFiniteError` naming the
    iteration and the tasks -- so a run that goes wrong costs twice, and a run that goes
    right costs nothing extra.  (The sum can overflow on values near the dtype's maximum:
    the replay then finds nothing wrong and its result is returned.)

    With ``health=True`` (a solver's ``monitor=True`` without a tolerance) each gradient
    also updates the on-device health statistics (:func:`health_update`: one norm per
    step), and the solver evaluates once more at the returned point, so that the result
    carries ``grad_norm``, ``value``, ``grad_norm_initial``, ``grad_norm_monotone`` and
    ``value_monotone`` exactly as the monitored path defines them -- still without a host
    sync inside the loop, and inside a compiled step if the solver compiles.
    """

    def __init__(self, x: Any, args: tuple, health: bool = False, batched: bool = False) -> None:
        self.transform = _inside_transform(x, args)  # once per solve, not per step
        self.fsum: Tensor | None = None
        self.n_eval = 0
        self.health: Health | None = health_start(x, batched) if health else None

    def value_and_grad(self, objective: Objective, treedef: Any, leaves: list[Tensor], args: tuple, batched: bool) -> list[Tensor]:
        """The gradient leaves at the point with these leaves; the value only joins the
        running sum (and the health statistics)."""
        if self.transform:
            f, g = value_and_grad(objective, tree_unflatten(treedef, leaves), args, batched, True)
            gl = tree_flatten(g)[0]
        else:
            f, gl = value_and_grad_leaves(objective, treedef, leaves, args, batched)
        self.n_eval += 1
        self.fsum = f if self.fsum is None else self.fsum + f
        if self.health is not None:
            self.health = health_update(self.health, f, gl, batched)
        return gl

    def failed(self, x: Any) -> bool:
        """Whether a value, the last gradient norm or the returned iterate is non-finite (the one host sync)."""
        checks = [torch.isfinite(t).all() for t in tree_flatten(x)[0]]
        if self.fsum is not None:
            checks.append(torch.isfinite(self.fsum).all())
        if self.health is not None:
            checks.append(torch.isfinite(self.health[1]).all())
        return not bool(torch.stack(checks).all())

    def result(self, x: Any, steps: int, batched: bool) -> SolverResult:
        """``COMPLETED`` after ``steps`` steps, with the health statistics if they were kept."""
        leaves = tree_flatten(x)[0]
        n = leaves[0].shape[0] if batched else 1
        iters = torch.full((n,), steps, dtype=torch.long, device=leaves[0].device)
        codes = torch.full((n,), code(Status.COMPLETED), dtype=torch.long, device=leaves[0].device)
        if self.health is None:
            return solver_result(x, codes, iters, None, None, batched, n_fun=self.n_eval, n_grad=self.n_eval)
        f, gn, gn0, mono, desc = self.health
        res = solver_result(x, codes, iters, gn, f, batched, n_fun=self.n_eval, n_grad=self.n_eval)
        return dataclasses.replace(res, grad_norm_initial=gn0, grad_norm_monotone=mono, value_monotone=desc)


# ----------------------------------------------------------------------------------------
# Is a stationary point a minimum?  (Lanczos on the Hessian: its extreme Ritz values.)
# ----------------------------------------------------------------------------------------
def negative_curvature(objective: Objective, x: Any, args: tuple, batched: bool, steps: int = 10) -> Tensor:
    """Per task: whether the Hessian at ``x`` has a clearly negative eigenvalue.

    ``min(steps, n)`` Lanczos steps from a fixed pseudo-random start (deterministic), then
    the smallest eigenvalue of the tridiagonal ``T`` (its Ritz values bracket the
    Hessian's spectrum from inside, and the extreme ones converge first).  "Clearly": below
    ``-sqrt(eps) * max|Ritz|`` -- a positive semi-definite Hessian gives Ritz values >= 0
    up to rounding.  Costs ``steps`` Hessian-vector products; a gradient test cannot tell a
    minimum from a saddle or a maximum (the gradient is zero at all three).
    """
    leaves, treedef = tree_flatten(x)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = tree_unflatten(treedef, [torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for t in leaves])
    q = tree_scale(1 / tree_norm(q, batched), q, batched)
    k = max(1, min(steps, tree_size(x, batched)))
    alphas, betas = [], []
    q_prev, beta = None, None
    for j in range(k):
        w = hvp(objective, x, q, args, batched)
        a = tree_vdot(q, w, batched)
        w = tree_axpy(-a, q, w, batched)
        if q_prev is not None and beta is not None:
            w = tree_axpy(-beta, q_prev, w, batched)
        alphas.append(a)
        if j == k - 1:
            break
        beta = tree_norm(w, batched)
        betas.append(beta)
        safe = torch.where(beta > 0, beta, torch.ones_like(beta))
        q_prev, q = q, tree_scale(1 / safe, w, batched)
    al = torch.stack(alphas, -1)  # (B, k) or (k,)
    tri = torch.diag_embed(al)
    if betas:
        be = torch.stack(betas, -1)
        tri = tri + torch.diag_embed(be, 1) + torch.diag_embed(be, -1)
    ritz = torch.linalg.eigvalsh(tri.to(torch.float64))
    scale = ritz.abs().amax(-1)
    eps = torch.finfo(leaves[0].dtype).eps
    return ritz[..., 0] < -(eps**0.5) * scale


def with_minimum_check(res: SolverResult, objective: Objective, args: tuple, batched: bool) -> SolverResult:
    """``res`` with the tasks whose returned point has negative curvature marked ``NOT_A_MINIMUM``
    (the ``check_minimum=True`` option of the first-order solvers)."""
    bad = negative_curvature(objective, res.x, args, batched)
    flags = bad.reshape(-1).tolist()
    if not any(flags):
        return res
    steps = max(1, min(10, tree_size(res.x, batched)))
    if batched and res.task_status is not None:
        statuses = tuple(Status.NOT_A_MINIMUM if f else st for f, st in zip(flags, res.task_status))
        return dataclasses.replace(res, task_status=statuses, status=overall_status(statuses), n_hvp=res.n_hvp + steps)
    return dataclasses.replace(res, status=Status.NOT_A_MINIMUM, n_hvp=res.n_hvp + steps)
