"""Restarted GMRES for general (non-symmetric) operators (Saad & Schultz, 1986).

Y. Saad and M. H. Schultz, "GMRES: a generalized minimal residual algorithm for solving
nonsymmetric linear systems", SIAM J. Sci. Stat. Comput. 7(3), 856-869, 1986.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from .._iterate import Outcome, iterate
from .._result import LinearSolveResult, Status
from .._tree import (
    tree_axpy,
    tree_dtype,
    tree_flatten,
    tree_norm,
    tree_scale,
    tree_size,
    tree_sub,
    tree_vdot,
    tree_where,
    tree_zeros_like,
)
from .._validate import check_int
from ._base import LinearSolver, MatVec, finish, initial_guess, start_tally


@dataclasses.dataclass(frozen=True)
class GMRES(LinearSolver):
    """Restarted GMRES(m) on ``A x = b`` for any non-singular ``A`` (no symmetry needed).

    Each cycle runs up to ``m = min(restart, n)`` Arnoldi steps (modified Gram-Schmidt on
    tensor trees) from the current residual, reduces the Hessenberg matrix to triangular
    form with Givens rotations -- which gives the residual norm of the least-squares
    iterate for free after every step -- and then updates ``x`` by solving the small
    triangular system.  Within a cycle the iterate minimises ``||b - A x||`` over
    ``x_0 + K_j(A, r_0)``; restarting bounds memory (``m + 1`` tree-shaped vectors) at the
    price of possible stagnation on hard problems (reported as ``MAX_ITERATIONS``).

    Every cycle ends with the true residual ``||b - A x||`` (one extra matvec, not counted
    in ``iterations``): a task is ``SUCCESS`` only if that true residual meets the
    tolerance, and ``residual_norm`` is always the true residual of the returned ``x``.

    ``maxiter`` counts Arnoldi steps (matvecs) over all cycles, not cycles; the last cycle
    is shortened so that exactly ``maxiter`` steps are taken when the tolerance is never
    met.  Breakdown: a zero diagonal after rotation (``A`` singular on the Krylov space)
    ends the task with ``BREAKDOWN`` after applying the columns built before it; a
    "happy" breakdown (``h_{j+1,j} = 0``, the exact solution lies in the Krylov space)
    is simply convergence.

    Batched mode: every task has its own Hessenberg matrix, rotations and convergence
    mask (the small triangular solves are one batched ``(B, j, j)`` solve per cycle); a
    task whose estimate meets the tolerance leaves the cycle and stops moving.  One
    host sync per Arnoldi step, for the stopping test.

    How long to iterate (``rtol``, ``atol``, ``maxiter`` or ``steps``): see
    :class:`~bilevel.linsolve.LinearSolver`.

    Args:
        restart: Krylov dimension per cycle (``m``), an int >= 1.

    Examples:
        >>> import torch
        >>> from bilevel.linsolve import GMRES
        >>> N = torch.tensor([[2.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)   # not symmetric
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> res = GMRES(rtol=1e-10)(lambda v: N @ v, b)
        >>> res.status.name, torch.allclose(N @ res.x, b)
        ('SUCCESS', True)
    """

    restart: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("GMRES", "restart", self.restart, 1)

    def _solve(self, matvec: MatVec, b: Any, x0: Any, batched: bool, atol: Tensor) -> LinearSolveResult:
        tol = self._tol(b)
        maxiter = self._maxiter(b, batched)
        n = tree_size(b, batched)
        dtype = tree_dtype(b)
        device = tree_flatten(b)[0][0].device

        # Per-task scalars are kept as (B,) tensors -- (1,) when not batched -- so that the
        # Hessenberg bookkeeping is the same in both modes; ``coef`` turns one back into
        # what the tree helpers expect (a 0-d tensor when not batched).
        def vdot(u: Any, v: Any) -> Tensor:
            return tree_vdot(u, v, batched).reshape(-1)

        def norm(u: Any) -> Tensor:
            return tree_norm(u, batched).reshape(-1)

        def coef(t: Tensor) -> Tensor:
            return t if batched else t.reshape(())

        thresh = torch.clamp(tol * norm(b), min=atol)
        zeros = tree_zeros_like(b)
        x, r = initial_guess(matvec, b, x0)
        rnorm = norm(r)
        tally = start_tally(rnorm, thresh, (Status.SUCCESS, Status.NONFINITE, Status.BREAKDOWN))
        syncless = self._syncless
        # ``total``: Arnoldi steps taken by the batch as a whole (bounded by maxiter).
        state: dict[str, Any] = {"x": x, "r": r, "rnorm": rnorm, "total": 0}

        def cycle(st: dict[str, Any], active: Tensor) -> tuple[dict[str, Any], Outcome]:
            """One restart cycle: up to ``restart`` Arnoldi steps, then the least-squares update."""
            x, r, rnorm, total = st["x"], st["r"], st["rnorm"], st["total"]
            m = min(self.restart, n, maxiter - total)
            one = torch.ones_like(rnorm)
            zero = torch.zeros_like(rnorm)
            # Active tasks have rnorm > thresh >= 0; the guard only protects stopped ones.
            inv = 1 / torch.where(active & (rnorm > 0), rnorm, one)
            basis = [tree_where(coef(active), tree_scale(coef(inv), r, batched), zeros)]
            g = [torch.where(active, rnorm, zero)]  # rotated right-hand side beta * e_1
            cols: list[list[Tensor]] = []  # rotated Hessenberg columns (upper triangular R)
            cs: list[Tensor] = []
            sn: list[Tensor] = []
            ncol = torch.zeros_like(tally.iters)  # columns of R each task actually built
            nonfinite = torch.zeros_like(active)
            breakdown = torch.zeros_like(active)
            live = active

            for j in range(m):
                if j > 0 and not syncless and not bool(live.any()):  # host sync: the per-step stopping test
                    break
                w = matvec(basis[j])
                # Modified Gram-Schmidt: orthogonalise against each basis vector in turn
                # (more stable than classical GS in finite precision).
                h: list[Tensor] = []
                for i in range(j + 1):
                    hij = vdot(w, basis[i])
                    w = tree_axpy(coef(-hij), basis[i], w, batched)
                    h.append(hij)
                hnext = norm(w)
                # Apply the earlier rotations to the new column, then the new rotation
                # that annihilates h_{j+1,j}.
                for i in range(j):
                    hi, hi1 = h[i], h[i + 1]
                    h[i] = cs[i] * hi + sn[i] * hi1
                    h[i + 1] = -sn[i] * hi + cs[i] * hi1
                gamma = torch.hypot(h[j], hnext)
                finite = torch.isfinite(torch.stack(h + [hnext])).all(0)
                bad = live & ~finite
                brk = live & finite & (gamma == 0)
                step = live & ~bad & ~brk
                safe_gamma = torch.where(step, gamma, one)
                c = torch.where(step, h[j] / safe_gamma, one)
                s = torch.where(step, hnext / safe_gamma, zero)
                h[j] = gamma
                cs.append(c)
                sn.append(s)
                cols.append([torch.where(step, hi, zero) for hi in h])
                gj = g[j]
                g[j] = torch.where(step, c * gj, gj)
                g.append(torch.where(step, -s * gj, zero))

                ncol = ncol + step.long()
                total += 1
                nonfinite = nonfinite | bad
                breakdown = breakdown | brk
                # |g_{j+1}| is the residual norm of the least-squares iterate: a task whose
                # estimate meets the tolerance leaves the cycle (verified below).
                live = step & (g[j + 1].abs() > thresh)
                safe_h = torch.where(live & (hnext > 0), hnext, one)
                basis.append(tree_where(coef(live), tree_scale(coef(1 / safe_h), w, batched), zeros))

            # Solve R y = g per task.  Columns a task did not build are replaced by identity
            # columns with a zero right-hand side, so their y entries are exactly 0.
            k = len(cols)
            R = torch.stack(
                [torch.stack(col + [zero] * (k - len(col)), dim=-1) for col in cols], dim=-1
            )  # (B, k, k): R[:, i, j] for i <= j
            unused = torch.arange(k, device=device).unsqueeze(0) >= ncol.unsqueeze(1)  # (B, k)
            R = R + torch.diag_embed(unused.to(R.dtype))
            rhs = torch.where(unused, torch.zeros_like(R[:, 0, :]), torch.stack(g[:k], dim=-1))
            # At least float32: the k x k system is tiny, and half-precision triangular solves
            # are not implemented on every device (CPU).
            small = torch.promote_types(dtype, torch.float32)
            y = torch.linalg.solve_triangular(R.to(small), rhs.unsqueeze(-1).to(small), upper=True).squeeze(-1).to(dtype)
            for j in range(k):
                x = tree_axpy(coef(y[:, j]), basis[j], x, batched)

            # The true residual decides convergence and restarts the next cycle.
            r = tree_sub(b, matvec(x))
            rtrue = norm(r)
            stopped = {
                Status.NONFINITE: nonfinite | (active & ~torch.isfinite(rtrue)),
                Status.BREAKDOWN: breakdown,
                Status.SUCCESS: active & (rtrue <= thresh),
            }
            new = {"x": x, "r": r, "rnorm": torch.where(active, rtrue, rnorm), "total": total}
            return new, Outcome(moved=ncol, stopped=stopped, exhausted=total >= maxiter)

        # A budget of Arnoldi steps, counted by the cycles themselves (``exhausted``).  With a
        # fixed budget (or under vmap) no value is read on the host: finished tasks are
        # masked on the device and every cycle runs its Arnoldi steps.
        state = iterate(cycle, state, tally, maxiter=None, fixed=syncless)
        return finish(state["x"], state["rnorm"], tally, self._exhausted, batched)
