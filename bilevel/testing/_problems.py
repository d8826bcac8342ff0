"""Well-posed random bilevel problems, and hypothesis strategies that draw them.

Every problem has an inner loss ``L(x, *data)`` over unknowns ``x`` with the tree
structure of the outer parameters ``theta`` (a Tensor, a tuple or a dict), an outer loss
``outer(x)``, and a proximal weight ``lam``.  It is used two ways:

* proximal (implicit MAML): ``phi*(theta) = argmin_phi L(phi) + lam/2 ||phi - theta||^2``
  (:meth:`BilevelProblem.proximal_layer`);
* argmin (hyper-parameter learning): ``x*(theta) = argmin_x L(x) + 1/2 sum w(theta) x^2``
  with per-coordinate weight decay ``w(theta) = lam * (1/2 + sigmoid(theta))``, in
  ``(lam/2, 3 lam/2)`` (:meth:`BilevelProblem.argmin_layer`).

Invariant (what "well-posed" means here): the Hessian of both objectives is positive
definite at the solution and everywhere the solvers go, with eigenvalues within the
documented bounds (:attr:`BilevelProblem.mu`, :attr:`BilevelProblem.L` bound the Hessian of the inner
loss; add ``lam`` resp. ``[lam/2, 3 lam/2]``).  For the MLP the inner loss is non-convex;
``lam`` is then chosen (and verified at the solutions) so that both objectives are
strongly convex.

All numbers come from a ``torch.Generator`` seeded by one hypothesis-drawn integer:
cheap, reproducible (the seed is in the repr) and shrinkable (hypothesis shrinks the
sizes and the seed).  Everything is generated in float64 and then cast to the dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import linsolve as _ls
from .. import solvers as _solvers
from .._argmin import Argmin
from .._errors import BilevelValueError
from .._proximal import Proximal
from .._tree import default_tol, tree_axpy, tree_flatten, tree_unflatten

PARAM_KINDS: tuple[str, ...] = ("tensor", "tuple", "dict")
"""How a problem presents its parameters: one Tensor, a tuple of Tensors, or a dict.

The ``param_kind`` argument of the builders and strategies; the same problem in any kind
has the same numbers (only the tree around them differs).

Examples:
    >>> import torch
    >>> from bilevel.testing import PARAM_KINDS, make_ridge
    >>> PARAM_KINDS
    ('tensor', 'tuple', 'dict')
    >>> [type(make_ridge(3, torch.float64, kind, seed=0).theta).__name__ for kind in PARAM_KINDS]
    ['Tensor', 'tuple', 'dict']
"""

DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)
"""The dtypes the problems are drawn in (everything is generated in float64, then cast).

Examples:
    >>> import torch
    >>> from bilevel.testing import DTYPES, make_quadratic
    >>> DTYPES
    (torch.float32, torch.float64)
    >>> make_quadratic(3, 2.0, torch.float32, "tensor", seed=0).theta.dtype
    torch.float32
