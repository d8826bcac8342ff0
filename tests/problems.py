"""The problem families the tests run the solvers on, with independent references.

* Linear systems (:class:`Systems`): seeded well-conditioned matrices of the families
  ``SYSTEM_FAMILIES`` -- ``"spd"``, ``"indefinite"`` (symmetric), ``"nonsymmetric"`` and
  the contractions ``I - M`` of the Neumann series (``"neumann-symmetric"``,
  ``"neumann-nonsymmetric"``); :class:`Trees` views a flat vector as a tensor or a dict
  tree, written independently of ``bilevel._tree``.
* Inner objectives: L2-regularised logistic regression (with a scipy reference minimiser)
  and quadratics ``1/2 x^T H x - b^T x`` with a chosen condition number.

``tests/registry.py`` says which solver configuration applies to which family; the
linear-system helpers are also the ``systems`` and ``trees`` fixtures
(``tests/linsolve/conftest.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.optimize
import torch
from torch import Tensor

# -- linear systems -----------------------------------------------------------------------
SYSTEM_FAMILIES: tuple[str, ...] = ("spd", "indefinite", "nonsymmetric", "neumann-symmetric", "neumann-nonsymmetric")
"""The linear-system families of :class:`Systems` (the ``systems`` of a registry entry)."""

N = 16  # unknowns: a (16,) tensor, or {'w': (3, 4), 'b': (4,)}


class Systems:
    """Well-conditioned random systems from a seeded generator (built in float64)."""

    n = N
    # Accuracy of a solution against torch.linalg.solve (relative error), per dtype.  The
    # test systems have condition numbers <= 100 and the solvers run at their default
    # (dtype-derived) relative tolerance, eps**0.75, so the relative error is at most
    # cond * eps**0.75: ~2e-10 in float64 and ~6e-4 in float32.
    rtol = {torch.float64: 1e-8, torch.float32: 1e-3}

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64)

    def orthogonal(self, n: int) -> Tensor:
        q, _ = torch.linalg.qr(self.randn(n, n))
        return q

    def symmetric(self, eigenvalues: Tensor) -> Tensor:
        q = self.orthogonal(eigenvalues.numel())
        a = (q * eigenvalues) @ q.T
        return (a + a.T) / 2

    def spd(self, n: int = N, cond: float = 10.0) -> Tensor:
        """Symmetric positive definite, eigenvalues geometrically spread over [1, cond]."""
        return self.symmetric(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64))

    def indefinite(self, n: int = N, cond: float = 10.0) -> Tensor:
        """Symmetric indefinite: eigenvalues +-[1, cond] with both signs present."""
        mags = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
        signs = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(torch.float64)
        return self.symmetric(mags * signs)

    def nonsymmetric(self, n: int = N, cond: float = 10.0, skew: float = 0.5) -> Tensor:
        """SPD part (eigenvalues in [1, cond]) plus a skew-symmetric part of 2-norm ``skew``:
        non-symmetric, non-singular (the symmetric part is positive definite)."""
        g = self.randn(n, n)
        k = g - g.T
        return self.spd(n, cond) + skew * k / torch.linalg.matrix_norm(k, ord=2)

    def neumann(self, n: int = N, radius: float = 0.4, symmetric: bool = False) -> Tensor:
        """``A = I - M`` with ``||M||_2 = radius < 1``: the series with alpha = 1 converges
        monotonically at rate ``radius``."""
        if symmetric:
            m = self.symmetric(radius * (2 * torch.rand(n, generator=self.gen, dtype=torch.float64) - 1))
            m = m * (radius / torch.linalg.matrix_norm(m, ord=2))
        else:
            g = self.randn(n, n)
            m = radius * g / torch.linalg.matrix_norm(g, ord=2)
        return torch.eye(n, dtype=torch.float64) - m

    def system(self, kind: str, n: int = N, cond: float = 10.0, radius: float = 0.4) -> Tensor:
        """A matrix of the family ``kind`` (one of ``SYSTEM_FAMILIES``): condition number
        ``cond``, or for the Neumann families the contraction radius ``radius``."""
        if kind.startswith("neumann-"):
            return self.neumann(n, radius, symmetric=kind == "neumann-symmetric")
        return {
            "spd": self.spd,
            "indefinite": self.indefinite,
            "nonsymmetric": self.nonsymmetric,
        }[kind](n, cond)


class Trees:
    """Views of a flat vector as a tensor or a dict tree, and dense matvecs on them.

    Written independently of ``bilevel._tree`` so that the tests do not rely on the
    helpers the solvers use.
    """

    kinds = ("tensor", "dict")

    @staticmethod
    def to_tree(flat: Tensor, kind: str, batched: bool = False) -> Any:
        if kind == "tensor":
            return flat.clone()
        lead = flat.shape[:1] if batched else ()
        w = flat[..., :12].reshape(*lead, 3, 4)
        b = flat[..., 12:16].reshape(*lead, 4)
        return {"w": w.clone(), "b": b.clone()}

    @staticmethod
    def from_tree(tree: Any, kind: str, batched: bool = False) -> Tensor:
        if kind == "tensor":
            return tree
        lead = tree["b"].shape[:1] if batched else ()
        return torch.cat([tree["w"].reshape(*lead, 12), tree["b"].reshape(*lead, 4)], dim=-1)

    @classmethod
    def matvec(cls, a: Tensor, kind: str, batched: bool = False) -> Callable[[Any], Any]:
        """``v -> A v`` on trees of ``kind`` (``a`` is (n, n), or (B, n, n) when batched)."""

        def mv(v: Any) -> Any:
            flat = cls.from_tree(v, kind, batched)
            return cls.to_tree((a @ flat.unsqueeze(-1)).squeeze(-1), kind, batched)

        return mv


# -- inner objectives ---------------------------------------------------------------------
LAM = 0.1  # L2 weight of the logistic regression: its Hessian is >= LAM * I


@functools.cache
def logistic_data(seed: int = 0, n: int = 60, d: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Features (n, d) and labels in {-1, +1}, non-separable (labels are noisy)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, d))
    w_true = rng.normal(size=d)
    p = 1.0 / (1.0 + np.exp(-a @ w_true))
    y = np.where(rng.random(n) < p, 1.0, -1.0)
    return a, y


def logistic_torch(w: torch.Tensor, a: torch.Tensor, y: torch.Tensor, lam: float = LAM) -> torch.Tensor:
    """Mean logistic loss + lam/2 ||w||^2 (scalar); batched over a leading dim if ``w`` is 2-D."""
    z = torch.einsum("nd,...d->...n", a, w)
    return torch.nn.functional.softplus(-y * z).mean(-1) + 0.5 * lam * (w * w).sum(-1)


def logistic_dict(p: dict, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The same loss with a separate (also regularised) bias: ``{'w': (d,), 'b': ()}``."""
    z = a @ p["w"] + p["b"]
    return torch.nn.functional.softplus(-y * z).mean() + 0.5 * LAM * ((p["w"] ** 2).sum() + p["b"] ** 2)


