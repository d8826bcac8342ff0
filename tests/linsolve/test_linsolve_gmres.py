"""GMRES: optimality properties, restarts, happy breakdown and breakdown."""

from __future__ import annotations

import pytest
import torch

from bilevel import Status
from bilevel.linsolve import GMRES


def test_full_gmres_terminates_within_n_steps(systems):
    """Without restarts GMRES finds the solution in at most n steps (exact arithmetic)."""
    a = systems.nonsymmetric(cond=100.0, skew=1.0)
    b = systems.randn(systems.n)
    res = GMRES(restart=systems.n)(lambda v: a @ v, b)
    assert res.status is Status.SUCCESS, res.summary()
    assert res.iterations <= systems.n
    x_ref = torch.linalg.solve(a, b)
    assert (res.x - x_ref).norm() <= 1e-8 * x_ref.norm()


def test_residual_is_monotone_and_full_beats_restarted(systems):
    """GMRES(m) minimises the residual over x0 + K_k within a cycle, so (i) capping full
    GMRES at k steps gives a non-increasing residual in k, and (ii) at equal step counts
    full GMRES is at least as good as a restarted one (whose iterate lies in the same
    Krylov space)."""
    a = systems.nonsymmetric(cond=20.0, skew=1.0)
    b = systems.randn(systems.n)
    mv = lambda v: a @ v  # noqa: E731
    full = [GMRES(maxiter=k)(mv, b).residual_norm for k in range(1, 13)]
    restarted = [GMRES(restart=3, maxiter=k)(mv, b).residual_norm for k in range(1, 13)]
    for r0, r1 in zip(full, full[1:]):
        assert r1 <= r0 * (1 + 1e-10)
    for rf, rr in zip(full, restarted):
        assert rf <= rr * (1 + 1e-10)
    assert full[-1] < 1e-2 * full[0]


@pytest.mark.parametrize("restart", [1, 2, 5])
def test_small_restart_still_converges(systems, restart):
    a = systems.nonsymmetric(cond=5.0, skew=0.5)
    b = systems.randn(systems.n)
    res = GMRES(restart=restart, maxiter=2000)(lambda v: a @ v, b)
    assert res.status is Status.SUCCESS, res.summary()
    x_ref = torch.linalg.solve(a, b)
    assert (res.x - x_ref).norm() <= 1e-8 * x_ref.norm()


def test_happy_breakdown_is_convergence():
    """b an eigenvector of A: the solution lies in K_1, h_{2,1} = 0, one step suffices."""
    a = torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64))
    b = torch.zeros(8, dtype=torch.float64)
    b[2] = 5.0
    res = GMRES()(lambda v: a @ v, b)
    assert res.status is Status.SUCCESS
    assert res.iterations == 1
    assert torch.allclose(res.x, b / 3.0)


def test_singular_operator_breaks_down():
    """A nilpotent A with b = e_1: A e_1 = 0, the Hessenberg column is zero and the least
    squares problem is singular -- BREAKDOWN, not a division by zero."""
    a = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([1.0, 0.0], dtype=torch.float64)
    res = GMRES()(lambda v: a @ v, b)
    assert res.status is Status.BREAKDOWN, res.summary()
    assert torch.isfinite(res.x).all()
    assert torch.allclose(res.residual_norm, (b - a @ res.x).norm())


def test_breakdown_task_in_a_batch():
    a = torch.stack([torch.tensor([[0.0, 1.0], [0.0, 0.0]]), torch.tensor([[2.0, 1.0], [0.0, 3.0]])]).double()
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    res = GMRES()(lambda v: (a @ v.unsqueeze(-1)).squeeze(-1), b, batched=True)
    assert res.task_status == (Status.BREAKDOWN, Status.SUCCESS)
    assert torch.allclose(res.x[1], torch.linalg.solve(a[1], b[1]))