"""

_D = torch.float64


# --------------------------------------------------------------------------------------
# parameter layouts: a flat float64 vector <-> a Tensor / tuple / dict tree
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
    """Maps between a flat vector of ``n`` unknowns and a parameter tree.

    ``kind="tensor"`` is one 1-d tensor of length ``n``; ``"tuple"`` and ``"dict"`` split
    it into the named, shaped leaves of ``specs`` (in that order).

    Examples:
        >>> import torch
        >>> from bilevel.testing import Layout
        >>> layout = Layout("dict", (("w", (2,)), ("b", ())))
        >>> tree = layout.tree(torch.arange(3.0))
        >>> tree
        {'w': tensor([0., 1.]), 'b': tensor(2.)}
        >>> layout.n, layout.flat(tree)
        (3, tensor([0., 1., 2.]))
    """

    kind: str
    specs: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def n(self) -> int:
        return sum(math.prod(s) for _, s in self.specs)

    def tree(self, flat: Tensor) -> Any:
        """The tree view of ``flat`` (differentiable: slices and reshapes)."""
        if self.kind == "tensor":
            return flat
        leaves, i = [], 0
        for _, shape in self.specs:
            k = math.prod(shape)
            leaves.append(flat[i : i + k].reshape(shape))
            i += k
        if self.kind == "tuple":
            return tuple(leaves)
        return {name: leaf for (name, _), leaf in zip(self.specs, leaves)}

    def flat(self, tree: Any) -> Tensor:
        """Inverse of :meth:`tree` (differentiable: a concatenation)."""
        if self.kind == "tensor":
            return tree.reshape(-1)
        if self.kind == "tuple":
            return torch.cat([t.reshape(-1) for t in tree])
        return torch.cat([tree[name].reshape(-1) for name, _ in self.specs])


def _layout(kind: str, n: int, specs: Sequence[tuple[str, tuple[int, ...]]] | None = None) -> Layout:
    if kind not in PARAM_KINDS:
        raise BilevelValueError(f"param_kind must be one of {PARAM_KINDS}, got {kind!r}")
    if specs is None:
        # Weights and a 0-d "bias": exercises scalar leaves in trees.
        specs = (("w", (n - 1,)), ("b", ()))
    return Layout(kind, tuple((name, tuple(s)) for name, s in specs))


def _tree_cast(tree: Any, dtype: torch.dtype) -> Any:
    leaves, d = tree_flatten(tree)
    return tree_unflatten(d, [t.detach().to(dtype).clone() for t in leaves])


# --------------------------------------------------------------------------------------
# the problem
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, repr=False)
class BilevelProblem:
    """A small well-posed bilevel problem (see the module docstring for the invariants).

    Attributes:
        name: ``"quadratic"``, ``"ridge"``, ``"logistic"``, ``"softmax"`` or ``"mlp"``.
        inner: ``inner(x, *data) -> scalar``, the inner loss ``L`` (x a tree like theta).
        outer: ``outer(x) -> scalar``, the outer loss (e.g. a validation loss); it closes
            over constant data only.
        theta: the outer parameters (a tree, not requiring grad; see :meth:`theta_leaf`).
        data: the inner loss's data tensors.
        lam: proximal weight (float), also the scale of the argmin weight decay.
        x0: initial point of the argmin problem (a tree like theta).
        dtype: float32 or float64.
        param_kind: ``"tensor"``, ``"tuple"`` or ``"dict"``.
        mu, L: bounds on the eigenvalues of the Hessian of ``inner`` where the solvers go
            (exact for quadratic and ridge, analytic bounds for logistic and softmax,
            estimated with a 1.5x margin for the MLP, where ``mu`` may be negative).
        seed: the generator seed everything was drawn from.
        info: extra description (e.g. the condition number).
        quadratic: for quadratic and ridge, ``(A, b)`` (float64) with
            ``inner = 1/2 z^T A z - b^T z`` in flat coordinates ``z``; else ``None``.
        layout: the flat <-> tree :class:`Layout`.

    Examples:
        Ridge regression has a closed form, which the implicit layer reproduces:

        >>> import torch
        >>> from bilevel.testing import make_ridge
        >>> problem = make_ridge(3, torch.float64, "dict", seed=1)
        >>> problem
        BilevelProblem(ridge, n=3, dict, float64, lam=..., mu=..., L=..., alpha=..., seed=1)
        >>> theta = problem.theta_leaf()
        >>> phi = problem.proximal_layer()(theta, *problem.data)
        >>> exact = problem.exact_proximal(theta)
        >>> all(torch.allclose(phi[k], exact[k]) for k in exact)
        True
    """

    name: str
    inner: Callable[..., Tensor]
    outer: Callable[[Any], Tensor]
    theta: Any
    data: tuple
    lam: float
    x0: Any
    dtype: torch.dtype
    param_kind: str
    mu: float
    L: float
    seed: int
    info: str = ""
    quadratic: tuple[Tensor, Tensor] | None = None
    layout: Layout = dataclasses.field(default=None)  # type: ignore[assignment]

    def __repr__(self) -> str:
        extra = f", {self.info}" if self.info else ""
        return (
            f"BilevelProblem({self.name}, n={self.dim}, {self.param_kind}, {str(self.dtype).replace('torch.', '')}, "
            f"lam={self.lam:.3g}, mu={self.mu:.3g}, L={self.L:.3g}{extra}, seed={self.seed})"
        )

    # -- sizes and curvature ------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Number of unknowns."""
        return self.layout.n

    @property
    def proximal_curvature(self) -> tuple[float, float]:
        """Eigenvalue bounds ``(mu + lam, L + lam)`` of the proximal objective's Hessian."""
        return self.mu + self.lam, self.L + self.lam

    @property
    def argmin_curvature(self) -> tuple[float, float]:
        """Eigenvalue bounds ``(mu + lam/2, L + 3 lam/2)`` of the argmin objective's Hessian."""
        return self.mu + 0.5 * self.lam, self.L + 1.5 * self.lam

    # -- objectives -----------------------------------------------------------------------
    def weight_decay(self, theta: Any) -> Any:
        """``w(theta) = lam * (1/2 + sigmoid(theta))`` leafwise, in ``(lam/2, 3 lam/2)``."""
        leaves, d = tree_flatten(theta)
        return tree_unflatten(d, [self.lam * (0.5 + torch.sigmoid(t)) for t in leaves])

    def argmin_objective(self, x: Any, theta: Any, *data: Any) -> Tensor:
        """``inner(x, *data) + 1/2 sum w(theta) x^2`` (strongly convex in x, smooth in theta)."""
        xl, _ = tree_flatten(x)
        wl, _ = tree_flatten(self.weight_decay(theta))
        return self.inner(x, *data) + 0.5 * sum((w * t * t).sum() for w, t in zip(wl, xl))

    def proximal_objective(self, phi: Any, theta: Any, *data: Any, lam: Any = None) -> Tensor:
        """``inner(phi, *data) + lam/2 ||phi - theta||^2`` (what :class:`Proximal` minimises)."""
        lam = self.lam if lam is None else lam
        pl, _ = tree_flatten(phi)
        tl, _ = tree_flatten(theta)
        return self.inner(phi, *data) + 0.5 * lam * sum(((p - t) ** 2).sum() for p, t in zip(pl, tl))

    # -- recommended tight solver configuration ---------------------------------------------
    @property
    def newton_tol(self) -> float:
        """Gradient tolerance of :attr:`solver`: 1e-10 (float64), ``sqrt(eps)`` (float32)."""
        return 1e-10 if self.dtype == torch.float64 else math.sqrt(torch.finfo(self.dtype).eps)

    @property
    def linsolve_tol(self) -> float:
        """Relative tolerance of :attr:`linsolve`: 1e-12 (float64), ``eps**0.75`` (float32)."""
        return 1e-12 if self.dtype == torch.float64 else default_tol(self.dtype)

    @property
    def solver(self) -> _solvers.NewtonCG:
        """A tight inner solver for this problem (Newton-CG)."""
        return _solvers.NewtonCG(rtol=self.newton_tol, maxiter=100)

    @property
    def linsolve(self) -> _ls.CG:
        """A tight backward linear solver for this problem (CG)."""
        return _ls.CG(rtol=self.linsolve_tol)

    @property
    def solver_tol(self) -> float:
        """The accuracy to declare to :func:`check_implicit_grad` with the tight config.

        ``newton_tol / min(1, mu_obj) + linsolve_tol * kappa_obj`` with ``mu_obj`` and
        ``kappa_obj`` the worse of the proximal and argmin objectives' bounds: the error
        of the solution and of the backward solve, relative.
        """
        mu_p, L_p = self.proximal_curvature
        mu_a, L_a = self.argmin_curvature
        mu = max(min(mu_p, mu_a), 1e-12)
        kappa = max(L_p / max(mu_p, 1e-12), L_a / max(mu_a, 1e-12))
        return self.newton_tol / min(1.0, mu) + self.linsolve_tol * kappa

    # -- layers and meta-losses ----------------------------------------------------------
    def proximal_layer(self, solver: Any = None, linsolve: Any = None, **kw: Any) -> Proximal:
        """``Proximal(inner, lam, solver, linsolve)`` with the tight defaults."""
        return Proximal(self.inner, self.lam, solver or self.solver, linsolve or self.linsolve, **kw)

    def argmin_layer(self, solver: Any = None, linsolve: Any = None, **kw: Any) -> Argmin:
        """``Argmin(argmin_objective, solver, linsolve)`` with the tight defaults."""
        return Argmin(self.argmin_objective, solver or self.solver, linsolve or self.linsolve, **kw)

    def proximal_meta_loss(self, layer: Proximal | None = None) -> Callable[..., Tensor]:
        """``f(theta, lam=None) = outer(phi*(theta))`` through a proximal layer."""
        layer = layer or self.proximal_layer()

        def f(theta: Any, lam: Any = None) -> Tensor:
            return self.outer(layer(theta, *self.data, lam=lam))

        return f

    def argmin_meta_loss(self, layer: Argmin | None = None) -> Callable[..., Tensor]:
        """``f(theta) = outer(x*(theta))`` through an argmin layer started at :attr:`x0`."""
        layer = layer or self.argmin_layer()

        def f(theta: Any) -> Tensor:
            return self.outer(layer(self.x0, theta, *self.data))

        return f

    def unrolled_proximal_meta_loss(self, steps: int = 300, lr: float | None = None) -> Callable[..., Tensor]:
        """``f(theta, lam=None)`` by differentiating through ``steps`` gradient steps.

        Starts at theta (as unrolled MAML does) with step ``lr = 1/(L + lam)``; the unrolled
        gradient converges to the implicit one like ``(1 - (mu + lam)/(L + lam))^steps``.
        A reference for :func:`check_implicit_grad`'s ``unrolled=``.
        """

        def f(theta: Any, lam: Any = None) -> Tensor:
            lam_ = self.lam if lam is None else lam
            lam_f = float(lam_.detach()) if isinstance(lam_, Tensor) else float(lam_)
            step = 1.0 / (self.L + lam_f) if lr is None else lr

            def obj(p: Any) -> Tensor:
                return self.proximal_objective(p, theta, *self.data, lam=lam_)

            phi = theta
            for _ in range(steps):
                phi = tree_axpy(-step, torch.func.grad(obj)(phi), phi)
            return self.outer(phi)

        return f

    def unrolled_argmin_meta_loss(self, steps: int = 300, lr: float | None = None) -> Callable[..., Tensor]:
        """``f(theta)`` by differentiating through ``steps`` gradient steps from :attr:`x0`
        (step ``1 / (L + 3 lam/2)``)."""

        def f(theta: Any) -> Tensor:
            step = 1.0 / (self.L + 1.5 * self.lam) if lr is None else lr

            def obj(x: Any) -> Tensor:
                return self.argmin_objective(x, theta, *self.data)

            x = self.x0
            for _ in range(steps):
                x = tree_axpy(-step, torch.func.grad(obj)(x), x)
            return self.outer(x)

        return f

    def theta_leaf(self) -> Any:
        """A fresh copy of :attr:`theta` whose leaves require grad."""
        leaves, d = tree_flatten(self.theta)
        return tree_unflatten(d, [t.detach().clone().requires_grad_(True) for t in leaves])

    # -- closed forms (quadratic and ridge) ------------------------------------------------------
    def exact_proximal(self, theta: Any, lam: Any = None) -> Any:
        """Closed-form ``phi*(theta) = (A + lam I)^{-1} (b + lam theta)``, differentiable.

        Raises:
            ValueError: if the inner loss is not quadratic.
        """
        A, b = self._quad()
        lam = self.lam if lam is None else lam
        z = self.layout.flat(theta)
        A, b = A.to(z.dtype), b.to(z.dtype)
        sol = torch.linalg.solve(A + lam * torch.eye(self.dim, dtype=z.dtype), b + lam * z)
        return self.layout.tree(sol)

    def exact_argmin(self, theta: Any) -> Any:
        """Closed-form ``x*(theta) = (A + diag w(theta))^{-1} b``, differentiable."""
        A, b = self._quad()
        w = self.layout.flat(self.weight_decay(theta))
        A, b = A.to(w.dtype), b.to(w.dtype)
        return self.layout.tree(torch.linalg.solve(A + torch.diag(w), b))

    def _quad(self) -> tuple[Tensor, Tensor]:
        if self.quadratic is None:
            raise BilevelValueError(f"{self.name}: no closed form (the inner loss is not quadratic)")
        return self.quadratic