def logistic_tuple(p: tuple, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return logistic_dict({"w": p[0], "b": p[1]}, a, y)


def _np_loss_grad(w: np.ndarray, a: np.ndarray, y: np.ndarray, lam: float) -> tuple[float, np.ndarray]:
    z = -y * (a @ w)
    loss = np.logaddexp(0.0, z).mean() + 0.5 * lam * w @ w
    s = 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid(z), overflow-free
    grad = a.T @ (-y * s) / len(y) + lam * w
    return float(loss), grad


def _np_hess(w: np.ndarray, a: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    s = 0.5 * (1.0 + np.tanh(0.5 * (-y * (a @ w))))
    return (a.T * (s * (1 - s))) @ a / len(y) + lam * np.eye(len(w))


@functools.cache
def logistic_reference(seed: int = 0, with_bias: bool = False, lam: float = LAM) -> np.ndarray:
    """Minimiser by scipy BFGS (gtol 1e-12) on a NumPy implementation of the loss,
    polished by two exact Newton steps (BFGS stops at ~1e-10 with "precision loss").

    The returned point's own gradient norm is checked to be < 1e-10, so (strong convexity
    with modulus >= lam) it is within 1e-10 / lam of the exact minimiser.
    """
    a, y = logistic_data(seed)
    if with_bias:
        a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
    res = scipy.optimize.minimize(
        _np_loss_grad, np.zeros(a.shape[1]), args=(a, y, lam), jac=True, method="BFGS", options={"gtol": 1e-12}
    )
    x = res.x
    for _ in range(2):
        x = x - np.linalg.solve(_np_hess(x, a, y, lam), _np_loss_grad(x, a, y, lam)[1])
    gnorm = np.linalg.norm(_np_loss_grad(x, a, y, lam)[1])
    assert gnorm < 1e-10, gnorm
    return x


def logistic_problem(dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    a, y = logistic_data(seed)
    return torch.tensor(a, dtype=dtype), torch.tensor(y, dtype=dtype)


def spd_matrix(d: int, cond: float, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Random SPD matrix with eigenvalues log-spaced in [1, cond]."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    ev = torch.logspace(0.0, float(np.log10(cond)), d, dtype=torch.float64)
    return ((q * ev) @ q.T).to(dtype)


def quadratic(x: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """0.5 x^T H x - b^T x; batched (per-task H, b) when x is (B, d)."""
    return 0.5 * torch.einsum("...i,...ij,...j->...", x, h, x) - (b * x).sum(-1)


def quadratic_problem(cond: float, d: int = 10, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(H, b, x*) with x* from torch.linalg.solve."""
    h = spd_matrix(d, cond, seed)
    b = torch.randn(d, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    return h, b, torch.linalg.solve(h, b)
