"""Limited-memory Broyden's method on ``A x = b``: the inner solver's algorithm applied to
the root of ``A x - b`` (:func:`bilevel.solvers._broyden.broyden_init`), run on the driver.

C. G. Broyden, "A class of methods for solving nonlinear simultaneous equations",
Mathematics of Computation 19(92), 577-593, 1965; on linear systems the full-memory
method terminates in at most ``2 n`` steps (D. M. Gay, "Some convergence properties of
Broyden's method", SIAM J. Numer. Anal. 16(4), 623-630, 1979).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from .._iterate import iterate
from .._result import LinearSolveResult
from .._tree import tree_ravel, tree_unravel
from ._base import LinearSolver, MatVec, finish, initial_guess

if TYPE_CHECKING:
    from ..solvers._broyden import BroydenVariant

# The algorithm lives in ``bilevel.solvers._broyden``; it is imported when first used,
# because ``bilevel.solvers`` imports this package (NewtonCG's CG) while it initialises.


@dataclasses.dataclass(frozen=True)
class Broyden(LinearSolver):
    """Limited-memory Broyden's method on ``A x = b``, for any non-singular ``A``.

    The algorithm of :class:`bilevel.solvers.Broyden` (implemented once, there) applied
    to the root of ``g(x) = A x - b``: a quasi-Newton iteration ``x <- x - H g`` whose
    approximate inverse ``H ~ A^{-1}`` starts from ``I / initial_jacobian`` and gains one
    rank-one term per step, restarting from there after ``memory`` terms.  With the
    default ``initial_jacobian=1`` the first step is Richardson's ``x <- x + (b - A x)``,
    suited to the systems of the fixed-point backward, ``(I - J)^T u = v``, whose operator
    is near the identity; there ``FixedPoint(fn, linsolve=Broyden())`` solves the adjoint
    system to its tolerance, as GMRES does.  For a general ``A``, set ``initial_jacobian`` to the scale of its
    eigenvalues (with full memory the method terminates in ``2 n`` steps, Gay 1979; with
    a restart it may stagnate, reported as ``MAX_ITERATIONS``).

    One matvec per iteration; ``residual_norm`` is the true residual ``||b - A x||`` of
    the returned ``x`` (computed, not a recurrence).  A task whose matvec returned
    NaN/Inf stops with ``NONFINITE`` at its last finite iterate.  Batched mode: per-task
    inverse approximations, residuals and masks; converged tasks stop moving.  One host
    sync per iteration for a tolerance, none inside the loop for a fixed budget; under
    ``torch.func.vmap`` a tolerance solve runs all ``maxiter`` iterations (as CG, MINRES
    and Neumann do there).

    How long to iterate (``rtol``, ``atol``, ``maxiter`` or ``steps``): see
    :class:`~bilevel.linsolve.LinearSolver`; a fixed budget runs exactly ``steps``
    Broyden iterations, ``COMPLETED``.

    Args:
        memory: the number of stored rank-one pairs (>= 1) before a restart.
        variant: ``"good"`` or ``"bad"`` Broyden update.
        initial_jacobian: ``A`` is first approximated by ``initial_jacobian * I`` (a
            finite non-zero real).

    Examples:
        >>> import torch
        >>> from bilevel.linsolve import Broyden
        >>> A = torch.tensor([[1.2, 0.3], [-0.2, 0.9]], dtype=torch.float64)   # near I, not symmetric
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> res = Broyden(rtol=1e-10)(lambda v: A @ v, b)
        >>> res.status.name, torch.allclose(A @ res.x, b)
        ('SUCCESS', True)
    """

    memory: int = 20
    variant: BroydenVariant = "good"
    initial_jacobian: float = 1.0

    vmap_tolerance: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        from ..solvers._broyden import check_broyden

        check_broyden(type(self).__name__, self.memory, self.variant, self.initial_jacobian)

    def _solve(self, matvec: MatVec, b: Any, x0: Any, batched: bool, atol: Tensor) -> LinearSolveResult:
        from ..solvers._broyden import broyden_init

        def flat(tree: Any) -> Tensor:
            v = tree_ravel(tree, batched)
            return v if batched else v.reshape(1, -1)

        def unflat(v: Tensor) -> Any:
            return tree_unravel(b, v if batched else v.reshape(-1), batched)

        bf = flat(b)
        x, r = initial_guess(matvec, b, x0)
        thresh = torch.clamp(self._tol(b) * torch.linalg.vector_norm(bf, dim=-1), min=atol.reshape(-1))

        def residual(v: Tensor) -> Tensor:
            return flat(matvec(unflat(v))) - bf

        step, state, tally, _ = broyden_init(
            residual, flat(x), -flat(r), threshold=lambda _: thresh, memory=self.memory, variant=self.variant,
            initial_jacobian=self.initial_jacobian,
        )
        # A fixed budget (or any solve under vmap) reads nothing on the host inside the loop.
        state = iterate(step, state, tally, maxiter=self._maxiter(b, batched), fixed=self._syncless)
        rnorm = state["gnorm"]
        if not batched:  # one task: 0-d masks and norm, as the other solvers report them
            tally.stops = {k: m.reshape(()) for k, m in tally.stops.items()}
            tally.iters = tally.iters.reshape(())
            rnorm = rnorm.reshape(())
        return finish(unflat(state["x"]), rnorm, tally, self._exhausted, batched)