def _finish(
    name: str,
    layout: Layout,
    flat_inner: Callable[..., Tensor],
    flat_outer: Callable[[Tensor], Tensor],
    theta: Tensor,
    x0: Tensor,
    data: tuple,
    lam: float,
    mu: float,
    L: float,
    dtype: torch.dtype,
    seed: int,
    info: str = "",
    quadratic: tuple[Tensor, Tensor] | None = None,
) -> BilevelProblem:
    """Wrap flat float64 functions into tree-valued ones in ``dtype``."""
    data_t = tuple(d.to(dtype) if d.dtype.is_floating_point else d for d in data)

    def inner(x: Any, *d: Any) -> Tensor:
        return flat_inner(layout.flat(x), *d)

    inner.__qualname__ = inner.__name__ = f"{name}_inner"

    def outer(x: Any) -> Tensor:
        return flat_outer(layout.flat(x))

    outer.__qualname__ = outer.__name__ = f"{name}_outer"
    return BilevelProblem(
        name=name,
        inner=inner,
        outer=outer,
        theta=_tree_cast(layout.tree(theta), dtype),
        data=data_t,
        lam=float(lam),
        x0=_tree_cast(layout.tree(x0), dtype),
        dtype=dtype,
        param_kind=layout.kind,
        mu=float(mu),
        L=float(L),
        seed=int(seed),
        info=info,
        quadratic=quadratic,
        layout=layout,
    )


