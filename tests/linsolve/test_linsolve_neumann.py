"""Truncated Neumann series: the residual recursion, alpha, divergence."""

from __future__ import annotations

import pytest
import torch

from bilevel import Status
from bilevel.linsolve import Neumann


@pytest.mark.parametrize("terms", [1, 2, 5, 9])
def test_partial_sum_and_its_residual(systems, terms):
    """After K terms x_K = alpha * sum_{k<K} M^k b and b - A x_K = M^K b, M = I - alpha A:
    both checked against explicit matrix powers."""
    alpha = 0.5
    a = systems.neumann(radius=0.6) / alpha  # I - alpha A = M with ||M|| = 0.6
    b = systems.randn(systems.n)
    m = torch.eye(systems.n, dtype=torch.float64) - alpha * a
    x_expected = alpha * sum(torch.linalg.matrix_power(m, k) @ b for k in range(terms))
    r_expected = torch.linalg.matrix_power(m, terms) @ b

    res = Neumann(alpha=alpha, maxiter=terms)(lambda v: a @ v, b)
    assert res.status is Status.MAX_ITERATIONS
    assert res.iterations == terms
    assert torch.allclose(res.x, x_expected, rtol=1e-12, atol=1e-14)
    assert torch.allclose(res.residual_norm, r_expected.norm(), rtol=1e-12)
    assert torch.allclose(res.residual_norm, (b - a @ res.x).norm(), rtol=1e-10)


def test_alpha_rescales_the_operator(systems):
    """The series for A/alpha with step alpha equals the series for A with step 1; with the
    wrong alpha the series for the scaled system diverges and is not a success."""
    base = systems.neumann(radius=0.4)
    b = systems.randn(systems.n)
    x_ref = torch.linalg.solve(base, b)
    for alpha in (0.1, 0.5, 2.0):
        a = base / alpha
        res = Neumann(alpha=alpha)(lambda v: a @ v, b)
        assert res.status is Status.SUCCESS, (alpha, res.summary())
        assert (res.x - alpha * x_ref).norm() <= 1e-9 * (alpha * x_ref).norm()
    wrong = Neumann(alpha=1.0)(lambda v: (base / 0.1) @ v, b)  # spectral radius of I - 10 base > 1
    assert wrong.status is not Status.SUCCESS


def test_divergent_series_is_not_success(systems):
    """SPD with eigenvalues in [1, 3] and alpha = 1: I - A has eigenvalues down to -2, so
    the series diverges.  It runs the default 50 terms and reports MAX_ITERATIONS."""
    q = systems.orthogonal(systems.n)
    a = (q * torch.linspace(1.0, 3.0, systems.n, dtype=torch.float64)) @ q.T
    b = systems.randn(systems.n)
    res = Neumann()(lambda v: a @ v, b)
    assert res.status is Status.MAX_ITERATIONS
    assert res.iterations == 50  # the documented default number of terms
    assert res.residual_norm > b.norm()
    assert torch.isfinite(res.x).all()


def test_overflowing_series_is_nonfinite(systems):
    """In float32 with |1 - lambda| up to 19 the terms overflow long before 50 of them:
    NONFINITE, with the last finite partial sum returned."""
    q = systems.orthogonal(systems.n)
    a = ((q * torch.linspace(1.0, 20.0, systems.n, dtype=torch.float64)) @ q.T).float()
    b = systems.randn(systems.n).float()
    res = Neumann()(lambda v: a @ v, b)
    assert res.status is Status.NONFINITE
    assert res.iterations < 50
    assert torch.isfinite(res.x).all()
    assert torch.isfinite(res.residual_norm)


def test_indefinite_operator_diverges(systems):
    a = systems.indefinite(cond=2.0)
    b = systems.randn(systems.n)
    res = Neumann(alpha=0.5)(lambda v: a @ v, b)
    assert res.status is not Status.SUCCESS
    assert res.status in (Status.MAX_ITERATIONS, Status.NONFINITE)


def test_default_budget_can_be_raised(systems):
    """A slowly converging series (rate 0.9) needs more than 50 terms."""
    a = systems.neumann(radius=0.9, symmetric=True)
    b = systems.randn(systems.n)
    assert Neumann()(lambda v: a @ v, b).status is Status.MAX_ITERATIONS
    res = Neumann(maxiter=1000)(lambda v: a @ v, b)
    assert res.status is Status.SUCCESS
    assert 50 < res.iterations < 1000
    x_ref = torch.linalg.solve(a, b)
    assert (res.x - x_ref).norm() <= 1e-8 * x_ref.norm()
