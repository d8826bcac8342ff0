"""Hessian-free (truncated) Newton-CG with a backtracking line search."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._autodiff import Objective, hvp, value_and_grad
from .._curvature import has_negative_curvature
from .._errors import BilevelValueError, NonFiniteError
from .._iterate import Outcome, Tally, iterate
from .._result import SolverResult, Status, result_from_codes
from .._tree import (
    tree_axpy,
    tree_detach,
    tree_dtype,
    tree_norm,
    tree_scale,
    tree_size,
    tree_vdot,
    tree_where,
    tree_zeros_like,
)
from .._validate import check_int, check_real, check_tol, warn_renamed
from ..linsolve import CG
from ._base import Solver
from ._checks import (
    MINIMUM_CHECK_ITERS,
    check_finite_grad,
    check_finite_value,
    checked_grad_norm,
    gradient_tol,
)
from ._linesearch import BacktrackingArmijo


@dataclasses.dataclass(frozen=True)
class NewtonCG(Solver):
    """Line-search Newton-CG using only Hessian-vector products.

    Each iteration approximately solves the Newton system ``H p = -g`` by conjugate
    gradient on Hessian-vector products (forward-over-reverse, never forming ``H``), then
    takes a backtracking Armijo step along ``p`` (Nocedal & Wright 2006, Alg. 7.1).  This
    is the "Hessian-free" inner solver of implicit MAML (Rajeswaran et al., "Meta-Learning
    with Implicit Gradients", NeurIPS 2019).

    The inner CG is truncated, which keeps ``p`` a descent direction even when ``H`` is
    indefinite: it stops

    * when the residual ``||H p + g|| <= eta_k ||g||`` with the forcing term
      ``eta_k = min(0.5, sqrt(||g||))`` (superlinear convergence, N&W eq. 7.3; the scipy
      choice) or the fixed ``linsolve.rtol`` if given (and ``linsolve.atol``),
    * on non-positive curvature ``d^T H d <= 0``, returning the last iterate — or the
      steepest-descent direction ``-g`` if that happens at the first CG iteration,
    * after ``linsolve.maxiter`` iterations (``linsolve.steps``: exactly that many, unless
      curvature stops it first).

    The outer loop stops with ``SUCCESS`` when ``||g|| <= max(rtol * max(1, ||g0||), atol)``,
    ``MAX_ITERATIONS`` after ``maxiter`` iterations, or ``LINESEARCH_FAILED`` (that task
    keeps its last point) when backtracking finds no sufficient decrease.  A NaN/Inf
    value, gradient or Hessian-vector product at an accepted point raises
    :class:`~bilevel.NonFiniteError` naming the iteration; NaN/Inf at trial points of the
    line search only shortens the step.

    Batched mode: per-task CG (own step sizes, residuals, stopping masks), per-task
    Armijo steps and per-task convergence; a task that stopped does not move.  Each
    batched objective / gradient / HVP evaluation counts once in ``n_fun``/``n_grad``/
    ``n_hvp``.

    Args:
        rtol: relative gradient-norm tolerance in (0, 1); ``None`` picks
            :func:`~bilevel.solvers._checks.gradient_tol` of the dtype of ``x0``
            (``eps**0.5``).
        maxiter: the cap on Newton iterations (>= 0).
        cg_maxiter: deprecated; use ``linsolve=CG(maxiter=...)``.
        cg_rtol: deprecated; use ``linsolve=CG(rtol=...)``.
        line_search: a :class:`BacktrackingArmijo` instance (its first trial is the full
            Newton step ``a = initial_step``, 1 by default).
        atol: absolute gradient-norm tolerance (>= 0, default 0).
        linsolve: a :class:`bilevel.linsolve.CG` configuring the truncated CG of each
            Newton iteration: ``maxiter`` (``None``: ``20 * n`` as scipy, ``n`` the unknowns
            per task), ``rtol`` (``None``: the forcing term above), ``atol``, or ``steps``
            (a fixed number of CG iterations).  Only CG: the inner solve must stop at
            negative curvature keeping its last iterate, which is CG's truncation rule.

    Examples:
        >>> import torch
        >>> from bilevel.linsolve import CG
        >>> from bilevel.solvers import NewtonCG
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
        >>> res = NewtonCG(linsolve=CG(maxiter=5))(lambda x: 0.5 * x @ A @ x - x.sum(), torch.zeros(2))
        >>> res.status.name, [round(v, 4) for v in res.x.tolist()]
        ('SUCCESS', [0.2, 0.4])
    """

    rtol: float | None = None
    maxiter: int = 50
    cg_maxiter: int | None = None
    cg_rtol: float | None = None
    line_search: BacktrackingArmijo = BacktrackingArmijo()
    atol: float = 0.0
    linsolve: CG | None = None

    supports_batched: ClassVar[bool] = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_tol(name, self.rtol)
        check_real(name, "atol", self.atol, 0.0, lo_open=False)
        check_int(name, "maxiter", self.maxiter, 0)
        if self.linsolve is not None and not isinstance(self.linsolve, CG):
            raise BilevelValueError(
                f"{name}: linsolve must be a bilevel.linsolve.CG (the truncated inner solve stops at negative "
                f"curvature keeping its last iterate, CG's rule), got {self.linsolve!r}"
            )
        if self.linsolve is not None and self.linsolve.preconditioner is not None:
            raise BilevelValueError(
                f"{name}: the truncated CG of each Newton step takes no preconditioner (its negative-curvature test "
                "is on the Hessian itself); give linsolve=CG(maxiter=..., rtol=..., atol=... or steps=...)"
            )
        if self.cg_maxiter is not None or self.cg_rtol is not None:
            if self.linsolve is not None:
                raise BilevelValueError(f"{name}: give linsolve=CG(...) or the deprecated cg_maxiter/cg_rtol, not both")
            if self.cg_maxiter is not None:
                check_int(name, "cg_maxiter", self.cg_maxiter, 1)
            if self.cg_rtol is not None:
                check_real(name, "cg_rtol", self.cg_rtol, 0.0, 1.0)
            warn_renamed(name, "cg_maxiter/cg_rtol", "linsolve=CG(maxiter=..., rtol=...)")
            object.__setattr__(self, "linsolve", CG(maxiter=self.cg_maxiter, rtol=self.cg_rtol))
            object.__setattr__(self, "cg_maxiter", None)
            object.__setattr__(self, "cg_rtol", None)
        if not isinstance(self.line_search, BacktrackingArmijo):
            raise BilevelValueError(f"{name}: line_search must be a BacktrackingArmijo instance, got {self.line_search!r}")

    def __call__(self, objective: Objective, x0: Any, *args: Any, batched: bool = False) -> SolverResult:
        self._check_batched(batched)
        name = type(self).__name__
        tol = self.rtol if self.rtol is not None else gradient_tol(tree_dtype(x0))
        cg = self.linsolve if self.linsolve is not None else CG()
        cg_fixed = cg.steps is not None
        cg_maxiter = cg.steps or cg.maxiter or 20 * tree_size(x0, batched)
        x = tree_detach(x0)
        f, g = value_and_grad(objective, x, args, batched)
        counts = {"fun": 1, "grad": 1, "hvp": 0, "iter": 0}
        gnorm = checked_grad_norm(f, g, 0, name, batched)
        thresh = torch.clamp(tol * torch.clamp(gnorm, min=1.0), min=self.atol)
        tally = Tally(gnorm, (Status.NOT_A_MINIMUM, Status.SUCCESS, Status.LINESEARCH_FAILED), {Status.SUCCESS: gnorm <= thresh})

        def step(st: tuple[Any, Tensor, Any, Tensor], active: Tensor) -> tuple[tuple[Any, Tensor, Any, Tensor], Outcome]:
            x, f, g, gnorm = st
            k = int(counts["iter"]) + 1
            counts["iter"] = k
            p = self._direction(objective, x, g, gnorm, active, args, batched, cg, cg_maxiter, cg_fixed, counts, k, name)
            ls = self.line_search(objective, x, p, args, f0=f, g0=g, batched=batched, active=active)
            counts["fun"] += ls.n_fun
            ls_failed = active & ~ls.success
            moved = active & ~ls_failed
            x = tree_where(moved, ls.x, x)
            f_new, g_new = value_and_grad(objective, x, args, batched)
            counts["fun"] += 1
            counts["grad"] += 1
            check_finite_value(f_new, k, name)
            f = torch.where(moved, f_new, f)
            g = tree_where(moved, g_new, g)
            gnorm = torch.where(moved, tree_norm(g_new, batched), gnorm)
            check_finite_grad(gnorm, k, name)
            out = Outcome(moved=moved, stopped={Status.LINESEARCH_FAILED: ls_failed, Status.SUCCESS: moved & (gnorm <= thresh)})
            return (x, f, g, gnorm), out

        # One host sync per Newton iteration (the stopping test).
        x, f, g, gnorm = iterate(step, (x, f, g, gnorm), tally, maxiter=self.maxiter)

        # A zero gradient is a minimum, a saddle or a maximum: never claim a minimum where
        # the Hessian has negative curvature (e.g. started exactly at a maximum, where
        # Newton-CG takes no step at all).
        tally.mark(Status.NOT_A_MINIMUM, tally.stops[Status.SUCCESS] & has_negative_curvature(objective, x, args, batched, MINIMUM_CHECK_ITERS))
        counts["hvp"] += max(1, min(MINIMUM_CHECK_ITERS, tree_size(x, batched)))
        return result_from_codes(
            SolverResult, x, tally.codes(Status.MAX_ITERATIONS), tally.iters, batched, grad_norm=gnorm, value=f,
            n_fun=counts["fun"], n_grad=counts["grad"], n_hvp=counts["hvp"],
        )

    def _direction(
        self,
        objective: Objective,
        x: Any,
        g: Any,
        gnorm: Tensor,
        active: Tensor,
        args: tuple,
        batched: bool,
        cg: CG,
        cg_maxiter: int,
        cg_fixed: bool,
        counts: dict,
        k: int,
        name: str,
    ) -> Any:
        """Truncated CG on ``H p = -g`` (N&W Alg. 7.1), per task; inactive tasks get ``p = 0``.

        Written out rather than reusing :class:`~bilevel.linsolve.CG` because on negative
        curvature it must return the *last iterate* (or ``-g``), not stop with a status.
        """
        if cg_fixed:
            cg_thresh = torch.zeros_like(gnorm)  # a fixed budget: only curvature stops it early
        else:
            eta = torch.full_like(gnorm, cg.rtol) if cg.rtol is not None else torch.clamp(gnorm.sqrt(), max=0.5)
            cg_thresh = torch.clamp(eta * gnorm, min=cg.atol)
        zero = torch.zeros_like(gnorm)
        z = tree_zeros_like(g)  # CG iterate (the Newton direction being built)
        r = g  # residual of H z + g
        d = tree_scale(-1.0, g)
        rr = gnorm * gnorm
        running = active.clone()
        steepest = torch.zeros_like(active)  # negative curvature at the first CG iteration
        for j in range(cg_maxiter):
            if not bool(running.any()):  # one host sync per CG iteration (the test)
                break
            hd = hvp(objective, x, d, args, batched)
            counts["hvp"] += 1
            dhd = tree_vdot(d, hd, batched)
            if not bool(torch.isfinite(torch.where(running, dhd, zero)).all()):
                bad = running & ~torch.isfinite(dhd)
                where = f" for task(s) {bad.nonzero().reshape(-1).tolist()}" if batched else ""
                raise NonFiniteError(f"{name}: a Hessian-vector product became non-finite at iteration {k}{where}")
            neg = running & (dhd <= 0)
            if j == 0:
                steepest = neg
            running = running & ~neg
            alpha = torch.where(running, rr / torch.where(running, dhd, torch.ones_like(dhd)), zero)
            # tree_where (not just alpha = 0): a stopped task's z and r must not pick up
            # 0 * inf = NaN from its (unused) direction or product.
            z = tree_where(running, tree_axpy(alpha, d, z, batched), z)
            r = tree_where(running, tree_axpy(alpha, hd, r, batched), r)
            rr_new = torch.where(running, tree_vdot(r, r, batched), rr)
            running = running & ~(rr_new.sqrt() <= cg_thresh)
            beta = torch.where(running, rr_new / torch.where(rr > 0, rr, torch.ones_like(rr)), zero)
            d = tree_axpy(beta, d, tree_scale(-1.0, r), batched)
            rr = rr_new
        p = tree_where(steepest, tree_scale(-1.0, g), z)
        return tree_where(active, p, tree_zeros_like(p))