def _log_uniform(g: torch.Generator, lo: float, hi: float) -> float:
    u = float(torch.rand((), generator=g, dtype=_D))
    return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


# --------------------------------------------------------------------------------------
# builders (deterministic given their arguments; the strategies only draw the arguments)
# --------------------------------------------------------------------------------------
def make_quadratic(dim: int, condition: float, dtype: torch.dtype, param_kind: str, seed: int) -> BilevelProblem:
    """``L(z) = 1/2 z^T A z - b^T z`` with ``A`` SPD of condition number ``condition``.

    The eigenvalues of ``A`` are geometrically spaced in ``[condition^-1/2, condition^1/2]``
    (so ``mu * L = 1``), its eigenvectors a random orthogonal basis; ``lam`` is
    log-uniform in ``[0.1, 10]``; the outer loss is ``1/2 ||z - c||^2 + 1/2 sum sin(z)``.

    Examples:
        >>> import torch
        >>> from bilevel.testing import make_quadratic
        >>> problem = make_quadratic(4, 10.0, torch.float64, "tensor", seed=0)
        >>> round(problem.L / problem.mu, 6), round(problem.mu * problem.L, 6)
        (10.0, 1.0)
        >>> A, b = problem.quadratic                   # inner(z) = z^T A z / 2 - b^T z
        >>> A.shape
        torch.Size([4, 4])
    """
    if dim < 1 or (param_kind != "tensor" and dim < 2):
        raise BilevelValueError(f"dim must be >= 1 (>= 2 for trees), got {dim}")
    if not condition >= 1:
        raise BilevelValueError(f"condition must be >= 1, got {condition}")
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=_D))
    eig = condition ** torch.linspace(-0.5, 0.5, dim, dtype=_D) if dim > 1 else torch.ones(1, dtype=_D)
    A = (Q * eig) @ Q.T
    A = 0.5 * (A + A.T)
    b = torch.randn(dim, generator=g, dtype=_D)
    theta = torch.randn(dim, generator=g, dtype=_D)
    c = torch.randn(dim, generator=g, dtype=_D)
    x0 = 0.1 * torch.randn(dim, generator=g, dtype=_D)
    lam = _log_uniform(g, 0.1, 10.0)
    Ad, bd, cd = A.to(dtype), b.to(dtype), c.to(dtype)

    def flat_inner(z: Tensor, A_: Tensor, b_: Tensor) -> Tensor:
        return 0.5 * z @ (A_ @ z) - b_ @ z

    def flat_outer(z: Tensor) -> Tensor:
        return 0.5 * ((z - cd) ** 2).sum() + 0.5 * torch.sin(z).sum()

    return _finish(
        "quadratic",
        _layout(param_kind, dim),
        flat_inner,
        flat_outer,
        theta,
        x0,
        (Ad, bd),
        lam,
        float(eig.min()),
        float(eig.max()),
        dtype,
        seed,
        info=f"condition={condition:.3g}",
        quadratic=(A, b),
    )


def _regression_data(g: torch.Generator, m: int, dim: int) -> tuple[Tensor, Tensor]:
    """Features with a trailing column of ones (the bias, the 0-d leaf of a tree) and a
    planted linear signal."""
    X = torch.cat([torch.randn(2 * m, dim - 1, generator=g, dtype=_D), torch.ones(2 * m, 1, dtype=_D)], 1)
    w = torch.randn(dim, generator=g, dtype=_D)
    return X, X @ w + 0.3 * torch.randn(2 * m, generator=g, dtype=_D)


def _regression_draws(dim: int, seed: int) -> tuple[int, Tensor, Tensor, float, float, Tensor, Tensor]:
    """The random draws shared by :func:`make_ridge` and :func:`make_logistic`.

    Returns:
        ``(m, X, s, alpha, lam, theta, x0)``: the training-set size ``m = 2 dim + 4``,
        ``2 m`` samples of :func:`_regression_data` (training then validation), ``alpha``
        log-uniform in ``[0.01, 1]``, ``lam`` in ``[0.1, 10]``, and the starting points.
    """
    if dim < 2:
        raise BilevelValueError(f"dim must be >= 2, got {dim}")
    g = torch.Generator().manual_seed(seed)
    m = 2 * dim + 4
    Xa, sa = _regression_data(g, m, dim)
    alpha = _log_uniform(g, 0.01, 1.0)
    lam = _log_uniform(g, 0.1, 10.0)
    theta = torch.randn(dim, generator=g, dtype=_D)
    x0 = 0.1 * torch.randn(dim, generator=g, dtype=_D)
    return m, Xa, sa, alpha, lam, theta, x0


