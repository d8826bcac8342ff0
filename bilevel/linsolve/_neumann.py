"""Truncated Neumann series (Richardson iteration) for ``A x = b``.

The series ``A^{-1} = alpha * sum_k (I - alpha A)^k`` is the approximation of the inverse
Hessian used by implicit-differentiation hyper-gradient methods (e.g. Lorraine, Vicol &
Duvenaud, "Optimizing millions of hyperparameters by implicit differentiation", AISTATS
2020); its partial sums are the iterates of Richardson's iteration (1910).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._iterate import Outcome, iterate
from .._result import LinearSolveResult, Status
from .._tree import tree_axpy, tree_norm, tree_where
from .._validate import check_real
from ._base import LinearSolver, MatVec, finish, initial_guess, start_tally

DEFAULT_NEUMANN_TERMS = 50
"""Default ``maxiter`` (number of series terms) of :class:`Neumann`."""


@dataclasses.dataclass(frozen=True)
class Neumann(LinearSolver):
    """Truncated Neumann series ``x = x0 + alpha * sum_{k<K} (I - alpha A)^k r0``.

    With ``M = I - alpha A`` and ``r0 = b - A x0`` (``x0 = 0`` by default), the partial sum
    after ``K`` terms has residual exactly

        ``b - A x_K = r0 - (I - M) sum_{k<K} M^k r0 = M^K r0``,

    i.e. the residual is the next term of the series.  The loop therefore keeps only the
    current term ``t_k = M^k r0`` (one matvec per term: ``t_{k+1} = t_k - alpha A t_k``),
    adds ``alpha t_k`` to ``x`` and reads the residual norm ``||t_{k+1}||`` off for free.

    Validity: the series converges for every ``b`` iff the spectral radius of
    ``I - alpha A`` is below 1 (for a symmetric positive definite ``A``: iff
    ``0 < alpha < 2 / lambda_max(A)``), geometrically at that rate.  ``alpha`` is the
    step size of the equivalent Richardson iteration ``x <- x + alpha (b - A x)``, i.e.
    the unscaled series applied to the equivalent system ``(alpha A) x = alpha b``: pick
    it about ``1 / lambda_max(A)`` -- e.g. the inner learning rate when ``A`` is the
    Hessian of the inner loss.  A divergent series is never reported as a success: it
    ends with ``NONFINITE`` if the terms overflow, else with ``MAX_ITERATIONS``.

    Defaults: ``maxiter`` (the number of terms, i.e. matvecs) is
    :data:`DEFAULT_NEUMANN_TERMS` = 50 rather than the base class's ``10 n``, because the
    series is meant as a cheap fixed-budget approximation; the status says whether that
    budget reached the tolerance.  Set ``maxiter`` explicitly for more terms.

    ``iterations`` is the number of terms summed; ``residual_norm`` is ``||M^K r0||``
    computed by the recursion (equal to the true residual up to rounding).  Batched mode:
    per-task residuals and convergence masks; converged tasks stop adding terms.

    How long to iterate (``rtol``, ``atol``, ``maxiter`` or ``steps``): see
    :class:`~bilevel.linsolve.LinearSolver`.

    Args:
        alpha: positive, finite scale of the series (see above).

    Examples:
        With ``alpha`` below ``2 / lambda_max(A)`` (here ``lambda_max < 4.7``) the series
        converges, geometrically:

        >>> import torch
        >>> from bilevel.linsolve import Neumann
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> res = Neumann(alpha=0.2, rtol=1e-8, maxiter=200)(lambda v: A @ v, b)
        >>> res.status.name, torch.allclose(A @ res.x, b)
        ('SUCCESS', True)

        A fixed budget of a few terms (an approximation, reported ``COMPLETED``):

        >>> Neumann(alpha=0.2, steps=5)(lambda v: A @ v, b).status.name
        'COMPLETED'
    """

    alpha: float = 1.0

    vmap_tolerance: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_real("Neumann", "alpha", self.alpha, 0.0)

    def _maxiter(self, b: Any, batched: bool) -> int:
        if self.steps is not None:
            return self.steps
        return self.maxiter if self.maxiter is not None else DEFAULT_NEUMANN_TERMS

    def _solve(self, matvec: MatVec, b: Any, x0: Any, batched: bool, atol: Tensor) -> LinearSolveResult:
        alpha = float(self.alpha)
        thresh = torch.clamp(self._tol(b) * tree_norm(b, batched), min=atol)
        x, r = initial_guess(matvec, b, x0)
        rnorm = tree_norm(r, batched)
        tally = start_tally(rnorm, thresh, (Status.SUCCESS, Status.NONFINITE))

        def step(st: dict[str, Any], active: Tensor) -> tuple[dict[str, Any], Outcome]:
            x, r = st["x"], st["r"]
            # Stopped tasks get a zero step: their x and residual stay put.
            a = torch.where(active, torch.full_like(st["rnorm"], alpha), torch.zeros_like(st["rnorm"]))
            Ar = matvec(r)
            x_new = tree_axpy(a, r, x, batched)  # add the current term alpha * M^k r0
            r_new = tree_axpy(-a, Ar, r, batched)  # next term M^{k+1} r0 = the new residual
            rn = tree_norm(r_new, batched)
            bad = active & ~torch.isfinite(rn)
            move = active & ~bad
            # A task whose next term overflowed keeps its last finite iterate and residual.
            new = {"x": tree_where(move, x_new, x), "r": tree_where(move, r_new, r), "rnorm": torch.where(move, rn, st["rnorm"])}
            return new, Outcome(moved=move, stopped={Status.NONFINITE: bad, Status.SUCCESS: move & (rn <= thresh)})

        state = iterate(step, {"x": x, "r": r, "rnorm": rnorm}, tally, maxiter=self._maxiter(b, batched), fixed=self._syncless)
        return finish(state["x"], state["rnorm"], tally, self._exhausted, batched)
