"""Models of the iMAML application: shapes, and batch norm that is exact under vmap/grad/jvp."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap

from applications.imaml.models import MLP, ConvNet, build_model, task_batch_norm

DT = torch.float64


def test_shapes_and_parameter_names() -> None:
    om = build_model("omniglot", 5, image_shape=(1, 28, 28))
    assert om(torch.randn(7, 1, 28, 28)).shape == (7, 5)
    assert sum(p.numel() for p in om.parameters()) == 4 * 64 * 2 + 64 * 9 + 64 + 3 * (64 * 64 * 9 + 64) + 64 * 5 + 5
    mi = build_model("miniimagenet", 5, image_shape=(3, 84, 84))
    assert mi(torch.randn(2, 3, 84, 84)).shape == (2, 5)
    assert mi.head.in_features == 32 * 5 * 5
    mlp = build_model("sinusoid", 1)
    assert isinstance(mlp, MLP) and mlp(torch.randn(4, 1)).shape == (4, 1)
    assert not list(om.buffers())  # no running statistics: the parameter dict is the whole model


def test_task_batch_norm_matches_torch() -> None:
    x = torch.randn(6, 4, 5, 5, dtype=DT)
    w, b = torch.randn(4, dtype=DT), torch.randn(4, dtype=DT)
    torch.testing.assert_close(task_batch_norm(x, w, b), F.batch_norm(x, None, None, w, b, training=True), atol=1e-12, rtol=0)


def _hvp_check(loss, P, X, Y) -> float:  # type: ignore[no-untyped-def]
    """max |jvp(vmap(grad)) - central finite differences of vmap(grad)|."""
    torch.manual_seed(1)
    V = {k: torch.randn_like(v) for k, v in P.items()}
    G = lambda p: vmap(grad(loss))(p, X, Y)  # noqa: E731
    _, hv = jvp(G, (P,), (V,))
    eps = 1e-6
    gp = G({k: P[k] + eps * V[k] for k in P})
    gm = G({k: P[k] - eps * V[k] for k in P})
    return max(float(((gp[k] - gm[k]) / (2 * eps) - hv[k]).abs().max()) for k in P)


def test_convnet_hessian_vector_products_under_vmap_are_exact() -> None:
    """Forward-over-reverse HVPs of the conv net with task batch norm, vmapped over tasks.

    The elementary batch norm is used because ``F.batch_norm(training=True)``'s forward-mode
    derivative of its backward is wrong in this composition (PyTorch 2.13).
    """
    torch.manual_seed(0)
    net = ConvNet(1, 3, filters=4, strided=True, image_size=8).to(DT)
    B = 3
    P = {k: v.detach().unsqueeze(0).repeat(B, *([1] * v.dim())) + 0.1 * torch.randn(B, *v.shape, dtype=DT)
         for k, v in net.named_parameters()}
    X = torch.randn(B, 6, 1, 8, 8, dtype=DT)
    Y = torch.randint(0, 3, (B, 6))

    def loss(p, x, y):  # type: ignore[no-untyped-def]
        return F.cross_entropy(functional_call(net, p, (x,)), y)

    assert _hvp_check(loss, P, X, Y) < 1e-6


@pytest.mark.parametrize("strided", [True, False])
def test_convnet_double_backward_matches_forward_over_reverse(strided: bool) -> None:
    torch.manual_seed(0)
    net = ConvNet(1, 2, filters=3, strided=strided, image_size=16).to(DT)
    p = {k: v.detach().clone() for k, v in net.named_parameters()}
    x, y = torch.randn(4, 1, 16, 16, dtype=DT), torch.randint(0, 2, (4,))
    v = {k: torch.randn_like(t) for k, t in p.items()}

    def loss(q):  # type: ignore[no-untyped-def]
        return F.cross_entropy(functional_call(net, q, (x,)), y)

    _, hv = jvp(grad(loss), (p,), (v,))
    pr = {k: t.clone().requires_grad_() for k, t in p.items()}
    g = torch.autograd.grad(loss(pr), list(pr.values()), create_graph=True)
    hr = torch.autograd.grad(g, list(pr.values()), grad_outputs=[v[k] for k in pr])
    for k, h in zip(pr, hr):
        torch.testing.assert_close(hv[k], h, atol=1e-10, rtol=1e-8)
