"""Test problems with independent references (numpy/scipy/closed forms) for tests/solvers.

Not a test module (no ``test_`` prefix); imported by the ``test_solvers_*.py`` files.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.optimize
import torch

LAM = 0.1  # L2 weight of the logistic regression: its Hessian is >= LAM * I


@functools.lru_cache(maxsize=None)
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


@functools.lru_cache(maxsize=None)
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
