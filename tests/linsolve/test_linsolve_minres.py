"""MINRES: symmetric indefinite systems, and honesty on operators it does not apply to."""

from __future__ import annotations

import pytest
import torch

from bilevel import Status
from bilevel._tree import default_tol
from bilevel.linsolve import CG, MINRES


@pytest.mark.parametrize("cond", [10.0, 1000.0])
def test_symmetric_indefinite(systems, cond):
    a = systems.indefinite(cond=cond)
    b = systems.randn(systems.n)
    x_ref = torch.linalg.solve(a, b)
    res = MINRES()(lambda v: a @ v, b)
    assert res.status is Status.SUCCESS, res.summary()
    # ||x - x*|| <= ||A^{-1}|| ||r|| and ||A^{-1}|| = 1 for these spectra (|lambda| >= 1).
    assert (res.x - x_ref).norm() <= res.residual_norm * 1.0001
    assert res.residual_norm <= default_tol(torch.float64) * b.norm()
    assert torch.allclose(res.residual_norm, (b - a @ res.x).norm(), rtol=1e-6)


def test_where_cg_fails_minres_succeeds(systems):
    a = systems.indefinite(cond=10.0)
    b = systems.randn(systems.n)
    assert CG()(lambda v: a @ v, b).status is Status.NEGATIVE_CURVATURE
    assert MINRES()(lambda v: a @ v, b).status is Status.SUCCESS


def test_residual_is_monotone_in_the_iterations(systems):
    """MINRES minimises ||b - A x|| over growing Krylov spaces: capping it at k iterations
    gives a non-increasing residual in k (exact arithmetic, well within rounding here)."""
    a = systems.indefinite(cond=10.0)
    b = systems.randn(systems.n)
    res = [MINRES(maxiter=k)(lambda v: a @ v, b).residual_norm for k in range(1, 12)]
    for r0, r1 in zip(res, res[1:]):
        assert r1 <= r0 * (1 + 1e-10)
    assert res[-1] < 0.5 * res[0]


def test_nonsymmetric_operator_never_falsely_succeeds(systems):
    """On a non-symmetric operator the Lanczos recurrence is wrong and its residual
    estimate meaningless; the true-residual check must keep MINRES from claiming success."""
    a = systems.nonsymmetric(cond=10.0, skew=3.0)
    b = systems.randn(systems.n)
    res = MINRES(maxiter=60)(lambda v: a @ v, b)
    true_res = (b - a @ res.x).norm()
    assert torch.allclose(res.residual_norm, true_res, rtol=1e-6)
    if res.status is Status.SUCCESS:
        assert true_res <= default_tol(torch.float64) * b.norm()
    else:
        assert res.status is Status.MAX_ITERATIONS
        assert true_res > default_tol(torch.float64) * b.norm()


def test_singular_consistent_system(systems):
    """A symmetric singular system with b in the range: MINRES still reaches the tolerance."""
    q = systems.orthogonal(systems.n)
    lam = torch.linspace(-3.0, 3.0, systems.n, dtype=torch.float64)
    lam[7] = 0.0
    a = (q * lam) @ q.T
    a = (a + a.T) / 2
    b = a @ systems.randn(systems.n)  # consistent
    res = MINRES()(lambda v: a @ v, b)
    assert res.status is Status.SUCCESS, res.summary()
    assert (b - a @ res.x).norm() <= default_tol(torch.float64) * b.norm() * 1.0001
