"""Limited-memory Broyden's method for roots and fixed points (Broyden 1965).

C. G. Broyden, "A class of methods for solving nonlinear simultaneous equations",
Mathematics of Computation 19(92), 577-593, 1965.  The limited-memory form, on the
inverse Jacobian, is the one of the deep-equilibrium literature (S. Bai, J. Z. Kolter and
V. Koltun, "Deep equilibrium models", NeurIPS 2019) and of JAXopt's ``Broyden``.

The algorithm is written once, in :func:`broyden_init` (its state, step and tally), on
flat ``(B, n)`` vectors; the inner solver :class:`Broyden` (fixed points and roots of
tensor trees) and the linear solver :class:`bilevel.linsolve.Broyden` (``A x = b`` as the
root of ``A x - b``) are adapters that run it on the driver.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from .._errors import BilevelTypeError, BilevelValueError
from .._iterate import History, Outcome, Tally, iterate
from .._result import SolverResult, Status, result_from_codes
from .._tree import (
    batch_size,
    default_tol,
    tree_detach,
    tree_dtype,
    tree_flatten,
    tree_ravel,
    tree_unravel,
)
from .._validate import check_int, check_real, check_tol, is_real
from ._base import Solver
from ._checks import leaves_like_x0

BroydenVariant = Literal["good", "bad"]
"""Broyden's two inverse updates: ``"good"`` (the first method) and ``"bad"`` (the second).

Examples:
    >>> import typing
    >>> from bilevel.solvers._broyden import BroydenVariant
    >>> typing.get_args(BroydenVariant)
    ('good', 'bad')
"""

_VARIANTS: tuple[str, ...] = ("good", "bad")


def check_broyden(owner: str, memory: Any, variant: Any, initial_jacobian: Any) -> None:
    """The checks of Broyden's own parameters (shared by the inner and the linear solver)."""
    check_int(owner, "memory", memory, 1)
    if variant not in _VARIANTS:
        raise BilevelValueError(f"{owner}: variant must be 'good' or 'bad', got {variant!r}")
    if not (is_real(initial_jacobian) and initial_jacobian != 0):
        raise BilevelValueError(f"{owner}: initial_jacobian must be a finite non-zero real number, got {initial_jacobian!r}")


def _apply(h0: float, U: Tensor, V: Tensor, v: Tensor) -> Tensor:
    """``H v`` with ``H = h0 I + sum_j u_j v_j^T`` (``U``, ``V``: ``(B, k, n)``; ``v``: ``(B, n)``)."""
    return h0 * v + torch.einsum("bkn,bk->bn", U, torch.einsum("bkn,bn->bk", V, v))


BroydenStep = Callable[[dict[str, Tensor], Tensor], tuple[dict[str, Tensor], Outcome]]
"""One Broyden iteration of the active tasks (the ``step`` of :func:`bilevel._iterate.iterate`)."""


