"""Direct dense solve: materialise ``A`` from matvecs, then LU (reference / small problems)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from .._iterate import Tally
from .._result import LinearSolveResult, Status
from .._tree import batch_size, tree_dtype, tree_ravel, tree_unravel
from ._base import LinearSolver, MatVec, finish


@dataclasses.dataclass(frozen=True)
class Dense(LinearSolver):
    """Materialise ``A`` with ``n`` matvecs on the unit vectors and solve it by LU.

    Valid for any operator; the cost is ``n`` matvecs, ``O(n^2)`` memory and ``O(n^3)``
    time (``n`` unknowns per task), so it is meant for small problems and as the reference
    the iterative solvers are tested against.  It has no tolerance or iteration cap:
    ``Dense()`` takes no arguments (``rtol``, ``atol`` and ``maxiter`` are not constructor
    parameters, and passing them is a ``TypeError``).

    Statuses (per task):

    * ``SUCCESS``: ``A`` is numerically non-singular and the solution is finite; the
      reported ``residual_norm`` is the true ``||b - A x||`` (with the materialised ``A``).
      A zero right-hand side gives ``x = 0`` and ``SUCCESS`` without looking at ``A``
      (no matvec at all when every task has ``b = 0``).
    * ``BREAKDOWN``: ``A`` is numerically singular, by numpy's ``matrix_rank`` rule
      ``sigma_min <= n * eps * sigma_max``; nothing is raised.
    * ``NONFINITE``: ``A`` or ``b`` holds a NaN/Inf, or the solve overflowed.

    A failed task returns ``x0`` (zeros by default) -- a finite value -- together with its
    status; otherwise ``x0`` is ignored (a direct solve needs no initial guess).
    ``iterations`` is always 0 (there are none; the cost is ``n`` matvecs).

    Batched mode: the ``n`` matvecs are applied to batched unit vectors (the same ``e_i``
    for every task), giving the ``(B, n, n)`` stack of per-task matrices, solved by one
    batched LU; statuses are per task.

    Examples:
        >>> import torch
        >>> from bilevel.linsolve import Dense
        >>> N = torch.tensor([[2.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)
        >>> res = Dense()(lambda v: N @ v, torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> res.status.name, res.iterations, [round(v, 6) for v in res.x.tolist()]
        ('SUCCESS', 0, [0.0, 1.0])
        >>> Dense()(lambda v: 0 * v, torch.ones(2)).status.name       # a singular operator
        'BREAKDOWN'
    """

    # A direct solve has no tolerance and no iteration cap: keep the inherited fields
    # (so that code reading ``solver.rtol`` still works) but out of ``__init__`` and repr.
    rtol: float | None = dataclasses.field(default=None, init=False, repr=False)
    atol: float = dataclasses.field(default=0.0, init=False, repr=False)
    maxiter: int | None = dataclasses.field(default=None, init=False, repr=False)
    steps: int | None = dataclasses.field(default=None, init=False, repr=False)

    def _solve(self, matvec: MatVec, b: Any, x0: Any, batched: bool, atol: Tensor) -> LinearSolveResult:
        dtype = tree_dtype(b)
        # Work on (B, n) in both modes (B = 1 when not batched).
        bf = tree_ravel(b, batched).to(dtype)
        nb = batch_size(b) if batched else 1
        bf = bf.reshape(nb, -1)
        n = bf.shape[1]
        if x0 is None:
            fallback = torch.zeros_like(bf)
        else:
            fallback = tree_ravel(x0, batched).to(dtype).reshape(nb, n)

        def tree_of(flat: torch.Tensor) -> Any:
            return tree_unravel(b, flat if batched else flat[0], batched)

        bnorm = torch.linalg.vector_norm(bf, dim=1)
        zero_b = bnorm == 0
        if bool(zero_b.all()):  # A x = 0 is solved by x = 0 whatever A is: no matvec needed
            tally = Tally(bnorm, (Status.SUCCESS,), {Status.SUCCESS: zero_b})
            return finish(tree_of(torch.zeros_like(bf)), bnorm, tally, Status.MAX_ITERATIONS, batched)

        # Column i of every task's matrix is A e_i (the matvec is block-diagonal over tasks).
        cols = []
        for i in range(n):
            e = torch.zeros_like(bf)
            e[:, i] = 1
            cols.append(tree_ravel(matvec(tree_of(e)), batched).reshape(nb, n).to(dtype))
        A = torch.stack(cols, dim=-1)  # (B, n, n)

        # The factorisations in at least float32 (half-precision SVD and LU are not implemented
        # on every device); singularity is still judged at the operator's own precision.
        work = torch.promote_types(dtype, torch.float32)
        eye = torch.eye(n, dtype=work, device=bf.device).expand(nb, n, n)
        finite = torch.isfinite(A).flatten(1).all(1) & torch.isfinite(bf).all(1)
        A_fin = torch.where(finite[:, None, None], A.to(work), eye)
        sv = torch.linalg.svdvals(A_fin)  # descending
        singular = finite & (sv[:, -1] <= n * torch.finfo(dtype).eps * sv[:, 0])
        # Solve every task (identity stand-ins for the unusable ones), then pick per task.
        A_use = torch.where((finite & ~singular)[:, None, None], A.to(work), eye)
        xs, info = torch.linalg.solve_ex(A_use, bf.to(work).unsqueeze(-1))
        xs = xs.squeeze(-1).to(dtype)
        x_ok = torch.isfinite(xs).all(1) & (info == 0)

        success = zero_b | (finite & ~singular & x_ok)
        nonfinite = ~zero_b & (~finite | (~singular & ~x_ok))
        breakdown = ~zero_b & singular
        x = torch.where(zero_b[:, None], torch.zeros_like(bf), torch.where(success[:, None], xs, fallback))
        rnorm = torch.linalg.vector_norm(bf - (A @ x.unsqueeze(-1)).squeeze(-1), dim=1)
        # Not iterative: the driver's tally only carries the direct solve's per-task outcome.
        tally = Tally(bnorm, (Status.SUCCESS, Status.NONFINITE, Status.BREAKDOWN), {Status.SUCCESS: success, Status.NONFINITE: nonfinite, Status.BREAKDOWN: breakdown})
        return finish(tree_of(x), rnorm, tally, Status.MAX_ITERATIONS, batched)
