"""BiCGSTAB for general (non-symmetric) operators (van der Vorst, 1992).

H. A. van der Vorst, "Bi-CGSTAB: a fast and smoothly converging variant of Bi-CG for the
solution of nonsymmetric linear systems", SIAM J. Sci. Stat. Comput. 13(2), 631-644, 1992.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from .._result import LinearSolveResult
from .._tree import tree_axpy, tree_norm, tree_vdot, tree_where, tree_zeros_like
from ._base import (
    LinearSolver,
    MatVec,
    codes_from_masks,
    finish,
    initial_guess,
    initial_status,
    merge_state,
    verify_claims,
    verify_final,
)

_TREES = ("r", "r_hat", "p", "v")
_SCALARS = ("rho", "alpha", "omega")


@dataclasses.dataclass(frozen=True)
class BiCGSTAB(LinearSolver):
    """Stabilised bi-conjugate gradient on ``A x = b`` for any non-singular ``A``.

    Short recurrences (constant memory: six tree-shaped vectors) and two matvecs per
    iteration: a Bi-CG step along ``p`` followed by a one-dimensional residual
    minimisation along ``s`` (the "stabilising" GMRES(1) step).  No optimality property
    holds, so convergence is not monotone and the method can *break down*:

    * ``rho = <r_hat, r> = 0`` or ``<r_hat, A p> = 0`` (the shadow residual became
      orthogonal to the Krylov space): the task stops at its last iterate;
    * ``omega = <t, s> / <t, t> = 0`` or ``t = A s = 0`` (the stabilising step makes no
      progress, e.g. ``A`` skew on ``s``, or ``A`` singular): the task keeps the half
      step ``x + alpha p`` and stops.

    Both end the task with status ``BREAKDOWN`` -- never a division by zero or a NaN.
    Breakdowns are detected on exact zeros; a near-breakdown shows up as a non-finite
    value (``NONFINITE``) or a stall (``MAX_ITERATIONS``).

    Convergence is detected on the recursively updated residual, then *verified* on the
    true residual ``||b - A x||`` (one extra matvec, not counted in ``iterations``): the
    two can drift apart in finite precision, and a task whose true residual misses the
    tolerance restarts from its current iterate with a fresh shadow residual.  The
    reported ``residual_norm`` is always the true residual of the returned ``x``.

    In batched mode every task has its own ``rho``, ``alpha``, ``omega``, breakdown and
    convergence masks; stopped tasks stop moving and the loop ends when all have stopped
    (one host sync per iteration for that test, plus one at each verification).

    Args:
        rtol, atol, maxiter: see :class:`~bilevel.linsolve.LinearSolver`.  ``maxiter``
            counts iterations (two matvecs each).
    """

    def _solve(self, matvec: MatVec, b: Any, x0: Any, batched: bool, atol: Tensor) -> LinearSolveResult:
        tol = self._tol(b)
        maxiter = self._maxiter(b, batched)

        bnorm = tree_norm(b, batched)
        thresh = torch.clamp(tol * bnorm, min=atol)
        zeros = tree_zeros_like(b)
        x, r0 = initial_guess(matvec, b, x0)
        rnorm = tree_norm(r0, batched)
        # ``converged`` is only ever set from a *true* residual (initial or verified).
        converged, nonfinite, iters = initial_status(rnorm, thresh)
        breakdown = torch.zeros_like(converged)
        pending = torch.zeros_like(converged)  # the recursive residual says converged; unverified
        active = ~(converged | nonfinite)
        st = _start(r0, rnorm, zeros)

        for _ in range(maxiter):
            # The one host sync per iteration: the stopping test (and whether to verify).
            any_active, any_pending = (bool(f) for f in torch.stack((active.any(), pending.any())).tolist())
            if any_pending:
                converged, nonfinite, rnorm, again, rtrue, rt = verify_claims(
                    matvec, b, x, pending, thresh, converged, nonfinite, rnorm, batched
                )
                st = merge_state(again, _start(rtrue, rt, zeros), st, _TREES, _SCALARS)
                active = active | again
                pending = torch.zeros_like(pending)
                any_active = bool(active.any())
            if not any_active:
                break

            act = active
            r, r_hat, p, v = st["r"], st["r_hat"], st["p"], st["v"]
            rho, alpha, omega = st["rho"], st["alpha"], st["omega"]
            one = torch.ones_like(rho)
            zero = torch.zeros_like(rho)

            rho_new = tree_vdot(r_hat, r, batched)
            # rho and omega of an active task are non-zero (a zero ends the task), so the
            # guards only keep the arithmetic of stopped tasks finite.
            beta = torch.where(
                act, (rho_new / torch.where(act, rho, one)) * (alpha / torch.where(act, omega, one)), zero
            )
            p = tree_axpy(beta, tree_axpy(-omega, v, p, batched), r, batched)  # r + beta (p - omega v)
            # Stopped tasks feed zeros to matvec, so that NaNs in their dead state stay out.
            p = tree_where(act, p, zeros)
            v = matvec(p)
            rv = tree_vdot(r_hat, v, batched)
            bad1 = act & ~(torch.isfinite(rho_new) & torch.isfinite(rv))
            brk1 = act & ~bad1 & ((rho_new == 0) | (rv == 0))
            s1 = act & ~bad1 & ~brk1  # tasks taking the Bi-CG half step
            alpha_new = torch.where(s1, rho_new / torch.where(s1, rv, one), zero)
            s = tree_where(s1, tree_axpy(-alpha_new, v, r, batched), zeros)
            snorm = tree_norm(s, batched)
            half = s1 & (snorm <= thresh)  # converged on the half step: no need for t
            s2 = s1 & ~half
            s_in = tree_where(s2, s, zeros)
            t = matvec(s_in)
            tt = tree_vdot(t, t, batched)
            ts = tree_vdot(t, s_in, batched)
            bad2 = s2 & ~(torch.isfinite(tt) & torch.isfinite(ts))
            brk2 = s2 & ~bad2 & ((tt == 0) | (ts == 0))
            s2 = s2 & ~bad2 & ~brk2  # tasks taking the stabilising step too
            omega_new = torch.where(s2, ts / torch.where(s2, tt, one), zero)

            x = tree_where(s1, tree_axpy(omega_new, s_in, tree_axpy(alpha_new, p, x, batched), batched), x)
            r = tree_where(s1, tree_where(s2, tree_axpy(-omega_new, t, s, batched), s), r)
            st = {
                "r": r,
                "r_hat": r_hat,
                "p": p,
                "v": v,
                "rho": torch.where(s1, rho_new, rho),
                "alpha": torch.where(s1, alpha_new, alpha),
                "omega": torch.where(s2, omega_new, omega),
            }
            iters = iters + s1.long()
            rn = tree_norm(r, batched)
            rnorm = torch.where(s1, rn, rnorm)
            bad3 = s1 & ~torch.isfinite(rn)
            nonfinite = nonfinite | bad1 | bad2 | bad3
            breakdown = breakdown | brk1 | brk2
            moving = s1 & ~bad2 & ~brk2 & ~bad3
            claim = moving & (rn <= thresh)
            pending = pending | claim
            active = moving & ~claim

        converged, rnorm = verify_final(matvec, b, x, pending, thresh, converged, rnorm, batched)

        codes = codes_from_masks(
            converged.shape, converged.device, self._exhausted, SUCCESS=converged, NONFINITE=nonfinite, BREAKDOWN=breakdown
        )
        return finish(x, rnorm, codes, iters, batched)


def _start(r0: Any, rnorm: Tensor, zeros: Any) -> dict[str, Any]:
    """Fresh BiCGSTAB state for the residual ``r0``; the shadow residual is ``r0`` itself."""
    one = torch.ones_like(rnorm)
    return {"r": r0, "r_hat": r0, "p": zeros, "v": zeros, "rho": one, "alpha": one, "omega": one}

