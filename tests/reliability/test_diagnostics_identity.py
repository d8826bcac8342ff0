"""Issue 9, item 7: diagnostics say which call they describe, and a failed call leaves none."""

from __future__ import annotations

import pytest
import torch

import bilevel
from bilevel.linsolve import CG
from bilevel.solvers import GradientDescent


def _loss(p, x):
    return ((p - x) ** 2).sum()


def _layer() -> bilevel.Proximal:
    return bilevel.Proximal(_loss, 1.0, solver=GradientDescent(lr=0.1, steps=3), linsolve=CG(steps=2))


def test_a_call_that_raises_leaves_no_stale_forward() -> None:
    layer = _layer()
    theta = torch.zeros(3, requires_grad=True)
    layer(theta, torch.ones(3))
    assert layer.diagnostics.forward is not None and layer.diagnostics.forward_call == 1
    with pytest.raises(bilevel.NonFiniteError):
        layer(theta, torch.full((3,), float("nan")))
    assert layer.diagnostics.forward is None and layer.diagnostics.forward_call is None
    assert layer.diagnostics.calls == 2


def test_interleaved_calls_are_told_apart() -> None:
    layer = _layer()
    theta = torch.zeros(3, requires_grad=True)
    phi1 = layer(theta, torch.ones(3))
    phi2 = layer(theta, 2 * torch.ones(3))
    phi1.sum().backward()
    d = layer.diagnostics
    assert d.forward_call == 2 and d.backward_call == 1
    assert "(forward of call 2, backward of call 1)" in str(d)
    phi2.sum().backward()
    assert d.backward_call == 2 and "forward of call" not in str(d)