def broyden_init(
    residual: Callable[[Tensor], Tensor],
    x: Tensor,
    g: Tensor,
    *,
    threshold: Callable[[Tensor], Tensor],
    memory: int,
    variant: str,
    initial_jacobian: float,
) -> tuple[BroydenStep, dict[str, Tensor], Tally, dict[str, int]]:
    """The limited-memory Broyden iteration on ``g(x) = 0``, per task, on flat vectors:
    its state, its step and its tally, for the driver (:func:`bilevel._iterate.iterate`).

    Invariant: ``H`` (an approximation of the inverse Jacobian ``J_g^{-1}``) is
    ``H0 + sum_j u_j v_j^T`` over the stored pairs, ``H0 = I / initial_jacobian``; every
    stored pair satisfied the secant condition ``H_{j+1} y_j = s_j`` when it was added.
    A step is ``x <- x - H g(x)`` (no line search), then one rank-one update:

    * good: ``H += (s - H y) s^T H / (s^T H y)``;
    * bad: ``H += (s - H y) y^T / (y^T y)``,

    with ``s`` the step and ``y`` the change of ``g``.  A task whose denominator is
    negligible (``|d| <= sqrt(eps) ||v|| ||y||``, ``v`` the pair's right factor) or not
    finite skips its update (a zero pair).  Memory: the pairs of the last ``memory``
    iterations at most; when the store is full it is emptied (a restart from ``H0``,
    scipy's ``reduction_method="restart"``), so that ``H`` is always the true Broyden
    matrix of the steps since the restart.

    Args:
        residual: ``(B, n) -> (B, n)``, task ``b``'s row depending only on row ``b``.
        x: the starting points ``(B, n)``; ``g``: their residuals.
        threshold: ``x -> (B,)``: a task converges when ``||g(x)|| <= threshold(x)``.
        memory, variant, initial_jacobian: see :class:`Broyden`.

    Returns:
        ``(step, state, tally, counts)`` for ``iterate(step, state, tally, ...)``; the step
        reads nothing on the host, so a fixed budget runs without a sync.  After the run,
        ``state["x"]`` holds the last iterates with a finite residual, ``state["gnorm"]``
        the norms of their residuals ``(B,)``, the tally the ``SUCCESS`` / ``NONFINITE``
        masks and per-task iterations, and ``counts["eval"]`` the calls of ``residual`` made
        by the steps.
    """
    h0 = 1.0 / initial_jacobian
    eps = torch.finfo(x.dtype).eps
    gnorm = torch.linalg.vector_norm(g, dim=-1)
    xnorm = torch.linalg.vector_norm(x, dim=-1)
    bad0 = ~(torch.isfinite(gnorm) & torch.isfinite(xnorm))
    tally = Tally(gnorm, (Status.SUCCESS, Status.NONFINITE), {Status.SUCCESS: ~bad0 & (gnorm <= threshold(x)), Status.NONFINITE: bad0})
    empty = x.new_zeros((x.shape[0], 0, x.shape[1]))
    counts = {"eval": 0}
    # ``Hg``: H g of the current iterate (the next step is -Hg), kept up to date so that
    # an iteration costs one product with H (two for the good update, which needs H^T s).
    state = {"x": x, "g": g, "gnorm": gnorm, "Hg": h0 * g, "U": empty, "V": empty}

    def step(st: dict[str, Tensor], active: Tensor) -> tuple[dict[str, Tensor], Outcome]:
        x, g, U, V, Hg = st["x"], st["g"], st["U"], st["V"], st["Hg"]
        col = active.unsqueeze(-1)
        s = torch.where(col, -Hg, torch.zeros_like(Hg))
        x_new = x + s
        g_new = residual(x_new)
        counts["eval"] += 1
        gn = torch.linalg.vector_norm(g_new, dim=-1)
        finite = torch.isfinite(gn) & torch.isfinite(torch.linalg.vector_norm(x_new, dim=-1))
        bad = active & ~finite
        moved = active & finite
        mcol = moved.unsqueeze(-1)
        y = torch.where(mcol, g_new - g, torch.zeros_like(g))
        s = torch.where(mcol, s, torch.zeros_like(s))
        Hg_new = _apply(h0, U, V, torch.where(mcol, g_new, torch.zeros_like(g_new)))
        Hy = Hg_new + s  # H g_new - H g, as s = -H g
        if variant == "good":
            v = h0 * s + torch.einsum("bkn,bk->bn", V, torch.einsum("bkn,bn->bk", U, s))  # H^T s
        else:
            v = y
        d = (v * y).sum(-1)
        vn = torch.linalg.vector_norm(v, dim=-1)
        yn = torch.linalg.vector_norm(y, dim=-1)
        ok = moved & torch.isfinite(d) & (d.abs() > eps**0.5 * vn * yn)  # (so d != 0)
        u = (s - Hy) / torch.where(ok, d, torch.ones_like(d)).unsqueeze(-1)
        ok = ok & torch.isfinite(u).all(-1)
        okc = ok.unsqueeze(-1)
        u = torch.where(okc, u, torch.zeros_like(u))
        v = torch.where(okc, v, torch.zeros_like(v))
        Hg_new = Hg_new + u * (v * g_new).sum(-1, keepdim=True).nan_to_num(0.0)
        if U.shape[1] >= memory:  # full: restart from H0 (the new pair, made for the old H, is dropped)
            U, V = empty, empty
            Hg_new = h0 * g_new
        else:
            U = torch.cat([U, u.unsqueeze(1)], 1)
            V = torch.cat([V, v.unsqueeze(1)], 1)
        new = {
            "x": torch.where(mcol, x_new, x),
            "g": torch.where(mcol, g_new, g),
            "gnorm": torch.where(moved, gn, st["gnorm"]),
            "Hg": torch.where(mcol, Hg_new, Hg),
            "U": U,
            "V": V,
        }
        conv = moved & (gn <= threshold(x_new))
        return new, Outcome(moved=moved, stopped={Status.NONFINITE: bad, Status.SUCCESS: conv})

    return step, state, tally, counts


