"""Issue 9, item 15: a closed-over tensor that requires grad while θ does not, and a λ graph
stored on the layer, each get a message that says what to do."""

from __future__ import annotations

import warnings

import pytest
import torch

import bilevel
from bilevel.linsolve import CG
from bilevel.solvers import GradientDescent


def test_closed_over_tensor_while_no_argument_requires_grad_warns() -> None:
    w = torch.tensor(2.0, requires_grad=True)  # the user's parameter, closed over

    def loss(p, x):
        return w * ((p - x) ** 2).sum()

    theta = torch.zeros(3)  # does not require grad
    layer = bilevel.Proximal(loss, 1.0, solver=GradientDescent(lr=0.1, steps=3), linsolve=CG(steps=2))
    with pytest.warns(bilevel.ClosedOverTensorWarning, match="Pass them as arguments"):
        layer(theta, torch.ones(3))


def test_no_warning_when_nothing_needs_grad_or_grad_is_off() -> None:
    layer = bilevel.Proximal(lambda p, x: ((p - x) ** 2).sum(), 1.0, solver=GradientDescent(lr=0.1, steps=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.zeros(3), torch.ones(3))
        with torch.no_grad():
            layer(torch.zeros(3), torch.ones(3))


def test_lam_with_a_graph_is_refused_at_construction() -> None:
    rho = torch.tensor(0.0, requires_grad=True)
    with pytest.raises(bilevel.BilevelValueError, match=r"lam=softplus\(rho\)"):
        bilevel.Proximal(lambda p, x: ((p - x) ** 2).sum(), lam=torch.nn.functional.softplus(rho))


def test_learned_lam_per_call_works_twice() -> None:
    rho = torch.tensor(0.0, requires_grad=True)
    theta = torch.zeros(3, requires_grad=True)
    layer = bilevel.Proximal(lambda p, x: ((p - x) ** 2).sum(), solver=GradientDescent(lr=0.1, steps=3), linsolve=CG(steps=2))
    for _ in range(2):
        phi = layer(theta, torch.ones(3), lam=torch.nn.functional.softplus(rho))
        phi.sum().backward()
    assert rho.grad is not None and torch.isfinite(rho.grad)
