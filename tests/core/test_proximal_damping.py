"""Proximal's ``damping``: the backward solves (H + Λ + δI) u = v (a dense reference), the
forward is unchanged, and δ = 0 is the exact gradient."""

from __future__ import annotations

import pytest
import torch

from bilevel import Proximal
from bilevel.linsolve import CG, MINRES
from tests.core.core_helpers import DenseNewton

DT = torch.float64


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(30, 5, generator=g, dtype=DT)
    y = torch.randn(30, generator=g, dtype=DT)
    theta = torch.randn(5, generator=g, dtype=DT)
    c = torch.randn(5, generator=g, dtype=DT)
    return X, y, theta, c


def sq_loss(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((X @ w - y) ** 2).mean()


@pytest.mark.parametrize("hvp", ["forward", "reverse"])
@pytest.mark.parametrize("linsolve", [CG, MINRES])
def test_damped_gradients_match_dense_system(hvp: str, linsolve: type) -> None:
    X, y, theta0, c = _problem()
    lam0, delta = 0.7, 1.9
    theta = theta0.clone().requires_grad_(True)
    lam = torch.tensor(lam0, dtype=DT, requires_grad=True)
    layer = Proximal(sq_loss, solver=DenseNewton(), linsolve=linsolve(rtol=1e-13, maxiter=200), damping=delta, hvp=hvp)
    phi = layer(theta, X, y, lam=lam)
    gt, gl = torch.autograd.grad((c * phi).sum() + (phi**2).sum(), (theta, lam))

    # Dense: φ* is the undamped minimiser; u = (H + λI + δI)^{-1} v; g_θ = λu; g_λ = -(φ*-θ)·u.
    H = X.T @ X / X.shape[0]
    eye = torch.eye(5, dtype=DT)
    phi_ref = torch.linalg.solve(H + lam0 * eye, X.T @ y / X.shape[0] + lam0 * theta0)
    torch.testing.assert_close(phi.detach(), phi_ref, rtol=1e-10, atol=1e-12)
    v = c + 2 * phi_ref
    u = torch.linalg.solve(H + (lam0 + delta) * eye, v)
    torch.testing.assert_close(gt, lam0 * u, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gl, -((phi_ref - theta0) * u).sum(), rtol=1e-9, atol=1e-11)
    # And it is biased: not the exact gradient λ(H + λI)^{-1} v.
    exact = lam0 * torch.linalg.solve(H + lam0 * eye, v)
    assert (gt - exact).norm() > 1e-3 * exact.norm()


def test_damped_batched_equals_per_task() -> None:
    X, y, theta0, c = _problem(1)
    Xb, yb = torch.stack([X, 2 * X]), torch.stack([y, -y])
    layer = Proximal(sq_loss, lam=0.5, solver=DenseNewton(), linsolve=CG(rtol=1e-13, maxiter=200), damping=0.3)
    theta = theta0.clone().requires_grad_(True)
    (gb,) = torch.autograd.grad((layer(theta, Xb, yb, batched=True) * c).sum(), theta)
    gl = sum(torch.autograd.grad((layer(theta, Xb[i], yb[i]) * c).sum(), theta)[0] for i in range(2))
    torch.testing.assert_close(gb, gl, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), True, "1"])
def test_bad_damping_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="damping"):
        Proximal(sq_loss, damping=bad)  # type: ignore[arg-type]