def make_ridge(dim: int, dtype: torch.dtype, param_kind: str, seed: int) -> BilevelProblem:
    """Ridge regression ``1/2 mean (X z - y)^2 + alpha/2 ||z||^2`` (last feature = bias).

    ``2 dim + 4`` training and as many validation samples (the outer loss is the
    validation squared error); ``alpha`` log-uniform in ``[0.01, 1]``, ``lam`` in
    ``[0.1, 10]``.  Closed form available (:meth:`BilevelProblem.exact_proximal`).

    Examples:
        >>> import torch
        >>> from bilevel.testing import make_ridge
        >>> problem = make_ridge(3, torch.float64, "tuple", seed=0)
        >>> problem.name, problem.dim, [tuple(t.shape) for t in problem.theta]   # weights, bias
        ('ridge', 3, [(2,), ()])
        >>> problem.quadratic is not None                 # a closed form exists
        True
    """
    m, Xa, ya, alpha, lam, theta, x0 = _regression_draws(dim, seed)
    X, y, Xv, yv = Xa[:m], ya[:m], Xa[m:], ya[m:]
    A = X.T @ X / m + alpha * torch.eye(dim, dtype=_D)
    b = X.T @ y / m
    eig = torch.linalg.eigvalsh(A)
    Xvd, yvd = Xv.to(dtype), yv.to(dtype)

    def flat_inner(z: Tensor, X_: Tensor, y_: Tensor) -> Tensor:
        return 0.5 * ((X_ @ z - y_) ** 2).mean() + 0.5 * alpha * (z * z).sum()

    def flat_outer(z: Tensor) -> Tensor:
        return 0.5 * ((Xvd @ z - yvd) ** 2).mean()

    return _finish(
        "ridge",
        _layout(param_kind, dim),
        flat_inner,
        flat_outer,
        theta,
        x0,
        (X, y),
        lam,
        float(eig.min()),
        float(eig.max()),
        dtype,
        seed,
        info=f"alpha={alpha:.3g}",
        quadratic=(A, b),
    )


def make_logistic(dim: int, dtype: torch.dtype, param_kind: str, seed: int) -> BilevelProblem:
    """L2-regularised logistic regression ``mean softplus(-y X z) + alpha/2 ||z||^2``, y = +-1.

    Hessian bounds: ``alpha <= H <= alpha + ||X||_2^2 / (4 m)``.  The outer loss is the
    validation logistic loss.

    Examples:
        >>> import torch
        >>> from bilevel.testing import make_logistic
        >>> problem = make_logistic(3, torch.float64, "tensor", seed=0)
        >>> problem.name, problem.dim, problem.quadratic is None
        ('logistic', 3, True)
        >>> 0 < problem.mu <= problem.L                     # strongly convex
        True
    """
    m, Xa, sa, alpha, lam, theta, x0 = _regression_draws(dim, seed)
    ya = torch.where(sa >= 0, 1.0, -1.0).to(_D)
    X, y, Xv, yv = Xa[:m], ya[:m], Xa[m:], ya[m:]
    L = alpha + float(torch.linalg.matrix_norm(X, 2)) ** 2 / (4 * m)
    Xvd, yvd = Xv.to(dtype), yv.to(dtype)

    def flat_inner(z: Tensor, X_: Tensor, y_: Tensor) -> Tensor:
        return torch.nn.functional.softplus(-y_ * (X_ @ z)).mean() + 0.5 * alpha * (z * z).sum()

    def flat_outer(z: Tensor) -> Tensor:
        return torch.nn.functional.softplus(-yvd * (Xvd @ z)).mean()

    return _finish(
        "logistic",
        _layout(param_kind, dim),
        flat_inner,
        flat_outer,
        theta,
        x0,
        (X, y),
        lam,
        alpha,
        L,
        dtype,
        seed,
        info=f"alpha={alpha:.3g}",
    )


def make_softmax(features: int, classes: int, dtype: torch.dtype, param_kind: str, seed: int) -> BilevelProblem:
    """L2-regularised softmax regression: weight ``(features, classes)`` and bias ``(classes,)``.

    The data are ``(X, Y)`` with ``Y`` one-hot (floating, so that it follows the dtype).

    ``mean CE(X W + b, y) + alpha/2 ||(W, b)||^2``; the Hessian of the cross-entropy in the
    logits is ``diag(p) - p p^T <= I/2``, so ``alpha <= H <= alpha + ||[X, 1]||_2^2 / (2 m)``.
    The outer loss is the validation cross-entropy.

    Examples:
        >>> import torch
        >>> from bilevel.testing import make_softmax
        >>> problem = make_softmax(2, 3, torch.float64, "dict", seed=0)
        >>> problem.dim, {k: tuple(v.shape) for k, v in problem.theta.items()}
        (9, {'weight': (2, 3), 'bias': (3,)})
    """
    if features < 1 or classes < 2:
        raise BilevelValueError(f"need features >= 1 and classes >= 2, got {features}, {classes}")
    g = torch.Generator().manual_seed(seed)
    m = 3 * classes * (features + 1)
    X = torch.randn(2 * m, features, generator=g, dtype=_D)
    Wt = 2.0 * torch.randn(features, classes, generator=g, dtype=_D)
    logits = X @ Wt + 0.5 * torch.randn(2 * m, classes, generator=g, dtype=_D)
    yall = logits.argmax(1)
    Xtr, ytr, Xv, yv = X[:m], yall[:m], X[m:], yall[m:]
    alpha = _log_uniform(g, 0.01, 1.0)
    lam = _log_uniform(g, 0.1, 10.0)
    n = features * classes + classes
    theta = torch.randn(n, generator=g, dtype=_D)
    x0 = 0.1 * torch.randn(n, generator=g, dtype=_D)
    X1 = torch.cat([Xtr, torch.ones(m, 1, dtype=_D)], 1)
    L = alpha + float(torch.linalg.matrix_norm(X1, 2)) ** 2 / (2 * m)
    specs = (("weight", (features, classes)), ("bias", (classes,)))
    Xvd = Xv.to(dtype)

    def logits_of(z: Tensor, X_: Tensor) -> Tensor:
        W = z[: features * classes].reshape(features, classes)
        return X_ @ W + z[features * classes :]

    def cross_entropy(logits: Tensor, Y: Tensor) -> Tensor:
        # Written out (rather than F.cross_entropy, whose backward is ~10x slower on tiny
        # CPU problems under torch.func): log-sum-exp shifted by the detached row max,
        # added back so that the value is exact.
        m = logits.detach().amax(1, keepdim=True)
        lse = torch.log(torch.exp(logits - m).sum(1)) + m[:, 0]
        return (lse - (logits * Y).sum(1)).mean()

    def flat_inner(z: Tensor, X_: Tensor, Y_: Tensor) -> Tensor:
        return cross_entropy(logits_of(z, X_), Y_) + 0.5 * alpha * (z * z).sum()

    Yv = torch.nn.functional.one_hot(yv, classes).to(dtype)

    def flat_outer(z: Tensor) -> Tensor:
        return cross_entropy(logits_of(z, Xvd), Yv)

    return _finish(
        "softmax",
        _layout(param_kind, n, specs),
        flat_inner,
        flat_outer,
        theta,
        x0,
        (Xtr, torch.nn.functional.one_hot(ytr, classes).to(_D)),
        lam,
        alpha,
        L,
        dtype,
        seed,
        info=f"features={features}, classes={classes}, alpha={alpha:.3g}",
    )


