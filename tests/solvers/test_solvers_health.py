"""Inner-loop health statistics of the first-order solvers: the starting gradient norm and
whether the gradient norm fell monotonically (a stable and an unstable step size)."""

from __future__ import annotations

import pytest
import torch

from bilevel.solvers import Adam, GradientDescent

DT = torch.float64
CURV = torch.tensor([1.0, 10.0], dtype=DT)  # a quadratic with curvatures 1 and 10


def quad(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (CURV * x * x).sum()


@pytest.mark.parametrize("lr, stable", [(0.15, True), (0.25, False)])  # lr·H_max = 1.5 / 2.5
def test_gd_monotone_flag_detects_oscillation(lr: float, stable: bool) -> None:
    x0 = torch.tensor([1.0, 1.0], dtype=DT)
    res = GradientDescent(lr=lr, steps=12, monitor=True)(quad, x0)
    g0 = torch.linalg.vector_norm(CURV * x0)
    torch.testing.assert_close(res.grad_norm_initial, g0)
    assert bool(res.grad_norm_monotone) is stable
    assert bool(res.value_monotone) is stable  # lr·H_max < 2 ⇔ the objective falls (descent lemma)
    ratio = float(res.grad_norm / res.grad_norm_initial)
    assert (ratio < 0.2) if stable else (ratio > 1.0)


def test_gd_health_batched_per_task() -> None:
    x0 = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=DT)
    scale = torch.tensor([1.0, 2.0], dtype=DT)  # task 1 has twice the curvature: lr·H_max = 3 > 2

    def obj(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return s * quad(x)

    batched = torch.func.vmap(obj)
    res = GradientDescent(lr=0.15, steps=10, monitor=True)(batched, x0, scale, batched=True)
    assert res.grad_norm_monotone.tolist() == [True, False]
    assert res.value_monotone.tolist() == [True, False]
    assert res.grad_norm_initial.shape == (2,)


def test_adam_reports_health_too() -> None:
    res = Adam(lr=0.1, steps=5, monitor=True)(quad, torch.tensor([1.0, -1.0], dtype=DT))
    assert res.grad_norm_initial is not None and res.grad_norm_monotone is not None
