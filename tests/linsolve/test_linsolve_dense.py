"""Dense: materialised operator, singular systems, batched stacks."""

from __future__ import annotations

import torch

from bilevel import Status
from bilevel.linsolve import Dense


def test_materialises_with_n_matvecs_and_reports_no_iterations(systems, trees):
    a = systems.nonsymmetric()
    b = systems.randn(systems.n)
    calls = []

    def mv(v):
        calls.append(1)
        return trees.matvec(a, "dict")(v)

    res = Dense()(mv, trees.to_tree(b, "dict"))
    assert res.status is Status.SUCCESS
    assert len(calls) == systems.n
    assert res.iterations == 0
    x_ref = torch.linalg.solve(a, b)
    assert (trees.from_tree(res.x, "dict") - x_ref).norm() <= 1e-12 * x_ref.norm()


def test_singular_is_breakdown_not_an_exception():
    a = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64)
    b = torch.tensor([1.0, 1.0], dtype=torch.float64)
    res = Dense()(lambda v: a @ v, b)
    assert res.status is Status.BREAKDOWN
    assert torch.equal(res.x, torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(res.residual_norm, b.norm())
    # On failure the initial guess is what comes back.
    x0 = torch.tensor([0.5, 0.25], dtype=torch.float64)
    res = Dense()(lambda v: a @ v, b, x0)
    assert res.status is Status.BREAKDOWN
    assert torch.equal(res.x, x0)


def test_numerically_singular_is_breakdown(systems):
    """A rank-deficient product in floating point is not exactly singular (tiny pivots,
    no LU error), but its smallest singular value is at rounding level."""
    u = systems.randn(systems.n, systems.n - 1)
    a = u @ u.T
    b = systems.randn(systems.n)
    res = Dense()(lambda v: a @ v, b)
    assert res.status is Status.BREAKDOWN


def test_batched_stack_with_a_singular_task(systems):
    a = torch.stack([systems.spd(), torch.zeros(systems.n, systems.n, dtype=torch.float64), systems.indefinite()])
    b = systems.randn(3, systems.n)
    calls = []

    def mv(v):
        calls.append(1)
        return (a @ v.unsqueeze(-1)).squeeze(-1)

    res = Dense()(mv, b, batched=True)
    assert len(calls) == systems.n  # one batched matvec per unit vector, not B * n
    assert res.task_status == (Status.SUCCESS, Status.BREAKDOWN, Status.SUCCESS)
    assert res.status is Status.BREAKDOWN
    assert res.task_iterations.tolist() == [0, 0, 0]
    for i in (0, 2):
        x_ref = torch.linalg.solve(a[i], b[i])
        assert (res.x[i] - x_ref).norm() <= 1e-12 * x_ref.norm()
    assert torch.equal(res.x[1], torch.zeros(systems.n, dtype=torch.float64))


def test_x0_is_ignored_on_success(systems):
    a = systems.spd()
    b = systems.randn(systems.n)
    res = Dense()(lambda v: a @ v, b, torch.full((systems.n,), 1e3, dtype=torch.float64))
    x_ref = torch.linalg.solve(a, b)
    assert res.status is Status.SUCCESS
    assert (res.x - x_ref).norm() <= 1e-12 * x_ref.norm()


def test_nonfinite_rhs():
    a = torch.eye(3, dtype=torch.float64)
    b = torch.tensor([1.0, float("inf"), 0.0], dtype=torch.float64)
    res = Dense()(lambda v: a @ v, b)
    assert res.status is Status.NONFINITE
    assert torch.isfinite(res.x).all()
