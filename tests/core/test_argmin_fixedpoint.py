"""Argmin, FixedPoint and custom_root against dense implicit-function-theorem references."""

from __future__ import annotations

import pytest
import torch

import bilevel
from bilevel import Argmin, FixedPoint, custom_root
from bilevel.linsolve import CG
from tests.core.core_helpers import DenseNewton, PlainGD

DT = torch.float64


def logistic_data(n: int = 50, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    w = torch.randn(d, generator=g, dtype=DT)
    y = torch.where(X @ w + 0.5 * torch.randn(n, generator=g, dtype=DT) > 0, 1.0, -1.0).to(DT)
    return X, y


def logreg(x: torch.Tensor, theta: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L2-logistic regression, one regularisation weight exp(θ_j) per feature."""
    return torch.nn.functional.softplus(-y * (X @ x)).mean() + 0.5 * (torch.exp(theta) * x**2).sum()


def dense_ift_grad(theta: torch.Tensor, x_star: torch.Tensor, X: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """dℓ/dθ = -(∂²f/∂x∂θ)ᵀ H⁻¹ v, with H and the mixed derivatives materialised."""
    H = torch.func.hessian(logreg, argnums=0)(x_star, theta, X, y)
    M = torch.func.jacrev(torch.func.grad(logreg, argnums=0), argnums=1)(x_star, theta, X, y)  # (d_x, d_θ)
    return -M.T @ torch.linalg.solve(H, v)


def test_argmin_logistic_matches_dense_reference() -> None:
    X, y = logistic_data()
    theta = torch.linspace(-2, 1, 5, dtype=DT).requires_grad_(True)
    layer = Argmin(logreg, solver=DenseNewton(), linsolve=CG(rtol=1e-13))
    x = layer(torch.zeros(5, dtype=DT), theta, X, y)
    gx = torch.func.grad(logreg)(x.detach(), theta.detach(), X, y)
    assert float(gx.norm()) < 1e-10
    v = torch.arange(1.0, 6.0, dtype=DT)
    (g,) = torch.autograd.grad((x * v).sum(), theta)
    torch.testing.assert_close(g, dense_ift_grad(theta.detach(), x.detach(), X, y, v), rtol=1e-9, atol=1e-11)


def test_argmin_gradient_independent_of_initial_point() -> None:
    X, y = logistic_data(seed=1)
    theta = torch.zeros(5, dtype=DT, requires_grad=True)
    layer = Argmin(logreg, solver=DenseNewton(), linsolve=CG(rtol=1e-13))
    grads = []
    for x0 in (torch.zeros(5, dtype=DT), torch.full((5,), 3.0, dtype=DT)):
        x = layer(x0, theta, X, y)
        grads.append(torch.autograd.grad(x.sum(), theta)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-11)


def test_implicit_gradient_is_limit_of_unrolled() -> None:
    """Unrolled GD's gradient approaches the implicit one as the number of inner steps grows."""
    X, y = logistic_data(seed=2)
    theta = torch.full((5,), -1.0, dtype=DT, requires_grad=True)
    x0 = torch.zeros(5, dtype=DT)
    layer = Argmin(logreg, solver=DenseNewton(), linsolve=CG(rtol=1e-13))
    (g_imp,) = torch.autograd.grad(layer(x0, theta, X, y).sum(), theta)

    def unrolled(steps: int) -> torch.Tensor:
        x = x0.clone().requires_grad_(True)
        for _ in range(steps):
            (gx,) = torch.autograd.grad(logreg(x, theta, X, y), x, create_graph=True)
            x = x - 0.5 * gx
        return torch.autograd.grad(x.sum(), theta)[0]

    errs = [float((unrolled(k) - g_imp).norm()) for k in (5, 20, 80, 320)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-6 * max(1.0, float(g_imp.norm()))


def test_fixed_point_matches_dense_reference() -> None:
    """x* = tanh(W x* + U a) with ||W|| < 1 (a contraction), gradients w.r.t. W, U and a."""
    g = torch.Generator().manual_seed(3)
    n = 6
    W0 = torch.randn(n, n, generator=g, dtype=DT)
    W = (0.5 * W0 / torch.linalg.matrix_norm(W0, 2)).requires_grad_(True)
    U = torch.randn(n, 3, generator=g, dtype=DT).requires_grad_(True)
    a = torch.randn(3, generator=g, dtype=DT).requires_grad_(True)

    def fn(x: torch.Tensor, W: torch.Tensor, U: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return torch.tanh(W @ x + U @ a)

    class Iterate:
        def __call__(self, f, x0, *args, batched=False):  # type: ignore[no-untyped-def]
            x = x0
            for _ in range(200):
                x = f(x, *args)
            return bilevel.SolverResult(x=x, status=bilevel.Status.COMPLETED, iterations=200)

    layer = FixedPoint(fn, solver=Iterate(), linsolve=bilevel.linsolve.GMRES(rtol=1e-13))
    x = layer(torch.zeros(n, dtype=DT), W, U, a)
    v = torch.linspace(-1, 1, n, dtype=DT)
    got = torch.autograd.grad((x * v).sum(), (W, U, a))

    xs = x.detach()
    J = torch.func.jacrev(fn, argnums=0)(xs, W.detach(), U.detach(), a.detach())
    u = torch.linalg.solve((torch.eye(n, dtype=DT) - J).T, v)
    _, vjp = torch.func.vjp(lambda W_, U_, a_: fn(xs, W_, U_, a_), W.detach(), U.detach(), a.detach())
    want = vjp(u)
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


def test_custom_root_with_external_solver() -> None:
    """A non-differentiable solver (numpy) inside custom_root: d sqrt(a)/da = 1/(2 sqrt(a))."""

    @custom_root(lambda x, a: x**2 - a, symmetric=False)
    def np_sqrt(x0: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        import numpy as np

        return torch.from_numpy(np.sqrt(a.numpy()))

    a = torch.tensor([0.5, 2.0, 9.0], dtype=DT, requires_grad=True)
    x = np_sqrt(torch.ones(3, dtype=DT), a)
    (g,) = torch.autograd.grad(x.sum(), a)
    torch.testing.assert_close(g, 0.5 / torch.sqrt(a.detach()), rtol=1e-10, atol=1e-12)
    assert np_sqrt.diagnostics.backward.success


def test_custom_root_tree_args_and_static_args() -> None:
    """Tree-valued args get tree-valued gradients; non-tensor args pass through untouched."""

    def F(x: dict, p: dict, scale: float) -> dict:
        return {"u": x["u"] - scale * p["a"] ** 2, "v": x["v"] - p["b"] * p["a"].sum()}

    @custom_root(F)
    def solve(x0: dict, p: dict, scale: float) -> dict:
        return {"u": scale * p["a"] ** 2, "v": p["b"] * p["a"].sum()}

    p = {"a": torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True), "b": torch.tensor(3.0, dtype=DT, requires_grad=True)}
    x = solve({"u": torch.zeros(2, dtype=DT), "v": torch.zeros((), dtype=DT)}, p, 0.5)
    ga, gb = torch.autograd.grad(x["u"].sum() + x["v"], (p["a"], p["b"]))
    torch.testing.assert_close(ga, torch.tensor([1.0 + 3.0, 2.0 + 3.0], dtype=DT))
    torch.testing.assert_close(gb, torch.tensor(3.0, dtype=DT))


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_batched_argmin_equals_looped(strategy: str) -> None:
    X, y = logistic_data(n=40, seed=4)
    Xb = torch.stack([X, X.flip(0) * 0.7, X * 1.3])
    yb = torch.stack([y, y.flip(0), -y])
    theta = torch.tensor([-1.0, 0.0, 0.5, -0.3, 0.2], dtype=DT, requires_grad=True)
    layer = Argmin(logreg, solver=PlainGD(lr=0.5, steps=1500), linsolve=CG(rtol=1e-12))
    xb = layer(torch.zeros(3, 5, dtype=DT), theta, Xb, yb, batched=strategy, in_dims=(None, 0, 0))
    (gb,) = torch.autograd.grad((xb**2).sum(), theta)
    gl = torch.zeros(5, dtype=DT)
    for b in range(3):
        x = layer(torch.zeros(5, dtype=DT), theta, Xb[b], yb[b])
        gl += torch.autograd.grad((x**2).sum(), theta)[0]
    torch.testing.assert_close(gb, gl, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_preserved(dtype: torch.dtype) -> None:
    X, y = logistic_data(seed=5)
    theta = torch.zeros(5, dtype=dtype, requires_grad=True)
    layer = Argmin(logreg, solver=DenseNewton(tol=1e-5 if dtype == torch.float32 else 1e-12), linsolve=CG())
    x = layer(torch.zeros(5, dtype=dtype), theta, X.to(dtype), y.to(dtype))
    (g,) = torch.autograd.grad(x.sum(), theta)
    assert x.dtype == dtype and g.dtype == dtype
    ref = dense_ift_grad(theta.detach().double(), x.detach().double(), X, y, torch.ones(5, dtype=DT))
    tol = 1e-3 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(g.double(), ref, rtol=tol, atol=tol)
