"""Anderson acceleration (type-II Anderson mixing) of a fixed-point iteration ``x = fn(x)``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._iterate import History, Outcome, Tally, iterate
from .._result import SolverResult, Status, result_from_codes
from .._tree import default_tol, tree_dtype, tree_flatten, tree_ravel, tree_unravel
from .._validate import check_int, check_real, check_tol
from ._base import Solver
from ._checks import leaves_like_x0


@dataclasses.dataclass(frozen=True)
class Anderson(Solver):
    """Find ``x = fn(x, *args)`` by Anderson acceleration (type-II Anderson mixing).

    Called exactly like :class:`FixedPointIteration`: ``solver(fn, x0, *args,
    batched=False)`` where ``fn`` maps a tree to a tree of the same structure and shapes.
    Keeps the last ``m`` iterates ``x_i`` with their images ``f_i = fn(x_i)`` and residuals
    ``g_i = f_i - x_i``; the weights ``alpha`` solve the regularised, constrained least
    squares problem ``min ||sum_i alpha_i g_i||^2 + lam ||alpha||^2`` subject to
    ``sum_i alpha_i = 1`` (``alpha = H^-1 1 / (1^T H^-1 1)`` with ``H = G G^T + lam I``,
    the solution of the bordered system), and the next iterate mixes the images:
    ``x <- (1 - t) sum_i alpha_i x_i + t sum_i alpha_i f_i`` (``t``: ``relaxation``,
    Walker & Ni's mixing parameter beta).  Invariant: with ``m = 1`` (a single weight, 1)
    this is :class:`FixedPointIteration` with the same ``relaxation``, iterate for iterate.
    On an affine map ``fn(x) = A x + b`` it is, without truncation and regularisation,
    essentially GMRES on ``(I - A) x = b`` (Walker & Ni 2011), so a contraction factor
    close to 1 costs it far fewer iterations than plain iteration.  It is not globally
    convergent on nonlinear maps: a failure is reported in the status, never silent.

    The stopping test, the statuses and the fields of the result are those of
    :class:`FixedPointIteration`: converged when
    ``||fn(x) - x|| <= max(rtol * max(1, ||x||), atol)``; ``SUCCESS``, ``MAX_ITERATIONS``,
    or ``NONFINITE`` when ``fn`` produced NaN/Inf (then the last iterate whose image was
    finite is returned); ``grad_norm`` is the final residual norm ``||fn(x) - x||`` of the
    returned ``x``; ``value`` is ``None``; ``n_fun`` counts evaluations of ``fn`` (one per
    step, a rejected non-finite one included, plus one at ``x0``).  In batched mode every quantity is per task, the
    weights are solved for all tasks at once, and a converged (or non-finite) task stops
    moving.  The iterates are handled as one flat vector per task; the small
    ``(m, m)`` systems are solved in at least float32, without a host sync (a task whose
    system has no finite solution takes a plain relaxed step instead).

    References:
        H. F. Walker and P. Ni, "Anderson acceleration for fixed-point iterations",
        SIAM J. Numer. Anal. 49(4), 2011.  S. Bai, J. Z. Kolter and V. Koltun, "Deep
        equilibrium models", NeurIPS 2019.

    Args:
        m: the memory: how many past iterates are mixed (>= 1; 1 is plain relaxed
            iteration).
        relaxation: ``t`` in (0, 1] (Walker & Ni's ``beta``; 1: undamped mixing of the
            images), as in :class:`FixedPointIteration` (docs/design.md §4).
        regularization: the Tikhonov weight ``lam`` of the least squares problem, relative
            to the mean squared residual norm of the history (>= 0; ``lam = regularization
            * mean_i ||g_i||^2``), so that the weights do not depend on the scale of ``x``.
            It keeps the Gram matrix of nearly parallel residuals invertible.
        rtol: residual tolerance in (0, 1); ``None`` means
            :func:`bilevel._tree.default_tol` of the dtype of ``x0`` (float64 ~2e-12,
            float32 ~6e-6).
        atol: absolute residual tolerance (>= 0, default 0).
        maxiter: the cap on iterations (>= 0).

    Examples:
        ``x = cos(x)`` (the Dottie number):

        >>> import torch
        >>> from bilevel.solvers import Anderson
        >>> res = Anderson(rtol=1e-12)(torch.cos, torch.zeros(1, dtype=torch.float64))
        >>> res.status.name, round(float(res.x), 9), res.iterations < 20
        ('SUCCESS', 0.739085133, True)
    """

    m: int = 5
    relaxation: float = 1.0
    regularization: float = 1e-8
    rtol: float | None = None
    atol: float = 0.0
    maxiter: int = 500

    supports_batched: ClassVar[bool] = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_int(name, "m", self.m, 1)
        check_real(name, "relaxation", self.relaxation, 0.0, 1.0, hi_open=False)
        check_real(name, "regularization", self.regularization, 0.0, lo_open=False)
        check_tol(name, self.rtol)
        check_real(name, "atol", self.atol, 0.0, lo_open=False)
        check_int(name, "maxiter", self.maxiter, 0)

    def __call__(
        self, fn: Callable[..., Any], x0: Any, *args: Any, batched: bool = False
    ) -> SolverResult:
        self._check_batched(batched)
        name = type(self).__name__
        leaves0, treedef = tree_flatten(x0)
        shapes = [leaf.shape for leaf in leaves0]
        dtype = tree_dtype(x0)
        if not dtype.is_floating_point:
            dtype = torch.get_default_dtype()
        tol = self.rtol if self.rtol is not None else default_tol(dtype)
        # The small least-squares systems: at least float32 (no half-precision solves).
        small = torch.promote_types(dtype, torch.float32)
        t, m, reg = self.relaxation, self.m, self.regularization

        # Flatten/unflatten once per call of fn. A single tensor (the usual case) is viewed,
        # not copied: this loop's cost per iteration is its number of small kernels.
        single = isinstance(x0, Tensor)

        def ravel(tree: Any) -> Tensor:
            if single:
                flat = tree.reshape(tree.shape[0], -1) if batched else tree.reshape(1, -1)
                return flat.to(dtype)
            flat = tree_ravel(tree, batched).to(dtype)
            return flat if batched else flat.unsqueeze(0)

        def unravel(x: Tensor) -> Any:
            if single:
                return x.view(shapes[0]).to(leaves0[0].dtype)
            return tree_unravel(x0, x if batched else x[0], batched)

        def apply(x: Tensor) -> Tensor:
            with torch.no_grad():
                y = fn(unravel(x), *args)
            if not (single and isinstance(y, Tensor) and y.shape == shapes[0]):  # the fast path is one comparison
                leaves_like_x0(name, "fn", y, treedef, shapes)
            return ravel(y).detach()

        def norm(v: Tensor) -> Tensor:
            return torch.linalg.vector_norm(v, dim=-1)

        def converged(res: Tensor, x: Tensor) -> Tensor:
            return res <= torch.clamp(tol * torch.clamp(norm(x), min=1.0), min=self.atol)

        x = ravel(x0).detach()
        fx = apply(x)
        counts = {"fun": 1}
        g0 = fx - x
        res = norm(g0)
        bad0 = ~torch.isfinite(res)
        tally = Tally(res, (Status.SUCCESS, Status.NONFINITE), {Status.SUCCESS: ~bad0 & converged(res, x), Status.NONFINITE: bad0})
        # The history: a ring of the last m iterates, images and residuals g = f - x (slot
        # k % m for iterate k), and the Gram matrix of the residuals, updated by one row per
        # iteration instead of recomputed (G G^T costs m times more).
        B, n = x.shape
        hist_x = x.new_zeros((B, m, n))
        hist_f = torch.zeros_like(hist_x)
        hist_g = hist_x.new_zeros((B, m, n), dtype=small)
        gram = hist_x.new_zeros((B, m, m), dtype=small)
        hist_x[:, 0] = x
        hist_f[:, 0] = fx
        hist_g[:, 0] = g0.to(small)
        gram[:, 0, 0] = (hist_g[:, 0] * hist_g[:, 0]).sum(-1)
        eyes = [torch.eye(v, dtype=small, device=x.device) for v in range(m + 1)]
        ones = [torch.ones((B, v), dtype=small, device=x.device) for v in range(m + 1)]
        # The plain step's weights (all on the newest slot), the fallback of a singular system.
        plains = [torch.eye(m, dtype=small, device=x.device)[j].expand(B, m) for j in range(m)]

        def weights(k: int) -> Tensor:
            """The mixing weights ``(B, nv)`` over the valid slots (every task has the
            same history length: a task that does not move has stopped for good)."""
            nv = min(k + 1, m)
            if nv == 1:
                return ones[1].to(dtype)
            h = gram[:, :nv, :nv]
            lam = reg * torch.diagonal(h, dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(small).tiny)
            # alpha = H^-1 1 / (1^T H^-1 1): the bordered system's solution, with H SPD.
            z, _ = torch.linalg.solve_ex(torch.addcmul(h, lam[:, None, None], eyes[nv]), ones[nv])
            alpha = z / z.sum(-1, keepdim=True)
            ok = torch.isfinite(alpha).all(-1, keepdim=True)
            return torch.where(ok, alpha, plains[k % m][:, :nv]).to(dtype)

        def step(st: tuple[Tensor, Tensor, Tensor, int], active: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor, int], Outcome]:
            x, fx, res, k = st
            nv = min(k + 1, m)
            alpha = weights(k)
            # bmm, not einsum: the same product with less Python around it.
            fbar = torch.bmm(alpha[:, None], hist_f[:, :nv])[:, 0]
            if t == 1.0:
                x_new = fbar
            else:
                xbar = torch.bmm(alpha[:, None], hist_x[:, :nv])[:, 0]
                x_new = xbar + t * (fbar - xbar)
            fx_new = apply(x_new)
            counts["fun"] += 1
            g_new = fx_new - x_new
            res_new = norm(g_new)
            bad = active & ~torch.isfinite(res_new)
            moved = active & ~bad  # a task whose new point is not finite keeps its last one
            x = torch.where(moved[:, None], x_new, x)
            fx = torch.where(moved[:, None], fx_new, fx)
            res = torch.where(moved, res_new, res)
            slot = (k + 1) % m
            hist_x[:, slot] = x
            hist_f[:, slot] = fx
            # The stored residual is the kept point's (a stopped task's is unchanged).
            hist_g[:, slot] = torch.where(moved[:, None], g_new, hist_g[:, (k % m)].to(dtype)).to(small)
            row = torch.bmm(hist_g, hist_g[:, slot, :, None])[..., 0]
            gram[:, slot, :] = row
            gram[:, :, slot] = row
            return (x, fx, res, k + 1), Outcome(moved=moved, stopped={Status.NONFINITE: bad, Status.SUCCESS: moved & converged(res, x)})

        # One host sync per iteration (the stopping test).
        history = History(res)
        x, _, res, _ = iterate(history.recording(step, lambda st: st[2]), (x, fx, res, 0), tally, maxiter=self.maxiter)
        out = unravel(x) if single else tree_unravel(x0, x if batched else x[0], batched)
        return result_from_codes(SolverResult, out, tally.codes(Status.MAX_ITERATIONS), tally.iters, batched,
                                 grad_norm=res, n_fun=counts["fun"], n_grad=0, residual_history=history.tensor(batched))
