"""``torch.func.vmap`` over a layer call (issue 10, part): one solve per slice, equal to
``batched=True`` in the solution and in the θ and λ gradients."""

from __future__ import annotations

import torch

import bilevel
from bilevel.linsolve import CG, GMRES
from bilevel.solvers import FixedPointIteration, NewtonCG

DT = torch.float64
g = torch.Generator().manual_seed(0)
XB, YB = torch.randn(3, 12, 4, generator=g, dtype=DT), torch.randn(3, 12, generator=g, dtype=DT)


def _inner(phi, x, y):
    return ((torch.tanh(x @ phi) - y) ** 2).mean()


def test_vmap_over_proximal_equals_batched_with_theta_and_lambda_gradients() -> None:
    layer = bilevel.Proximal(_inner, solver=NewtonCG(rtol=1e-12), linsolve=CG(rtol=1e-12))
    th = torch.randn(4, generator=g, dtype=DT, requires_grad=True)
    lam = torch.tensor(0.8, dtype=DT, requires_grad=True)
    out_v = torch.func.vmap(lambda x, y: layer(th, x, y, lam=lam))(XB, YB)
    out_b = layer(th, XB, YB, lam=lam, batched=True)
    torch.testing.assert_close(out_v, out_b, rtol=1e-12, atol=1e-13)
    gv = torch.autograd.grad((out_v**2).sum(), (th, lam))
    gb = torch.autograd.grad((out_b**2).sum(), (th, lam))
    for a, b in zip(gv, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_vmap_over_a_fixed_point_with_a_vmapped_initial_point() -> None:
    m = 0.3 * torch.randn(4, 4, generator=g, dtype=DT)
    layer = bilevel.FixedPoint(lambda z, c: 0.5 * torch.tanh(m @ z) + c,
                               solver=FixedPointIteration(rtol=1e-13, maxiter=500), linsolve=GMRES(rtol=1e-12))
    c = torch.randn(3, 4, generator=g, dtype=DT, requires_grad=True)
    out_v = torch.func.vmap(layer)(torch.zeros(3, 4, dtype=DT), c)
    out_b = layer(torch.zeros(3, 4, dtype=DT), c, batched=True)
    torch.testing.assert_close(out_v, out_b, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(torch.autograd.grad(out_v.sum(), c)[0], torch.autograd.grad(out_b.sum(), c)[0])
