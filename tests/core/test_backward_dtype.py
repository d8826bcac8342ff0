"""Mixed precision: with float16/bfloat16 inputs the backward runs in float32 ("auto").

The inner solve may run in half precision; the adjoint system and its reductions do not.
Meta-gradient errors against float64 on the README's ridge problem (measured, then
bounded here with a margin): float16 3.3e-4 ("auto") vs 6.0e-4 (None); bfloat16 6.2e-3 vs
1.0e-2 -- bfloat16's own inner solve (8 bits of mantissa) keeps it above the 1e-3 target.
"""

from __future__ import annotations

import pytest
import torch

import bilevel
from bilevel.linsolve import CG
from bilevel.solvers import GradientDescent

torch.manual_seed(0)
X, Y = torch.randn(50, 5), torch.randn(50)


def _inner(phi, x, y):
    return ((x @ phi - y) ** 2).mean()


def _grads(dtype: torch.dtype, policy):
    theta = torch.zeros(5, dtype=dtype, requires_grad=True)
    lam = torch.tensor(2.0, dtype=dtype, requires_grad=True)
    layer = bilevel.Proximal(_inner, solver=GradientDescent(lr=0.1, steps=200), linsolve=CG(steps=5),
                             backward_dtype=policy)
    x, y = X.to(dtype), Y.to(dtype)
    phi = layer(theta, x, y, lam=lam)
    ((x @ phi - y) ** 2).mean().backward()
    return theta.grad, lam.grad, layer


def _err(g: torch.Tensor, ref: torch.Tensor) -> float:
    return float((g.double() - ref).norm() / ref.norm())


REF = [g.double() for g in _grads(torch.float64, None)[:2]]


@pytest.mark.parametrize("dtype, bound", [(torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
def test_half_precision_meta_gradient_error_is_bounded_and_auto_helps(dtype: torch.dtype, bound: float) -> None:
    g_auto, l_auto, layer = _grads(dtype, "auto")
    g_none, _, _ = _grads(dtype, None)
    assert g_auto.dtype == dtype and l_auto.dtype == dtype  # gradients in the inputs' dtype
    assert layer.diagnostics.backward.residual_norm.dtype == torch.float32  # the solve ran in float32
    assert _err(g_auto, REF[0]) < bound
    assert _err(l_auto, REF[1]) < 5 * bound
    assert _err(g_auto, REF[0]) < _err(g_none, REF[0])


def test_float32_inputs_are_left_alone_by_auto_and_promoted_on_request() -> None:
    _, _, layer = _grads(torch.float32, "auto")
    assert layer.diagnostics.backward.residual_norm.dtype == torch.float32
    g64, _, layer = _grads(torch.float32, torch.float64)
    assert layer.diagnostics.backward.residual_norm.dtype == torch.float64 and g64.dtype == torch.float32


@pytest.mark.parametrize("bad", ["float32", torch.int64, 3])
def test_backward_dtype_is_validated(bad) -> None:
    with pytest.raises(bilevel.BilevelValueError, match="backward_dtype"):
        bilevel.Proximal(_inner, backward_dtype=bad)


@pytest.mark.parametrize("backward_inside", [False, True])
def test_autocast_forward_and_a_float32_backward(backward_inside: bool) -> None:
    # Under torch.autocast(bfloat16) the inner solve's matmuls run in bfloat16; the
    # backward is never autocast (even when backward() is called inside the region).
    # Measured error against float64: 4.7e-3 (bfloat16's forward is the limit).
    theta = torch.zeros(5, requires_grad=True)
    layer = bilevel.Proximal(_inner, 2.0, solver=GradientDescent(lr=0.1, steps=200), linsolve=CG(steps=5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        phi = layer(theta, X, Y)
        loss = ((X @ phi - Y) ** 2).mean()
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    assert layer.diagnostics.backward.residual_norm.dtype == torch.float32
    ref_theta = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    ref_layer = bilevel.Proximal(_inner, 2.0, solver=GradientDescent(lr=0.1, steps=200), linsolve=CG(steps=5))
    x64, y64 = X.double(), Y.double()
    ((x64 @ ref_layer(ref_theta, x64, y64) - y64) ** 2).mean().backward()
    assert _err(theta.grad, ref_theta.grad) < 1e-2
