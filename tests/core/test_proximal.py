"""Proximal layer against closed forms (ridge regression), gradcheck, batching, memory."""

from __future__ import annotations

import pytest
import torch

import bilevel
import bilevel.linsolve as ls_mod
from bilevel import Proximal
from bilevel.linsolve import CG
from tests.core.core_helpers import DenseNewton, PlainGD

DT = torch.float64


def ridge_data(n: int = 40, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)


def sq_loss(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((X @ w - y) ** 2).mean()


def closed_form(theta: torch.Tensor, lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """φ* = (XᵀX/n + Λ)⁻¹ (Xᵀy/n + Λθ), differentiable by ordinary autograd."""
    n, d = X.shape
    Lam = torch.diag(lam * torch.ones(d, dtype=DT)) if lam.dim() == 0 else torch.diag(lam)
    return torch.linalg.solve(X.T @ X / n + Lam, X.T @ y / n + Lam @ theta)


def outer(phi: torch.Tensor) -> torch.Tensor:
    return (phi**2).sum() + torch.sin(phi).sum()


@pytest.mark.parametrize("per_element", [False, True])
def test_ridge_gradients_match_closed_form(per_element: bool) -> None:
    X, y = ridge_data()
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(6, generator=g, dtype=DT, requires_grad=True)
    lam0 = torch.rand(6, generator=g, dtype=DT) + 0.5 if per_element else torch.tensor(0.8, dtype=DT)
    lam = lam0.clone().requires_grad_(True)
    layer = Proximal(sq_loss, lam, solver=DenseNewton(), linsolve=CG(rtol=1e-13))
    phi = layer(theta, X, y)
    gt, gl = torch.autograd.grad(outer(phi), (theta, lam))

    th2 = theta.detach().clone().requires_grad_(True)
    l2 = lam0.clone().requires_grad_(True)
    phi2 = closed_form(th2, l2, X, y)
    rt, rl = torch.autograd.grad(outer(phi2), (th2, l2))
    torch.testing.assert_close(phi, phi2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gt, rt, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gl, rl, rtol=1e-9, atol=1e-11)
    assert gl.shape == lam.shape
    assert layer.diagnostics.backward.status is bilevel.Status.SUCCESS


def test_dict_theta_per_layer_lam_matches_closed_form() -> None:
    """θ = {'w', 'b'} (affine model), λ one scalar per parameter tensor, both require grad."""
    X, y = ridge_data(n=30, d=4, seed=3)
    g = torch.Generator().manual_seed(4)
    theta = {
        "w": torch.randn(4, generator=g, dtype=DT, requires_grad=True),
        "b": torch.randn((), generator=g, dtype=DT, requires_grad=True),
    }
    lam = {"w": torch.tensor(0.6, dtype=DT, requires_grad=True), "b": torch.tensor(1.7, dtype=DT, requires_grad=True)}

    def loss(p: dict, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((X @ p["w"] + p["b"] - y) ** 2).mean()

    layer = Proximal(loss, lam, solver=DenseNewton(), linsolve=CG(rtol=1e-13))
    phi = layer(theta, X, y)
    assert set(phi) == {"w", "b"} and phi["b"].shape == ()
    leaves = [theta["w"], theta["b"], lam["w"], lam["b"]]
    got = torch.autograd.grad(outer(phi["w"]) + 3 * phi["b"], leaves)

    # Dense reference: augment X with a ones column; Λ = diag(λ_w,...,λ_w, λ_b).
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    tw, tb, lw, lb = ref_leaves
    Xa = torch.cat([X, torch.ones(30, 1, dtype=DT)], 1)
    lam_vec = torch.cat([lw.expand(4), lb.reshape(1)])
    th_vec = torch.cat([tw, tb.reshape(1)])
    sol = torch.linalg.solve(Xa.T @ Xa / 30 + torch.diag(lam_vec), Xa.T @ y / 30 + lam_vec * th_vec)
    want = torch.autograd.grad(outer(sol[:4]) + 3 * sol[4], ref_leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_gradcheck_proximal() -> None:
    X, y = ridge_data(n=12, d=3, seed=5)

    def f(theta: torch.Tensor, lam: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        layer = Proximal(sq_loss, solver=DenseNewton(), linsolve=CG(rtol=1e-14))
        return layer(theta, X, y, lam=lam)

    theta = torch.randn(3, dtype=DT, requires_grad=True)
    lam = torch.tensor(0.9, dtype=DT, requires_grad=True)
    Xg = X.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (theta, lam, Xg), eps=1e-6, atol=1e-7, rtol=1e-6)


def _mlp_problem(seed: int = 0) -> tuple[dict, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    theta = {
        "w1": (torch.randn(8, 3, generator=g, dtype=DT) * 0.5).requires_grad_(True),
        "b1": torch.zeros(8, dtype=DT).requires_grad_(True),
        "w2": (torch.randn(1, 8, generator=g, dtype=DT) * 0.5).requires_grad_(True),
    }
    return theta, torch.randn(5, 20, 3, generator=g, dtype=DT), torch.randn(5, 20, 1, generator=g, dtype=DT)


def mlp_loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(x @ p["w1"].T + p["b1"])
    return ((h @ p["w2"].T - y) ** 2).mean()


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_batched_equals_looped(strategy: str) -> None:
    """One batched call over B tasks == the sum of B single-task calls (θ and λ gradients)."""
    theta, xs, ys = _mlp_problem()
    lam = torch.tensor(2.0, dtype=DT, requires_grad=True)
    layer = Proximal(mlp_loss, lam, solver=PlainGD(lr=0.2, steps=400), linsolve=CG(rtol=1e-12))
    phi = layer(theta, xs, ys, batched=strategy)
    assert phi["w1"].shape == (5, 8, 3)
    loss = sum((phi[k] ** 2).sum() for k in phi)
    got = torch.autograd.grad(loss, [*theta.values(), lam])
    diag = layer.diagnostics
    assert diag.backward.task_status is not None and len(diag.backward.task_status) == 5
    assert diag.backward.residual_norm.shape == (5,)

    want = [torch.zeros_like(t) for t in [*theta.values(), lam]]
    for b in range(5):
        p = layer(theta, xs[b], ys[b])
        torch.testing.assert_close(p["w1"], phi["w1"][b], rtol=1e-10, atol=1e-12)
        gb = torch.autograd.grad(sum((p[k] ** 2).sum() for k in p), [*theta.values(), lam])
        want = [w + g for w, g in zip(want, gb)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def _saved_bytes(fn) -> int:  # type: ignore[no-untyped-def]
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.dtype)
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def test_saved_bytes_independent_of_inner_steps() -> None:
    theta, xs, ys = _mlp_problem(1)
    sizes = {}
    for steps in (10, 100, 1000):
        layer = Proximal(mlp_loss, 1.0, solver=PlainGD(lr=0.1, steps=steps), linsolve=CG(maxiter=5), on_failure="ignore")
        sizes[steps] = _saved_bytes(lambda: layer(theta, xs[0], ys[0]))
    assert sizes[10] > 0
    assert sizes[10] == sizes[100] == sizes[1000]
    # Sanity of the measurement itself: unrolled descent keeps more with more steps.
    def unrolled(steps: int) -> dict:
        p = dict(theta)
        for _ in range(steps):
            g = torch.autograd.grad(mlp_loss(p, xs[0], ys[0]), list(p.values()), create_graph=True)
            p = {k: v - 0.1 * gk for (k, v), gk in zip(p.items(), g)}
        return p

    assert _saved_bytes(lambda: unrolled(20)) > 5 * _saved_bytes(lambda: unrolled(2))


def test_no_graph_kept_on_layer() -> None:
    """The layer keeps statistics only: no tensor attribute that requires grad or has a graph."""
    theta, xs, ys = _mlp_problem(2)
    lam_param = torch.tensor(0.0, dtype=DT, requires_grad=True)
    layer = Proximal(mlp_loss, solver=PlainGD(lr=0.1, steps=5), linsolve=CG(maxiter=3), on_failure="ignore")
    phi = layer(theta, xs, ys, batched=True, lam=torch.nn.functional.softplus(lam_param) + 0.5)
    sum(v.sum() for v in phi.values()).backward()
    assert lam_param.grad is not None and torch.isfinite(lam_param.grad)

    def walk(obj, depth=0):  # type: ignore[no-untyped-def]
        if depth > 4:
            return
        if isinstance(obj, torch.Tensor):
            assert obj.grad_fn is None and not obj.requires_grad
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v, depth + 1)
        elif hasattr(obj, "__dict__"):
            for v in vars(obj).values():
                walk(v, depth + 1)

    walk(layer)


def test_dense_linsolve_agrees_with_cg() -> None:
    theta, xs, ys = _mlp_problem(3)
    grads = []
    for ls in (CG(rtol=1e-13), ls_mod.Dense()):
        layer = Proximal(mlp_loss, 1.5, solver=PlainGD(lr=0.2, steps=300), linsolve=ls)
        phi = layer(theta, xs[0], ys[0])
        grads.append(torch.autograd.grad(sum((v**2).sum() for v in phi.values()), list(theta.values())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


class _CubeNoForwardAD(torch.autograd.Function):
    """x**3 with a backward but no jvp rule: forward-mode AD must fall back to reverse mode."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


@pytest.mark.parametrize("hvp", ["forward", "reverse"])
def test_hvp_modes_agree_with_closed_form(hvp: str) -> None:
    X, y = ridge_data(seed=7)
    theta = torch.randn(6, generator=torch.Generator().manual_seed(10), dtype=DT, requires_grad=True)
    layer = Proximal(sq_loss, 0.8, solver=DenseNewton(), linsolve=CG(rtol=1e-13), hvp=hvp)
    (g,) = torch.autograd.grad(outer(layer(theta, X, y)), theta)
    th2 = theta.detach().clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(outer(closed_form(th2, torch.tensor(0.8, dtype=DT), X, y)), th2)
    torch.testing.assert_close(g, g2, rtol=1e-9, atol=1e-11)


def test_forward_mode_falls_back_to_reverse_mode() -> None:
    """An op with no forward-mode rule: hvp='forward' still gives the right gradient."""

    def loss(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sq_loss(w, X, y) + 0.1 * _CubeNoForwardAD.apply(w).pow(2).sum()

    X, y = ridge_data(seed=8)
    theta = (0.3 * torch.randn(6, generator=torch.Generator().manual_seed(9), dtype=DT)).requires_grad_(True)
    grads = []
    for hvp in ("forward", "reverse"):
        layer = Proximal(loss, 1.0, solver=PlainGD(lr=0.2, steps=600), linsolve=CG(rtol=1e-12), hvp=hvp)
        grads.append(torch.autograd.grad(outer(layer(theta, X, y)), theta)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
    # And both equal the dense reference (I + H/λ)^{-1} v with H from torch.func.hessian.
    layer = Proximal(loss, 1.0, solver=PlainGD(lr=0.2, steps=600), linsolve=CG(rtol=1e-12))
    phi = layer(theta, X, y).detach().requires_grad_(True)
    (v,) = torch.autograd.grad(outer(phi), phi)
    H = torch.autograd.functional.hessian(lambda w: loss(w, X, y), phi.detach())
    want = torch.linalg.solve(torch.eye(6, dtype=DT) + H, v)
    torch.testing.assert_close(grads[0], want, rtol=1e-8, atol=1e-10)


def test_hvp_modes_agree_in_batched_mode() -> None:
    """Batched meta-gradients with forward- and reverse-mode products agree (a fixed CG budget)."""
    theta, xs, ys = _mlp_problem(4)
    grads = []
    for hvp in ("forward", "reverse"):
        layer = Proximal(mlp_loss, 1.0, solver=PlainGD(lr=0.1, steps=16), linsolve=CG(maxiter=5), on_failure="ignore", hvp=hvp)
        phi = layer(theta, xs, ys, batched=True)
        grads.append(torch.autograd.grad(sum((v**2).sum() for v in phi.values()), list(theta.values())))
        assert layer.diagnostics.backward.iterations == 5
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