def make_mlp(inputs: int, hidden: int, dtype: torch.dtype, param_kind: str, seed: int) -> BilevelProblem:
    """A one-hidden-layer tanh MLP regressing ``y = sin(X v)``; parameters ``w1 (hidden,
    inputs), b1 (hidden,), w2 (hidden,), b2 ()``.

    The squared loss is non-convex in the parameters.  Its Hessian is estimated on a cloud
    of points (theta, x0, and random points around them) with a 1.5x margin, giving
    ``mu`` (possibly negative) and ``L``; then ``lam = max(1, 4 max(0, -mu))`` so that the
    argmin objective (weight decay >= lam/2) and the proximal one (+lam) are strongly
    convex.  The choice is verified at both solutions (tight Newton-CG in float64) and
    ``lam`` doubled until the smallest Hessian eigenvalue there is >= lam/8.

    Examples:
        The inner loss may be non-convex (``mu < 0``), the proximal objective is not:

        >>> import torch
        >>> from bilevel.testing import make_mlp
        >>> problem = make_mlp(1, 2, torch.float64, "dict", seed=0)
        >>> list(problem.theta), problem.dim
        (['w1', 'b1', 'w2', 'b2'], 7)
        >>> problem.proximal_curvature[0] > 0
        True
    """
    if inputs < 1 or hidden < 1:
        raise BilevelValueError(f"need inputs >= 1 and hidden >= 1, got {inputs}, {hidden}")
    g = torch.Generator().manual_seed(seed)
    m = 8
    X = torch.randn(2 * m, inputs, generator=g, dtype=_D)
    v = torch.randn(inputs, generator=g, dtype=_D)
    y = torch.sin(X @ v)
    Xtr, ytr, Xv, yv = X[:m], y[:m], X[m:], y[m:]
    specs = (("w1", (hidden, inputs)), ("b1", (hidden,)), ("w2", (hidden,)), ("b2", ()))
    n = hidden * inputs + 2 * hidden + 1
    theta = 0.7 * torch.randn(n, generator=g, dtype=_D)
    x0 = theta + 0.1 * torch.randn(n, generator=g, dtype=_D)

    def net(z: Tensor, X_: Tensor) -> Tensor:
        i = hidden * inputs
        w1 = z[:i].reshape(hidden, inputs)
        b1 = z[i : i + hidden]
        w2 = z[i + hidden : i + 2 * hidden]
        return torch.tanh(X_ @ w1.T + b1) @ w2 + z[-1]

    def flat_inner(z: Tensor, X_: Tensor, y_: Tensor) -> Tensor:
        return 0.5 * ((net(z, X_) - y_) ** 2).mean()

    Xvd, yvd = Xv.to(dtype), yv.to(dtype)

    def flat_outer(z: Tensor) -> Tensor:
        return 0.5 * ((net(z, Xvd) - yvd) ** 2).mean()

    def hess_eigs(z: Tensor) -> Tensor:
        return torch.linalg.eigvalsh(torch.func.hessian(lambda q: flat_inner(q, Xtr, ytr))(z))

    r = 1.0 + float(theta.abs().max())
    cloud = [theta, x0] + [theta + r * torch.randn(n, generator=g, dtype=_D) / math.sqrt(n) for _ in range(6)]
    eigs = torch.stack([hess_eigs(z) for z in cloud])
    mu = 1.5 * min(float(eigs.min()), 0.0)
    L = 1.5 * max(float(eigs.max()), 1e-3)
    lam = max(1.0, 4.0 * max(0.0, -mu))
    lay = _layout(param_kind, n, specs)
    # Verify at the solutions (float64, flat coordinates) and strengthen lam if needed.
    solver = _solvers.NewtonCG(rtol=1e-10, maxiter=100)
    for _ in range(8):
        w_lo = 0.5 * lam

        def prox(z: Tensor, th: Tensor) -> Tensor:
            return flat_inner(z, Xtr, ytr) + 0.5 * lam * ((z - th) ** 2).sum()  # noqa: B023 (used in this iteration)

        def amin(z: Tensor, th: Tensor) -> Tensor:
            return flat_inner(z, Xtr, ytr) + 0.5 * (lam * (0.5 + torch.sigmoid(th)) * z * z).sum()  # noqa: B023

        worst = math.inf
        for obj, start in ((prox, theta), (amin, x0)):
            sol = solver(obj, start.clone(), theta).x
            e = torch.linalg.eigvalsh(torch.func.hessian(lambda q: obj(q, theta))(sol))  # noqa: B023
            worst = min(worst, float(e.min()))
            h = hess_eigs(sol)
            mu = min(mu, 1.5 * float(h.min()))
            L = max(L, 1.5 * float(h.max()))
        if worst >= w_lo / 4 and lam >= 4.0 * max(0.0, -mu):
            break
        lam *= 2.0
    return _finish(
        "mlp",
        lay,
        flat_inner,
        flat_outer,
        theta,
        x0,
        (Xtr, ytr),
        lam,
        mu,
        L,
        dtype,
        seed,
        info=f"inputs={inputs}, hidden={hidden}",
    )


