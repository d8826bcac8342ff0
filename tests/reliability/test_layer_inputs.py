"""Issue 9, item 12: empty θ / x0 and empty batches give a clear ValueError, not IndexError."""

from __future__ import annotations

import pytest
import torch

import bilevel
from bilevel.solvers import GradientDescent


def _sq(p, x):
    return (p**2).sum()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: bilevel.Proximal(_sq, 1.0)({}, torch.ones(3)), "theta is an empty tree"),
        (lambda: bilevel.Proximal(_sq, 1.0)((), torch.ones(3)), "theta is an empty tree"),
        (lambda: bilevel.Proximal(_sq, 1.0, solver=GradientDescent(lr=0.1, steps=1))(
            torch.zeros(3, requires_grad=True), torch.ones(0, 3), batched=True), "0 tasks"),
        (lambda: bilevel.Argmin(_sq)({}, torch.ones(3)), "empty tree"),
        (lambda: bilevel.Argmin(_sq, solver=GradientDescent(lr=0.1, steps=1))(
            torch.zeros(0, 3), torch.ones(0, 3), batched=True), "0 tasks"),
        (lambda: bilevel.FixedPoint(lambda x, a: 0.5 * x + a)(
            torch.zeros(0, 3), torch.ones(0, 3, requires_grad=True), batched=True), "0 tasks"),
        (lambda: bilevel.FixedPoint(lambda x, a: 0.5 * x + a)((), torch.ones(3)), "empty tree"),
    ],
)
def test_empty_inputs_raise_a_clear_value_error(call, match: str) -> None:
    with pytest.raises(bilevel.BilevelValueError, match=match):
        call()
