"""Conjugate gradient: SPD only, negative curvature detection, preconditioning."""

from __future__ import annotations

import pytest
import torch

from bilevel import Status
from bilevel.linsolve import CG


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_indefinite_is_not_success(systems, dtype):
    a = systems.indefinite(cond=10.0).to(dtype)
    b = systems.randn(systems.n).to(dtype)
    res = CG()(lambda v: a @ v, b)
    assert res.status is Status.NEGATIVE_CURVATURE, res.summary()
    assert not res.success
    assert torch.isfinite(res.x).all()
    # The reported residual is the one of the returned iterate, far from the tolerance.
    assert torch.allclose(res.residual_norm, (b - a @ res.x).norm(), rtol=1e-3)
    assert res.residual_norm > 1e-3 * b.norm()


def test_indefinite_task_in_a_batch(systems):
    a = torch.stack([systems.spd(cond=10.0), systems.indefinite(cond=10.0), systems.spd(cond=50.0)])
    b = systems.randn(3, systems.n)
    res = CG()(lambda v: (a @ v.unsqueeze(-1)).squeeze(-1), b, batched=True)
    assert res.task_status == (Status.SUCCESS, Status.NEGATIVE_CURVATURE, Status.SUCCESS)
    assert res.status is Status.NEGATIVE_CURVATURE
    for i in (0, 2):
        x_ref = torch.linalg.solve(a[i], b[i])
        assert (res.x[i] - x_ref).norm() <= 1e-8 * x_ref.norm()


def _badly_scaled(systems, n: int = 100) -> torch.Tensor:
    """SPD, strictly diagonally dominant, with a diagonal ``d`` spanning four decades.

    ``A = diag(d) + S`` with ``S`` symmetric, zero diagonal and ``|S_ij| <= min(d_i, d_j) / (2n)``:
    every off-diagonal row sum is at most ``d_i / 2`` (so ``A`` is SPD by Gershgorin), and
    the Jacobi-scaled matrix ``D^{-1/2} A D^{-1/2}`` has eigenvalues in [1/2, 3/2], while
    ``A`` itself has a condition number of order 1e4.
    """
    d = torch.logspace(0, 4, n, dtype=torch.float64)
    u = 2 * torch.rand(n, n, generator=systems.gen, dtype=torch.float64) - 1
    u = (u + u.T) / 2
    u.fill_diagonal_(0.0)
    s = u * torch.minimum(d[:, None], d[None, :]) / (2 * n)
    return torch.diag(d) + s


def test_jacobi_preconditioner_needs_fewer_iterations(systems):
    a = _badly_scaled(systems)
    b = systems.randn(a.shape[0])
    x_ref = torch.linalg.solve(a, b)
    diag = torch.diagonal(a).clone()

    plain = CG()(lambda v: a @ v, b)
    jacobi = CG(preconditioner=lambda r: r / diag)(lambda v: a @ v, b)

    assert jacobi.status is Status.SUCCESS, jacobi.summary()
    assert jacobi.iterations < plain.iterations, (jacobi.iterations, plain.iterations)
    assert (jacobi.x - x_ref).norm() <= 1e-6 * x_ref.norm()
    # The unpreconditioned run, if it converged at all, agrees.
    if plain.status is Status.SUCCESS:
        assert (plain.x - x_ref).norm() <= 1e-3 * x_ref.norm()


def test_preconditioner_on_dict_tree(systems, trees):
    a = systems.spd(cond=10.0)
    diag = torch.diagonal(a).clone()
    b = systems.randn(systems.n)
    precond = lambda r: trees.to_tree(trees.from_tree(r, "dict") / diag, "dict")  # noqa: E731
    res = CG(preconditioner=precond)(trees.matvec(a, "dict"), trees.to_tree(b, "dict"))
    assert res.status is Status.SUCCESS
    x_ref = torch.linalg.solve(a, b)
    assert (trees.from_tree(res.x, "dict") - x_ref).norm() <= 1e-8 * x_ref.norm()
