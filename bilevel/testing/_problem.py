"""Well-posed random bilevel problems: :class:`BilevelProblem` and its parameter layouts.

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
The families are built in :mod:`bilevel.testing._builders`, drawn by the strategies of
:mod:`bilevel.testing._strategies`.
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
