"""Conjugate gradient for symmetric positive definite operators (Hestenes & Stiefel, 1952)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._errors import BilevelTypeError, BilevelValueError, NonFiniteError
from .._iterate import Outcome, iterate
from .._result import LinearSolveResult, Status
from .._tree import tree_axpy, tree_flatten, tree_norm, tree_vdot, tree_where
from ._base import LinearSolver, MatVec, finish, initial_guess, start_tally


@dataclasses.dataclass(frozen=True)
class CG(LinearSolver):
    """Preconditioned conjugate gradient on ``A x = b`` with ``A`` symmetric positive definite.

    The invariant it relies on is ``p^T A p > 0`` for every search direction.  When an
    iteration finds ``p^T A p <= 0`` (the operator is indefinite, e.g. the Hessian of a
    non-convex loss with too small a proximal weight) the task stops at its last iterate
    with status ``NEGATIVE_CURVATURE`` — it never reports success on such a system and
    never divides by a non-positive curvature.

    The reported residual norm is the recursively updated one (as in scipy), which
    equals ``||b - A x||`` up to rounding.

    In batched mode every task has its own step sizes, residual and convergence mask; a
    converged task stops moving and the loop ends when all tasks have stopped (one host
    sync per iteration, for that test).  With a fixed budget (``steps``) there is no such
    test and no host sync in the loop: stopped tasks are masked on the device.

    How long to iterate (``rtol``, ``atol``, ``maxiter`` or ``steps``): see
    :class:`~bilevel.linsolve.LinearSolver`.

    Args:
        preconditioner: optional ``r -> M^{-1} r`` on trees, with ``M`` SPD.

    Examples:
        >>> import torch
        >>> from bilevel.linsolve import CG
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> res = CG(rtol=1e-10)(lambda v: A @ v, b)
        >>> res.status.name, torch.allclose(A @ res.x, b)
        ('SUCCESS', True)

        On an indefinite operator CG stops instead of reporting success (use ``MINRES``):

        >>> res = CG()(lambda v: torch.tensor([1.0, -2.0]) * v, torch.ones(2))
        >>> res.status.name
        'NEGATIVE_CURVATURE'
    """

    preconditioner: Callable[[Any], Any] | None = None

    requires_symmetric: ClassVar[bool] = True
    requires_positive_definite: ClassVar[bool] = True
    vmap_tolerance: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.preconditioner is not None and not callable(self.preconditioner):
            raise BilevelTypeError("CG: preconditioner must be a callable r -> M^{-1} r")

    @property
    def traceable(self) -> bool:
        """A fixed budget without a preconditioner (whose first output is checked on the host)."""
        # Not ``super().traceable``: torch 2.13's dynamo evaluates that to true for any CG.
        return self.steps is not None and self.preconditioner is None

    def _solve(self, matvec: MatVec, b: Any, x0: Any, batched: bool, atol: Tensor) -> LinearSolveResult:
        precond = self.preconditioner or (lambda r: r)
        if self.preconditioner is not None:
            precond = _checked_preconditioner(self.preconditioner)
        # init
        thresh = torch.clamp(self._tol(b) * tree_norm(b, batched), min=atol)
        x, r = initial_guess(matvec, b, x0)
        z = precond(r)
        rnorm = tree_norm(r, batched)
        state = {"x": x, "r": r, "p": z, "rz": tree_vdot(r, z, batched), "rnorm": rnorm}
        tally = start_tally(rnorm, thresh, (Status.SUCCESS, Status.NONFINITE, Status.NEGATIVE_CURVATURE))

        def step(st: dict[str, Any], active: Tensor) -> tuple[dict[str, Any], Outcome]:
            p, rz = st["p"], st["rz"]
            Ap = matvec(p)
            pAp = tree_vdot(p, Ap, batched)
            bad = active & ~torch.isfinite(pAp)
            neg = active & ~bad & (pAp <= 0)
            move = active & ~(bad | neg)
            alpha = torch.where(move, rz / torch.where(move, pAp, torch.ones_like(pAp)), torch.zeros_like(pAp))
            # Only moving tasks move: a stopped task keeps its last finite iterate (0 * NaN = NaN).
            x = tree_where(move, tree_axpy(alpha, p, st["x"], batched), st["x"])
            r = tree_where(move, tree_axpy(-alpha, Ap, st["r"], batched), st["r"])
            rnorm = torch.where(move, tree_norm(r, batched), st["rnorm"])
            z = precond(r)
            rz_new = tree_vdot(r, z, batched)
            beta = torch.where(move, rz_new / torch.where(rz == 0, torch.ones_like(rz), rz), torch.zeros_like(rz))
            new = {"x": x, "r": r, "p": tree_axpy(beta, p, z, batched), "rz": torch.where(move, rz_new, rz), "rnorm": rnorm}
            stopped = {
                Status.NONFINITE: bad | (move & ~torch.isfinite(rnorm)),
                Status.NEGATIVE_CURVATURE: neg,
                Status.SUCCESS: move & (rnorm <= thresh),
            }
            return new, Outcome(moved=move, stopped=stopped)

        state = iterate(step, state, tally, maxiter=self._maxiter(b, batched), fixed=self._syncless)
        return finish(state["x"], state["rnorm"], tally, self._exhausted, batched)


def _checked_preconditioner(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``fn`` whose first output is checked against its input: same tree structure, shapes
    and dtypes, and finite.  A wrong shape would otherwise broadcast into the iterate and
    grow it a dimension per iteration (and hang with the default ``maxiter``)."""
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    state = {"checked": False}

    def wrapped(r: Any) -> Any:
        z = fn(r)
        if state["checked"]:
            return z
        rl, rd = tree_flatten(r)
        try:
            zl, zd = tree_flatten(z)
        except (TypeError, ValueError) as e:
            raise BilevelTypeError(f"CG: the preconditioner {name} did not return a tensor tree: {e}") from None
        if zd != rd:
            raise BilevelValueError(f"CG: the preconditioner {name} returned a tree of structure {zd!r}; its input's is {rd!r}")
        for zi, ri in zip(zl, rl):
            if zi.shape != ri.shape or zi.dtype != ri.dtype:
                raise BilevelValueError(
                    f"CG: the preconditioner {name} returned a leaf of shape {tuple(zi.shape)} and dtype {zi.dtype} "
                    f"for an input of shape {tuple(ri.shape)} and dtype {ri.dtype}; it must keep both"
                )
        if not bool(torch.stack([torch.isfinite(t).all() for t in zl]).all()):
            raise NonFiniteError(f"CG: the preconditioner {name} returned NaN or Inf for a finite residual")
        state["checked"] = True
        return z

    return wrapped
