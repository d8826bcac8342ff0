"""BiCGSTAB: breakdowns are reported, never turned into NaNs."""

from __future__ import annotations

import torch

from bilevel import Status
from bilevel.linsolve import BiCGSTAB


def test_shadow_residual_breakdown():
    """A = [[0, 1], [1, 0]], b = e_1: <r_hat, A p> = <e_1, e_2> = 0 on the first step
    although A is non-singular: BREAKDOWN, x untouched."""
    a = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([1.0, 0.0], dtype=torch.float64)
    res = BiCGSTAB()(lambda v: a @ v, b)
    assert res.status is Status.BREAKDOWN, res.summary()
    assert torch.equal(res.x, torch.zeros(2, dtype=torch.float64))
    assert res.iterations == 0
    assert torch.allclose(res.residual_norm, b.norm())


def test_omega_breakdown_keeps_the_half_step():
    """A = [[-1, 1], [-3, 0]], b = (2, 0): alpha = -1, s = (0, -6), t = A s = (-6, 0) and
    omega = <t, s> / <t, t> = 0 exactly.  The Bi-CG half step x = alpha p = (-2, 0) is kept
    and the task stops with BREAKDOWN."""
    a = torch.tensor([[-1.0, 1.0], [-3.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([2.0, 0.0], dtype=torch.float64)
    res = BiCGSTAB()(lambda v: a @ v, b)
    assert res.status is Status.BREAKDOWN, res.summary()
    assert torch.equal(res.x, torch.tensor([-2.0, 0.0], dtype=torch.float64))
    assert res.iterations == 1
    assert torch.allclose(res.residual_norm, (b - a @ res.x).norm())


def test_breakdown_is_per_task():
    a = torch.stack(
        [
            torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
            torch.tensor([[3.0, 1.0], [-1.0, 2.0]]),
            torch.tensor([[-1.0, 1.0], [-3.0, 0.0]]),
        ]
    ).double()
    b = torch.tensor([[1.0, 0.0], [1.0, 2.0], [2.0, 0.0]], dtype=torch.float64)
    res = BiCGSTAB()(lambda v: (a @ v.unsqueeze(-1)).squeeze(-1), b, batched=True)
    assert res.task_status == (Status.BREAKDOWN, Status.SUCCESS, Status.BREAKDOWN)
    assert torch.isfinite(res.x).all()
    assert torch.allclose(res.x[1], torch.linalg.solve(a[1], b[1]))


def test_converges_on_the_half_step():
    """b an eigenvector: s = r - alpha A r = 0 after the Bi-CG half step (one iteration)."""
    a = torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64))
    b = torch.zeros(8, dtype=torch.float64)
    b[4] = 2.0
    res = BiCGSTAB()(lambda v: a @ v, b)
    assert res.status is Status.SUCCESS
    assert res.iterations == 1
    assert torch.allclose(res.x, b / 5.0)
