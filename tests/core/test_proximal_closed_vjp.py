"""Proximal's closed-form argument gradients (θ: Λu, λ: −(φ* − θ)·u) against the generic VJP.

The generic VJP of the optimality map runs when a data argument needs a gradient; with
the same HVP mode and linear solver it must give the same θ and λ gradients as the closed
form, for every λ layout, batching strategy and damping.  And the closed form must really
skip the re-evaluation of the inner loss (counted).
"""

from __future__ import annotations

import pytest
import torch

from bilevel import ClosedOverTensorWarning, Proximal
from bilevel.linsolve import CG
from bilevel.solvers import GradientDescent

DT = torch.float64
B, N, D = 3, 7, 4


def _loss(phi, x, y):
    return ((torch.tanh(x @ phi["w"]) + phi["b"] - y) ** 2).mean()


def _data(batched: bool):
    g = torch.Generator().manual_seed(0)
    shape = (B, N) if batched else (N,)
    x = torch.randn(*shape, D, generator=g, dtype=DT)
    y = torch.randn(*shape, generator=g, dtype=DT)
    theta = {"w": torch.randn(D, generator=g, dtype=DT).requires_grad_(), "b": torch.tensor(0.3, dtype=DT).requires_grad_()}
    return theta, x, y


def _lam(kind: str):
    if kind == "scalar":
        return torch.tensor(0.7, dtype=DT, requires_grad=True)
    if kind == "per_leaf":
        return {"w": torch.tensor(0.5, dtype=DT, requires_grad=True), "b": torch.tensor(1.5, dtype=DT, requires_grad=True)}
    return {"w": torch.linspace(0.4, 1.2, D, dtype=DT).requires_grad_(), "b": torch.tensor(0.9, dtype=DT, requires_grad=True)}


def _grads(kind: str, batched, damping: float, y_needs_grad: bool):
    theta, x, y = _data(batched is not False)
    lam = _lam(kind)
    y = y.clone().requires_grad_(y_needs_grad)
    layer = Proximal(_loss, solver=GradientDescent(lr=0.3, steps=40), linsolve=CG(rtol=1e-12, maxiter=200),
                     damping=damping, hvp="reverse")
    phi = layer(theta, x, y, lam=lam, batched=batched)
    outer = (phi["w"] ** 2).sum() + phi["b"].sum() ** 2
    leaves = [theta["w"], theta["b"]] + ([lam] if kind == "scalar" else [lam["w"], lam["b"]])
    return torch.autograd.grad(outer, leaves)


@pytest.mark.parametrize("kind", ["scalar", "per_leaf", "per_element"])
@pytest.mark.parametrize("batched", [False, "vmap", "loop"])
@pytest.mark.parametrize("damping", [0.0, 0.4])
def test_closed_form_equals_generic_vjp(kind: str, batched, damping: float) -> None:
    closed = _grads(kind, batched, damping, y_needs_grad=False)
    generic = _grads(kind, batched, damping, y_needs_grad=True)
    for c, g in zip(closed, generic):
        assert c.shape == g.shape and c.dtype == g.dtype
        torch.testing.assert_close(c, g, rtol=1e-10, atol=1e-12)


def test_closed_form_skips_the_reevaluation_of_the_inner_loss() -> None:
    calls = {"n": 0}

    def counted(phi, x, y):
        calls["n"] += 1
        return _loss(phi, x, y)

    def backward_calls(y_needs_grad: bool) -> int:
        theta, x, y = _data(True)
        y = y.clone().requires_grad_(y_needs_grad)
        layer = Proximal(counted, 0.7, solver=GradientDescent(lr=0.3, steps=5), linsolve=CG(steps=3), hvp="reverse")
        phi = layer(theta, x, y, batched=True)
        loss = (phi["w"] ** 2).sum()
        calls["n"] = 0
        loss.backward()
        return calls["n"]

    # Generic: one evaluation for the graph of the Hessian products, one for the VJP.
    assert backward_calls(True) == 2
    assert backward_calls(False) == 1


def test_closed_form_still_warns_about_closed_over_tensors() -> None:
    scale = torch.tensor(2.0, dtype=DT, requires_grad=True)  # closed over: gets no gradient

    def loss(phi, x, y):
        return scale * _loss(phi, x, y)

    theta, x, y = _data(False)
    phi = Proximal(loss, 0.7, solver=GradientDescent(lr=0.1, steps=5), linsolve=CG(steps=3), hvp="reverse")(theta, x, y)
    with pytest.warns(ClosedOverTensorWarning, match="Proximal"):
        (phi["w"] ** 2).sum().backward()
