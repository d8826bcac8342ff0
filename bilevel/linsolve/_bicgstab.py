"""BiCGSTAB for general (non-symmetric) operators (van der Vorst, 1992).

H. A. van der Vorst, "Bi-CGSTAB: a fast and smoothly converging variant of Bi-CG for the
solution of nonsymmetric linear systems", SIAM J. Sci. Stat. Comput. 13(2), 631-644, 1992.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from .._iterate import Outcome, iterate
from .._result import LinearSolveResult, Status
from .._tree import tree_axpy, tree_norm, tree_vdot, tree_where, tree_zeros_like
from ._base import (
    _UNDER_VMAP,
    LinearSolver,
    MatVec,
    finish,
    initial_guess,
    merge_state,
    residual_verifier,
    start_tally,
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

    How long to iterate (``rtol``, ``atol``, ``maxiter`` or ``steps``): see
    :class:`~bilevel.linsolve.LinearSolver`.

    Args:
        maxiter: as in :class:`~bilevel.linsolve.LinearSolver`; it counts iterations (two
            matvecs each).

    Examples:
        >>> import torch
        >>> from bilevel.linsolve import BiCGSTAB
        >>> N = torch.tensor([[2.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)   # not symmetric
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> res = BiCGSTAB(rtol=1e-10)(lambda v: N @ v, b)
        >>> res.status.name, torch.allclose(N @ res.x, b)
        ('SUCCESS', True)
    """

    def _solve(self, matvec: MatVec, b: Any, x0: Any, batched: bool, atol: Tensor) -> LinearSolveResult:
        thresh = torch.clamp(self._tol(b) * tree_norm(b, batched), min=atol)
        zeros = tree_zeros_like(b)
        x, r0 = initial_guess(matvec, b, x0)
        rnorm = tree_norm(r0, batched)
        # SUCCESS is only ever set from a *true* residual (initial or verified).
        tally = start_tally(rnorm, thresh, (Status.SUCCESS, Status.NONFINITE, Status.BREAKDOWN))
        state = {"x": x, "rnorm": rnorm, **_start(r0, rnorm, zeros)}

        def restart(st: dict[str, Any], again: Tensor) -> dict[str, Any]:
            return merge_state(again, _start(st["rtrue"], st["rt"], zeros), st, _TREES, _SCALARS)

        def step(st: dict[str, Any], act: Tensor) -> tuple[dict[str, Any], Outcome]:
            x, r, r_hat, p, v = st["x"], st["r"], st["r_hat"], st["p"], st["v"]
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
            rn = tree_norm(r, batched)
            bad3 = s1 & ~torch.isfinite(rn)
            moving = s1 & ~bad2 & ~brk2 & ~bad3
            new = {
                **st,
                "x": x,
                "rnorm": torch.where(s1, rn, st["rnorm"]),
                "r": r,
                "r_hat": r_hat,
                "p": p,
                "v": v,
                "rho": torch.where(s1, rho_new, rho),
                "alpha": torch.where(s1, alpha_new, alpha),
                "omega": torch.where(s2, omega_new, omega),
            }
            out = Outcome(
                moved=s1, stopped={Status.NONFINITE: bad1 | bad2 | bad3, Status.BREAKDOWN: brk1 | brk2}, claimed=moving & (rn <= thresh)
            )
            return new, out

        # The recursive residual drifts from the true one: every claim is verified, even
        # with a fixed budget (the reported residual is always the true one) -- except under
        # vmap, where nothing can be read on the host and no status is reported anyway.
        state = iterate(
            step, state, tally, maxiter=self._maxiter(b, batched), fixed=_UNDER_VMAP.get() is not None,
            verifier=residual_verifier(matvec, b, thresh, batched, restart),
        )
        return finish(state["x"], state["rnorm"], tally, self._exhausted, batched)


def _start(r0: Any, rnorm: Tensor, zeros: Any) -> dict[str, Any]:
    """Fresh BiCGSTAB state for the residual ``r0``; the shadow residual is ``r0`` itself."""
    one = torch.ones_like(rnorm)
    return {"r": r0, "r_hat": r0, "p": zeros, "v": zeros, "rho": one, "alpha": one, "omega": one}

