"""A layer called on meta tensors (a shape-only run) returns meta outputs of the right shapes."""

from __future__ import annotations

import torch

import bilevel
from bilevel.solvers import GradientDescent


def test_proximal_on_meta_tensors_returns_meta_solution_shapes() -> None:
    theta = {"w": torch.empty(4, 3, device="meta", requires_grad=True), "b": torch.empty(3, device="meta")}
    x, y = torch.empty(8, 10, 4, device="meta"), torch.empty(8, 10, 3, device="meta")

    def loss(p, x, y):
        return ((x @ p["w"] + p["b"] - y) ** 2).mean()

    layer = bilevel.Proximal(loss, 1.0, solver=GradientDescent(lr=0.1, steps=3))
    phi = layer(theta, x, y, batched=True)
    assert phi["w"].device.type == "meta" and phi["w"].shape == (8, 4, 3) and phi["b"].shape == (8, 3)
    assert layer.diagnostics.calls == 0  # nothing was solved
    one = layer(theta, x[0], y[0])
    assert one["w"].shape == (4, 3) and one["w"].dtype == torch.float32


def test_fixed_point_on_meta_tensors() -> None:
    layer = bilevel.FixedPoint(lambda z, a: 0.5 * z + a)
    out = layer(torch.empty(5, device="meta"), torch.empty(5, device="meta"))
    assert out.device.type == "meta" and out.shape == (5,)
