"""MINRES for symmetric, possibly indefinite operators (Paige & Saunders, 1975).

C. C. Paige and M. A. Saunders, "Solution of sparse indefinite systems of linear
equations", SIAM J. Numer. Anal. 12(4), 617-629, 1975.  The recurrences below follow
their Fortran ``MINRES`` (and ``scipy.sparse.linalg.minres``) without a preconditioner.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._iterate import Outcome, iterate
from .._result import LinearSolveResult, Status
from .._tree import (
    tree_axpy,
    tree_norm,
    tree_scale,
    tree_vdot,
    tree_where,
    tree_zeros_like,
)
from ._base import (
    LinearSolver,
    MatVec,
    finish,
    initial_guess,
    merge_state,
    residual_verifier,
    start_tally,
)

# Names of the tree-valued and scalar-valued parts of the MINRES state (see ``_start``).
_TREES = ("r1", "r2", "y", "w", "w2")
_SCALARS = ("beta", "oldb", "dbar", "epsln", "phibar", "cs", "sn")


@dataclasses.dataclass(frozen=True)
class MINRES(LinearSolver):
    """Minimum-residual Krylov method on ``A x = b`` with ``A`` symmetric (maybe indefinite).

    Lanczos builds an orthonormal basis of the Krylov space with a three-term recurrence
    (valid only because ``A = A^T``), and Givens rotations update the QR factors of the
    tridiagonal matrix so that ``x_k`` minimises ``||b - A x||`` over ``x0 + K_k``.  Unlike
    CG it needs no positive definiteness: it is the solver for Hessians of non-convex
    inner problems (saddle points, indefinite KKT systems).  On a non-symmetric operator
    the recurrence is meaningless; the true-residual check below still prevents a false
    ``SUCCESS`` but the method will usually stall (use GMRES or BiCGSTAB).

    Convergence is detected on the recurrence estimate ``phibar`` of ``||r_k||`` (free),
    then *verified* on the true residual ``||b - A x_k||`` (one extra matvec), because in
    finite precision the estimate can run below the attainable accuracy.  A task whose
    true residual misses the tolerance restarts from its current iterate.  The reported
    ``residual_norm`` is always the true residual of the returned ``x``.

    Breakdown: ``gamma_k = 0`` (the projected tridiagonal is singular, which only happens
    when ``A`` is singular on the Krylov space) ends the task with ``BREAKDOWN``.  A
    non-finite Lanczos coefficient ends it with ``NONFINITE`` at its last finite iterate.

    In batched mode every task has its own Lanczos coefficients, rotations and
    convergence mask; stopped tasks stop moving and the loop ends when all have stopped
    (one host sync per iteration for that test, plus one at each verification).  With a
    fixed budget (``steps``) there is neither: the loop runs ``steps`` Lanczos steps with
    stopped tasks masked on the device, and the reported residual is the recurrence's.

    ``iterations`` counts Lanczos steps (one matvec each); verification matvecs are not
    counted.

    How long to iterate (``rtol``, ``atol``, ``maxiter`` or ``steps``): see
    :class:`~bilevel.linsolve.LinearSolver`.

    Args:

    Examples:
        A symmetric indefinite system (eigenvalues 1 and -2), where CG would stop:

        >>> import torch
        >>> from bilevel.linsolve import MINRES
        >>> d = torch.tensor([1.0, -2.0], dtype=torch.float64)
        >>> res = MINRES(rtol=1e-10)(lambda v: d * v, torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> res.status.name, [round(v, 6) for v in res.x.tolist()]
        ('SUCCESS', [1.0, -1.0])
    """

    requires_symmetric: ClassVar[bool] = True
    vmap_tolerance: ClassVar[bool] = True

    def _solve(self, matvec: MatVec, b: Any, x0: Any, batched: bool, atol: Tensor) -> LinearSolveResult:
        thresh = torch.clamp(self._tol(b) * tree_norm(b, batched), min=atol)
        zeros = tree_zeros_like(b)
        x, r0 = initial_guess(matvec, b, x0)
        rnorm = tree_norm(r0, batched)
        # SUCCESS is only ever set from a *true* residual (initial or verified): a step's
        # estimate only makes a claim, which the driver verifies.
        tally = start_tally(rnorm, thresh, (Status.SUCCESS, Status.NONFINITE, Status.BREAKDOWN))
        state = {"x": x, "rnorm": rnorm, **_start(r0, rnorm, zeros)}

        def restart(st: dict[str, Any], again: Tensor) -> dict[str, Any]:
            # Restart the tasks whose estimate was too optimistic from where they are.
            return merge_state(again, _start(st["rtrue"], st["rt"], zeros), st, _TREES, _SCALARS)

        def step(st: dict[str, Any], act: Tensor) -> tuple[dict[str, Any], Outcome]:
            beta, oldb = st["beta"], st["oldb"]
            one = torch.ones_like(beta)
            # Active tasks have beta > 0 (beta == 0 forces phibar == 0, i.e. a claim);
            # the guards only keep the arithmetic of stopped tasks finite.
            safe_beta = torch.where(act & (beta > 0), beta, one)
            v = tree_scale(1 / safe_beta, st["y"], batched)
            # Stopped tasks feed zeros to matvec, so that a NaN left in their (dead)
            # state cannot reach a matvec that is only block-diagonal in exact terms.
            v = tree_where(act, v, zeros)
            y = matvec(v)
            c1 = torch.where(act & (oldb != 0), beta / torch.where(oldb != 0, oldb, one), torch.zeros_like(beta))
            y = tree_axpy(-c1, st["r1"], y, batched)  # - beta_k v_{k-1}
            alfa = tree_vdot(v, y, batched)
            y = tree_axpy(-torch.where(act, alfa / safe_beta, torch.zeros_like(beta)), st["r2"], y, batched)
            r1, r2 = st["r2"], y
            beta_new = tree_norm(y, batched)

            # Apply the previous rotation to the new tridiagonal column, build the next one.
            cs, sn, dbar, phibar = st["cs"], st["sn"], st["dbar"], st["phibar"]
            oldeps = st["epsln"]
            delta = cs * dbar + sn * alfa
            gbar = sn * dbar - cs * alfa
            epsln = sn * beta_new
            dbar_new = -cs * beta_new
            gamma = torch.hypot(gbar, beta_new)

            bad = act & ~(torch.isfinite(alfa) & torch.isfinite(beta_new) & torch.isfinite(gamma))
            brk = act & ~bad & (gamma == 0)
            move = act & ~bad & ~brk
            safe_gamma = torch.where(move, gamma, one)
            cs_new = gbar / safe_gamma
            sn_new = beta_new / safe_gamma
            phi = cs_new * phibar
            phibar_new = sn_new * phibar
            denom = torch.where(move, 1 / safe_gamma, torch.zeros_like(gamma))
            # w_k = (v_k - eps_k w_{k-2} - delta_k w_{k-1}) / gamma_k
            w_new = tree_scale(denom, v, batched)
            w_new = tree_axpy(-denom * delta, st["w"], w_new, batched)
            w_new = tree_axpy(-denom * oldeps, st["w2"], w_new, batched)

            def keep(new: Tensor, old: Tensor) -> Tensor:
                return torch.where(move, new, old)

            est = phibar_new.abs()
            new = {
                **st,
                "x": tree_where(move, tree_axpy(phi, w_new, st["x"], batched), st["x"]),
                "rnorm": keep(est, st["rnorm"]),
                "r1": r1,
                "r2": r2,
                "y": y,
                "w": w_new,
                "w2": st["w"],
                "beta": keep(beta_new, beta),
                "oldb": keep(beta, oldb),
                "dbar": keep(dbar_new, dbar),
                "epsln": keep(epsln, oldeps),
                "phibar": keep(phibar_new, phibar),
                "cs": keep(cs_new, cs),
                "sn": keep(sn_new, sn),
            }
            return new, Outcome(moved=move, stopped={Status.NONFINITE: bad, Status.BREAKDOWN: brk}, claimed=move & (est <= thresh))

        # With a fixed budget a claim (a zero residual estimate: the Krylov space is
        # exhausted, x solves the system in exact arithmetic) is accepted unverified.
        state = iterate(
            step, state, tally, maxiter=self._maxiter(b, batched), fixed=self._syncless,
            verifier=residual_verifier(matvec, b, thresh, batched, restart),
        )
        return finish(state["x"], state["rnorm"], tally, self._exhausted, batched)


def _start(r0: Any, rnorm: Tensor, zeros: Any) -> dict[str, Any]:
    """Fresh MINRES state for the residual ``r0`` (Paige & Saunders' initialisation)."""
    z = torch.zeros_like(rnorm)
    return {
        "r1": r0,
        "r2": r0,
        "y": r0,
        "w": zeros,
        "w2": zeros,
        "beta": rnorm,
        "oldb": z,  # oldb == 0 marks the first Lanczos step (no beta_k v_{k-1} term)
        "dbar": z,
        "epsln": z,
        "phibar": rnorm,
        "cs": -torch.ones_like(rnorm),
        "sn": z,
    }

