"""Limited-memory BFGS with a strong Wolfe line search (Nocedal & Wright 2006, Alg. 7.4/7.5)."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._autodiff import Objective, value_and_grad
from .._errors import BilevelValueError
from .._iterate import Outcome, Tally, iterate
from .._result import SolverResult, Status, result_from_codes
from .._tree import (
    tree_axpy,
    tree_detach,
    tree_dtype,
    tree_norm,
    tree_scale,
    tree_sub,
    tree_vdot,
)
from .._validate import check_int, check_real, check_tol
from ._base import Solver
from ._checks import checked_grad_norm, gradient_tol
from ._linesearch import StrongWolfe


@dataclasses.dataclass(frozen=True)
class LBFGS(Solver):
    """L-BFGS: quasi-Newton directions from the last ``history`` curvature pairs.

    The direction ``d = -H g`` comes from the two-loop recursion (Nocedal & Wright 2006,
    Alg. 7.4) with the initial scaling ``H0 = (s^T y / y^T y) I`` (eq. 7.20); a strong
    Wolfe line search (c2 = 0.9) guarantees ``s^T y > 0``, so ``H`` stays positive
    definite and ``d`` is a descent direction.  A pair whose curvature ``s^T y`` is not
    safely positive (roundoff) is skipped rather than stored.

    Stops with ``SUCCESS`` when ``||g|| <= max(rtol * max(1, ||g0||), atol)``, ``MAX_ITERATIONS``
    after ``maxiter`` iterations, or ``LINESEARCH_FAILED`` (returning the last accepted
    point) when the line search finds no acceptable step even along steepest descent: a
    failure with a non-empty memory first clears the memory and retries (as L-BFGS-B).  A NaN/Inf value or gradient at
    an accepted point (in practice: at ``x0``) raises :class:`~bilevel.NonFiniteError`;
    NaN/Inf at line-search trial points only shortens the step.  Unbatched only.

    Args:
        rtol: gradient-norm tolerance in (0, 1); ``None`` picks
            :func:`~bilevel.solvers._checks.gradient_tol` of the dtype of ``x0``
            (``eps**0.5``).
        maxiter: the cap on iterations (>= 0).
        history: number of stored curvature pairs (>= 1).
        line_search: a :class:`StrongWolfe` instance.
        atol: absolute gradient-norm tolerance (>= 0, default 0).

    Examples:
        >>> import torch
        >>> from bilevel.solvers import LBFGS
        >>> res = LBFGS(rtol=1e-6)(lambda x: ((x - 2.0) ** 2).sum() + x.prod(), torch.zeros(2))
        >>> res.status.name, [round(v, 3) for v in res.x.tolist()]
        ('SUCCESS', [1.333, 1.333])
    """

    rtol: float | None = None
    maxiter: int = 100
    history: int = 10
    line_search: StrongWolfe = StrongWolfe()
    atol: float = 0.0

    supports_batched: ClassVar[bool] = False

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_tol(name, self.rtol)
        check_real(name, "atol", self.atol, 0.0, lo_open=False)
        check_int(name, "maxiter", self.maxiter, 0)
        check_int(name, "history", self.history, 1)
        if not isinstance(self.line_search, StrongWolfe):
            raise BilevelValueError(f"{name}: line_search must be a StrongWolfe instance, got {self.line_search!r}")

    def __call__(self, objective: Objective, x0: Any, *args: Any, batched: bool = False) -> SolverResult:
        self._check_batched(batched)
        name = type(self).__name__
        tol = self.rtol if self.rtol is not None else gradient_tol(tree_dtype(x0))
        x = tree_detach(x0)
        f, g = value_and_grad(objective, x, args)
        gnorm = checked_grad_norm(f, g, 0, name)
        thresh = torch.clamp(tol * torch.clamp(gnorm, min=1.0), min=self.atol)
        pairs: collections.deque = collections.deque(maxlen=self.history)  # (s, y, 1 / s^T y)
        eps = torch.finfo(gnorm.dtype).eps

        tally = Tally(gnorm, (Status.SUCCESS, Status.LINESEARCH_FAILED), {Status.SUCCESS: gnorm <= thresh})
        counts = {"fun": 1, "grad": 1}
        no = torch.zeros((), dtype=torch.bool, device=gnorm.device)

        def step(st: tuple[Any, Tensor, Any, Tensor], active: Tensor) -> tuple[tuple[Any, Tensor, Any, Tensor], Outcome]:
            x, f, g, gnorm = st
            # At most two tries: the quasi-Newton direction, then (if its line search fails
            # with curvature pairs in memory) steepest descent with the memory cleared.
            while True:
                d = self._direction(g, pairs)
                if not float(tree_vdot(g, d)) < 0:
                    # Roundoff can spoil H's definiteness; restart from steepest descent.
                    pairs.clear()
                    d = tree_scale(-1.0, g)
                # N&W: the first step of a method without curvature information is scaled so
                # that it has length <= 1; afterwards H0 carries the scale and a = 1 is tried.
                a0 = 1.0 if pairs else min(1.0, 1.0 / float(gnorm))
                ls = self.line_search(objective, x, d, args, f0=f, g0=g, initial_step=a0)
                counts["fun"] += ls.n_fun
                counts["grad"] += ls.n_grad
                if bool(ls.success):
                    break
                if not pairs:
                    return st, Outcome(moved=no, stopped={Status.LINESEARCH_FAILED: ~no})
                # As L-BFGS-B does: stale or noise-dominated curvature pairs can give a
                # poor direction; forget them and retry once from steepest descent.
                pairs.clear()
            s = tree_sub(ls.x, x)
            y = tree_sub(ls.grad, g)
            sy = float(tree_vdot(s, y))
            if sy > eps * float(tree_norm(s)) * float(tree_norm(y)):
                pairs.append((s, y, 1.0 / sy))
            gnorm = checked_grad_norm(ls.value, ls.grad, int(tally.iters) + 1, name)
            return (ls.x, ls.value, ls.grad, gnorm), Outcome(moved=~no, stopped={Status.SUCCESS: gnorm <= thresh})

        # Unbatched, with host-side control flow anyway (the line search): one sync per step.
        x, f, g, gnorm = iterate(step, (x, f, g, gnorm), tally, maxiter=self.maxiter)
        return result_from_codes(SolverResult, x, tally.codes(Status.MAX_ITERATIONS), tally.iters, False,
                                 grad_norm=gnorm, value=f, n_fun=counts["fun"], n_grad=counts["grad"])

    @staticmethod
    def _direction(g: Any, pairs: collections.deque) -> Any:
        """Two-loop recursion: ``-H g`` (Nocedal & Wright 2006, Alg. 7.4)."""
        q = g
        alphas = []
        for s, y, rho in reversed(pairs):
            a = rho * tree_vdot(s, q)
            alphas.append(a)
            q = tree_axpy(-a, y, q)
        if pairs:
            s, y, _ = pairs[-1]
            gamma = tree_vdot(s, y) / tree_vdot(y, y)
            r = tree_scale(gamma, q)
        else:
            r = q
        for (s, y, rho), a in zip(pairs, reversed(alphas)):
            b = rho * tree_vdot(y, r)
            r = tree_axpy(a - b, s, r)
        return tree_scale(-1.0, r)