# --------------------------------------------------------------------------------------
# hypothesis strategies
# --------------------------------------------------------------------------------------
IntSpec = int | tuple[int, int]
FloatSpec = float | tuple[float, float]
DtypeSpec = torch.dtype | Sequence[torch.dtype]
KindSpec = str | Sequence[str]


def _st() -> Any:
    try:
        from hypothesis import strategies as st
    except ImportError as e:  # pragma: no cover - hypothesis is a test dependency
        raise ImportError("bilevel.testing strategies need hypothesis: pip install 'bilevel[test]'") from e
    return st


def _ints(spec: IntSpec, name: str, lo: int) -> Any:
    st = _st()
    a, b = (spec, spec) if isinstance(spec, int) else spec
    if not (isinstance(a, int) and isinstance(b, int) and lo <= a <= b):
        raise BilevelValueError(f"{name} must be an int >= {lo} or a range (lo, hi) with {lo} <= lo <= hi, got {spec!r}")
    return st.integers(a, b)


def _choice(spec: Any, name: str, allowed: Sequence[Any]) -> Any:
    st = _st()
    vals = [spec] if isinstance(spec, (str, torch.dtype)) else list(spec)
    if not vals or any(v not in allowed for v in vals):
        raise BilevelValueError(f"{name} must be one of {tuple(allowed)} or a sequence of them, got {spec!r}")
    return st.sampled_from(vals)


def _seeds() -> Any:
    return _st().integers(0, 2**31 - 1)


def _builds(make: Callable[..., BilevelProblem], dtype: DtypeSpec, param_kind: KindSpec, **sizes: Any) -> Any:
    """Strategy of ``make(**sizes, dtype=..., param_kind=..., seed=...)`` over drawn arguments.

    ``sizes`` are strategies (e.g. from :func:`_ints`); ``dtype`` and ``param_kind`` are
    validated and drawn with :func:`_choice`, and a seed is drawn last.
    """
    return _st().builds(
        make,
        **sizes,
        dtype=_choice(dtype, "dtype", DTYPES),
        param_kind=_choice(param_kind, "param_kind", PARAM_KINDS),
        seed=_seeds(),
    )


def quadratic_problems(
    *,
    dim: IntSpec = (2, 8),
    condition: FloatSpec = (1.0, 100.0),
    dtype: DtypeSpec = DTYPES,
    param_kind: KindSpec = PARAM_KINDS,
) -> Any:
    """Strongly convex quadratics with a chosen condition number (see :func:`make_quadratic`).

    Args:
        dim: number of unknowns, or a range ``(lo, hi)``.
        condition: condition number of the inner Hessian ``A``, or a range (drawn
            log-uniformly).
        dtype: a dtype or a sequence of dtypes to draw from.
        param_kind: ``"tensor"``, ``"tuple"``, ``"dict"`` or a sequence of them.

    Returns:
        a hypothesis strategy of :class:`BilevelProblem`.

    Examples:
        A property test: the implicit layer's solution matches the closed form.

        >>> import torch
        >>> from bilevel.testing import quadratic_problems
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=3, deadline=None, database=None)
        ... @given(quadratic_problems(dim=(2, 4), condition=(1.0, 10.0), dtype=torch.float64))
        ... def test_closed_form(problem):
        ...     theta = problem.theta_leaf()
        ...     phi = problem.proximal_layer()(theta, *problem.data)
        ...     exact = problem.exact_proximal(theta)
        ...     assert torch.allclose(problem.layout.flat(phi), problem.layout.flat(exact))
        >>> test_closed_form()
    """
    st = _st()
    if isinstance(condition, (int, float)):
        cond = st.just(float(condition))
        lo = hi = float(condition)
    else:
        lo, hi = (float(c) for c in condition)
        # Drawn in log space so that condition numbers spread over the decades.
        cond = st.floats(math.log(lo), math.log(hi)).map(math.exp) if hi > lo else st.just(lo)
    if not 1.0 <= lo <= hi:
        raise BilevelValueError(f"condition must be >= 1 (or a range 1 <= lo <= hi), got {condition!r}")
    return _builds(make_quadratic, dtype, param_kind, dim=_ints(dim, "dim", 2), condition=cond)


def ridge_problems(*, dim: IntSpec = (2, 8), dtype: DtypeSpec = DTYPES, param_kind: KindSpec = PARAM_KINDS) -> Any:
    """Ridge regression problems (see :func:`make_ridge`).

    The arguments are those of :func:`quadratic_problems` (here ``dim >= 2``); the result is a
    hypothesis strategy of :class:`BilevelProblem`.

    Examples:
        >>> from bilevel.testing import ridge_problems
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=3, deadline=None, database=None)
        ... @given(ridge_problems(dim=3, param_kind="dict"))
        ... def test_ridge(problem):
        ...     assert problem.name == "ridge" and problem.dim == 3 and set(problem.theta) == {"w", "b"}
        >>> test_ridge()
    """
    return _builds(make_ridge, dtype, param_kind, dim=_ints(dim, "dim", 2))


def logistic_problems(*, dim: IntSpec = (2, 8), dtype: DtypeSpec = DTYPES, param_kind: KindSpec = PARAM_KINDS) -> Any:
    """L2-regularised logistic regression problems (see :func:`make_logistic`).

    The arguments are those of :func:`quadratic_problems` (here ``dim >= 2``); the result is a
    hypothesis strategy of :class:`BilevelProblem`.

    Examples:
        >>> from bilevel.testing import logistic_problems
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=3, deadline=None, database=None)
        ... @given(logistic_problems(dim=(2, 4)))
        ... def test_logistic(problem):
        ...     assert 0 < problem.mu <= problem.L and 2 <= problem.dim <= 4
        >>> test_logistic()
    """
    return _builds(make_logistic, dtype, param_kind, dim=_ints(dim, "dim", 2))