@dataclasses.dataclass(frozen=True)
class Broyden(Solver):
    """Limited-memory Broyden's method for fixed points ``x = fn(x, *args)`` and roots ``F(x, *args) = 0``.

    Called like :class:`FixedPointIteration`: ``solver(fn, x0, *args, batched=False)``
    finds ``x = fn(x)`` as the root of ``g(x) = fn(x) - x``; ``solver.root(F, x0, *args,
    batched=False)`` finds a root of a general ``F`` (a tree shaped like ``x``), e.g.
    inside the solve function of :func:`bilevel.custom_root`.

    A quasi-Newton method on the inverse Jacobian ``H ~ J_g^{-1}``, started from
    ``H0 = I / initial_jacobian``: a step is ``x <- x - H g(x)`` and each step adds one
    rank-one term (the ``"good"`` update ``H += (s - H y) s^T H / (s^T H y)`` or the
    ``"bad"`` one ``H += (s - H y) y^T / (y^T y)``, ``s`` the step, ``y`` the change of
    ``g``), so that ``H y = s`` on the last step (the secant condition).  Invariant:
    ``H = H0 + sum_j u_j v_j^T`` over at most ``memory`` stored pairs, per task, on the
    task's unknowns flattened to one vector; when the store is full it restarts from
    ``H0`` (scipy's ``reduction_method="restart"``), so ``H`` is always the exact Broyden
    matrix of the steps since the last restart (a sliding window, dropping only the
    oldest pair, leaves later pairs that were built on it inconsistent: measured on
    slowly contracting affine maps, it diverged where the restart converges).  A task
    whose update has a negligible or non-finite denominator skips that update.  With the
    default ``initial_jacobian=-1``
    (``J_g = J_fn - I ~ -I`` for a weakly coupled map) the first fixed-point step is the
    plain iteration ``x <- fn(x)``; for a root of ``F`` give the sign and scale of
    ``dF/dx`` (e.g. ``1`` for ``F = x - fn(x)``).

    No line search: like the plain iteration, the method is local.  It converges
    superlinearly near a root with an invertible Jacobian (Broyden, Dennis & Moré 1973
    for the full-memory method), and on an affine map it needs far fewer steps than the
    plain iteration when the contraction is slow.  A failure is reported, never hidden.

    Stopping rule (as :class:`FixedPointIteration`): ``||g(x)|| <= max(rtol * max(1,
    ||x||), atol)``.  Statuses: ``SUCCESS``, ``MAX_ITERATIONS``, or ``NONFINITE`` when a
    step or ``g`` became NaN/Inf -- then the last iterate with a finite residual is
    returned.  ``grad_norm`` is the final residual norm ``||g(x)||`` of the returned
    ``x``; ``value`` is ``None``; ``n_fun`` counts evaluations of ``fn`` (or ``F``).
    Batched mode: every quantity is per task, and a converged (or non-finite) task stops
    moving.  Memory: ``2 * memory`` vectors of the task's size per task.

    Args:
        memory: the number of stored rank-one pairs (>= 1) before a restart.
        variant: ``"good"`` (Broyden's first method) or ``"bad"`` (his second).
        initial_jacobian: the scalar guess ``J0 = initial_jacobian * I`` of the Jacobian
            of ``g`` (a finite non-zero real).
        rtol: residual tolerance in (0, 1); ``None`` means
            :func:`bilevel._tree.default_tol` of the dtype of ``x0``.
        atol: absolute residual tolerance (>= 0, default 0).
        maxiter: the cap on iterations (>= 0).

    Examples:
        The fixed point of ``cos`` (the Dottie number), and a cube root as the root of
        ``x³ - a``:

        >>> import torch
        >>> from bilevel.solvers import Broyden
        >>> res = Broyden(rtol=1e-12)(torch.cos, torch.zeros(1, dtype=torch.float64))
        >>> res.status.name, round(float(res.x), 9)
        ('SUCCESS', 0.739085133)
        >>> a = torch.tensor([8.0, 27.0], dtype=torch.float64)
        >>> res = Broyden(initial_jacobian=12.0, rtol=1e-12).root(lambda x, a: x**3 - a, torch.full((2,), 2.5, dtype=torch.float64), a)
        >>> res.status.name, [round(v, 9) for v in res.x.tolist()]
        ('SUCCESS', [2.0, 3.0])

        As the inner solver of a :class:`~bilevel.FixedPoint` layer, and of a
        :func:`~bilevel.custom_root`: ``x = x/2 + a`` has ``dx*/da = 2``.

        >>> import bilevel
        >>> a = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> layer = bilevel.FixedPoint(lambda x, a: 0.5 * x + a, solver=Broyden())
        >>> (g,) = torch.autograd.grad(layer(torch.zeros(2, dtype=torch.float64), a).sum(), a)
        >>> [round(v, 8) for v in g.tolist()]
        [2.0, 2.0]
        >>> @bilevel.custom_root(lambda x, a: x - 0.5 * x - a)
        ... def solve(x0, a):
        ...     return Broyden(initial_jacobian=0.5).root(lambda x, a: x - 0.5 * x - a, x0, a).x
        >>> (g,) = torch.autograd.grad(solve(torch.zeros(2, dtype=torch.float64), a).sum(), a)
        >>> [round(v, 8) for v in g.tolist()]
        [2.0, 2.0]
    """

    memory: int = 20
    variant: BroydenVariant = "good"
    initial_jacobian: float = -1.0
    rtol: float | None = None
    atol: float = 0.0
    maxiter: int = 500

    supports_batched: ClassVar[bool] = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_broyden(name, self.memory, self.variant, self.initial_jacobian)
        check_tol(name, self.rtol)
        check_real(name, "atol", self.atol, 0.0, lo_open=False)
        check_int(name, "maxiter", self.maxiter, 0)

    def __call__(self, fn: Callable[..., Any], x0: Any, *args: Any, batched: bool = False) -> SolverResult:
        """Find ``x = fn(x, *args)`` starting from ``x0`` (a tensor tree)."""
        return self._solve(fn, x0, args, batched, fixed_point=True)

    def root(self, F: Callable[..., Any], x0: Any, *args: Any, batched: bool = False) -> SolverResult:
        """Find ``F(x, *args) = 0`` starting from ``x0`` (``F`` returns a tree shaped like ``x``).

        Examples:
            >>> import torch
            >>> from bilevel.solvers import Broyden
            >>> A = torch.tensor([[3.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
            >>> res = Broyden(initial_jacobian=2.0, rtol=1e-12).root(lambda x: A @ x - 1.0, torch.zeros(2, dtype=torch.float64))
            >>> res.status.name, [round(v, 9) for v in res.x.tolist()]
            ('SUCCESS', [0.166666667, 0.5])
        """
        return self._solve(F, x0, args, batched, fixed_point=False)

    def _solve(self, fn: Callable[..., Any], x0: Any, args: tuple[Any, ...], batched: bool, fixed_point: bool) -> SolverResult:
        self._check_batched(batched)
        name = type(self).__name__
        leaves, treedef = tree_flatten(x0)
        if not leaves:
            raise BilevelValueError(f"{name}: x0 is an empty tree")
        if not all(t.dtype.is_floating_point for t in leaves):
            raise BilevelTypeError(f"{name}: x0 must hold floating-point tensors, got {[t.dtype for t in leaves]}")
        if batched:
            batch_size(x0)  # every leaf has the same task dimension
        tol = self.rtol if self.rtol is not None else default_tol(tree_dtype(x0))
        like = tree_detach(x0)
        shapes = [t.shape for t in leaves]
        what = "fn" if fixed_point else "F"

        def unflat(flat: Tensor) -> Any:
            return tree_unravel(like, flat if batched else flat.reshape(-1), batched)

        def flat_of(tree: Any) -> Tensor:
            v = tree_ravel(tree, batched)
            return v if batched else v.reshape(1, -1)

        def residual(flat: Tensor) -> Tensor:
            x = unflat(flat)
            with torch.no_grad():
                y = fn(x, *args)
            leaves_like_x0(name, what, y, treedef, shapes)
            r = flat_of(y).detach().to(flat.dtype)
            return r - flat if fixed_point else r

        x = flat_of(like)
        g = residual(x)

        def threshold(x: Tensor) -> Tensor:
            return torch.clamp(tol * torch.clamp(torch.linalg.vector_norm(x, dim=-1), min=1.0), min=self.atol)

        step, state, tally, counts = broyden_init(
            residual, x, g, threshold=threshold, memory=self.memory, variant=self.variant,
            initial_jacobian=self.initial_jacobian,
        )
        history = History(state["gnorm"])
        # One host sync per iteration (the stopping test).
        state = iterate(history.recording(step, lambda st: st["gnorm"]), state, tally, maxiter=self.maxiter)
        return result_from_codes(SolverResult, unflat(state["x"]), tally.codes(Status.MAX_ITERATIONS), tally.iters,
                                 batched, grad_norm=state["gnorm"], n_fun=counts["eval"] + 1, n_grad=0,
                                 residual_history=history.tensor(batched))