def softmax_problems(
    *,
    features: IntSpec = (1, 2),
    classes: IntSpec = (2, 3),
    dtype: DtypeSpec = DTYPES,
    param_kind: KindSpec = PARAM_KINDS,
) -> Any:
    """Softmax regression problems, ``features * classes + classes`` unknowns (see :func:`make_softmax`).

    Args:
        features: number of input features (>= 1), or a range ``(lo, hi)``.
        classes: number of classes (>= 2), or a range ``(lo, hi)``.
        dtype: a dtype or a sequence of dtypes to draw from.
        param_kind: ``"tensor"``, ``"tuple"``, ``"dict"`` or a sequence of them.

    Returns:
        a hypothesis strategy of :class:`BilevelProblem`.

    Examples:
        >>> from bilevel.testing import softmax_problems
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=3, deadline=None, database=None)
        ... @given(softmax_problems(features=1, classes=(2, 3)))
        ... def test_softmax(problem):
        ...     assert problem.dim in (1 * 2 + 2, 1 * 3 + 3)
        >>> test_softmax()
    """
    return _builds(
        make_softmax, dtype, param_kind, features=_ints(features, "features", 1), classes=_ints(classes, "classes", 2)
    )


def mlp_proximal_problems(
    *,
    inputs: IntSpec = (1, 2),
    hidden: IntSpec = (2, 3),
    dtype: DtypeSpec = DTYPES,
    param_kind: KindSpec = PARAM_KINDS,
) -> Any:
    """Small tanh-MLP problems with a proximal weight strong enough for convexity (see :func:`make_mlp`).

    Args:
        inputs: number of inputs (>= 1), or a range ``(lo, hi)``.
        hidden: number of hidden units (>= 1), or a range ``(lo, hi)``.
        dtype: a dtype or a sequence of dtypes to draw from.
        param_kind: ``"tensor"``, ``"tuple"``, ``"dict"`` or a sequence of them.

    Returns:
        a hypothesis strategy of :class:`BilevelProblem`.

    Examples:
        >>> import torch
        >>> from bilevel.testing import mlp_proximal_problems
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=3, deadline=None, database=None)
        ... @given(mlp_proximal_problems(inputs=1, hidden=2, dtype=torch.float64))
        ... def test_mlp(problem):
        ...     assert problem.proximal_curvature[0] > 0     # strongly convex with the proximal term
        >>> test_mlp()
    """
    return _builds(make_mlp, dtype, param_kind, inputs=_ints(inputs, "inputs", 1), hidden=_ints(hidden, "hidden", 1))


PROBLEM_NAMES: tuple[str, ...] = ("quadratic", "ridge", "logistic", "softmax", "mlp")
"""The problem families :func:`problems` draws from (its ``names`` argument).

Examples:
    >>> from bilevel.testing import PROBLEM_NAMES
    >>> PROBLEM_NAMES
    ('quadratic', 'ridge', 'logistic', 'softmax', 'mlp')
"""


def problems(
    *,
    names: Sequence[str] = PROBLEM_NAMES,
    max_dim: int = 8,
    dtype: DtypeSpec = DTYPES,
    param_kind: KindSpec = PARAM_KINDS,
) -> Any:
    """Any of the problem families (``one_of``), each with at most ``max_dim`` unknowns.

    Args:
        names: which families to draw from (a subset of :data:`PROBLEM_NAMES`).
        max_dim: upper bound on the number of unknowns (>= 4: the smallest softmax
            problem has 4; the smallest MLP 4).
        dtype: a dtype or a sequence of dtypes to draw from.
        param_kind: ``"tensor"``, ``"tuple"``, ``"dict"`` or a sequence of them.

    Returns:
        a hypothesis strategy of :class:`BilevelProblem`.

    Examples:
        >>> from bilevel.testing import problems
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=3, deadline=None, database=None)
        ... @given(problems(names=("quadratic", "logistic"), max_dim=5))
        ... def test_any(problem):
        ...     assert problem.name in ("quadratic", "logistic") and problem.dim <= 5
        >>> test_any()
    """
    st = _st()
    if not names or any(n not in PROBLEM_NAMES for n in names):
        raise BilevelValueError(f"names must be a non-empty subset of {PROBLEM_NAMES}, got {names!r}")
    if not (isinstance(max_dim, int) and max_dim >= 4):
        raise BilevelValueError(f"max_dim must be an int >= 4, got {max_dim!r}")
    kw: dict[str, Any] = {"dtype": dtype, "param_kind": param_kind}
    d = (2, max_dim)
    out = []
    for name in names:
        if name == "quadratic":
            out.append(quadratic_problems(dim=d, **kw))
        elif name == "ridge":
            out.append(ridge_problems(dim=d, **kw))
        elif name == "logistic":
            out.append(logistic_problems(dim=d, **kw))
        elif name == "softmax":
            # features * classes + classes <= max_dim with classes = 2: features <= max_dim/2 - 1
            out.append(softmax_problems(features=(1, max(1, min(2, max_dim // 2 - 1))), classes=(2, 2 if max_dim < 9 else 3), **kw))
        else:
            # hidden * (inputs + 2) + 1 <= max_dim: two inputs only when 2 hidden units fit.
            i_hi = 2 if max_dim >= 9 else 1
            h_hi = max(1, min(3, (max_dim - 1) // (i_hi + 2)))
            out.append(mlp_proximal_problems(inputs=(1, i_hi), hidden=(1, h_hi), **kw))
    return st.one_of(*out)
