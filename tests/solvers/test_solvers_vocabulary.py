"""The solver vocabulary (docs/design.md §4): a fixed budget is ``steps``, a cap is ``maxiter``,
tolerances are ``rtol``/``atol``, composite solvers take solver objects; the old names keep
working for one release with a DeprecationWarning that names the new one."""

from __future__ import annotations

import pytest
import torch

from bilevel import Status
from bilevel.linsolve import CG
from bilevel.solvers import (
    LBFGS,
    Adam,
    BacktrackingArmijo,
    FixedPointIteration,
    GradientDescent,
    NewtonCG,
    StrongWolfe,
)


def _quad(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.arange(1.0, 5.0, dtype=x.dtype) * x * x).sum() - x.sum()


X0 = torch.zeros(4, dtype=torch.float64)
SOLUTION = 1.0 / torch.arange(1.0, 5.0, dtype=torch.float64)


def test_steps_is_a_fixed_budget_and_maxiter_a_cap() -> None:
    fixed = GradientDescent(lr=0.2, steps=7)(_quad, X0)
    assert fixed.status is Status.COMPLETED and fixed.iterations == 7
    capped = GradientDescent(lr=0.2, rtol=1e-10, maxiter=7)(_quad, X0)
    assert capped.status is Status.MAX_ITERATIONS and capped.iterations == 7
    assert torch.equal(fixed.x, capped.x)  # the same iterates; only the stopping rule differs


@pytest.mark.parametrize("make", [
    lambda: GradientDescent(lr=0.2, rtol=1e-8, maxiter=500),
    lambda: GradientDescent(lr=0.2, atol=1e-8, maxiter=500),
    lambda: Adam(lr=0.05, atol=1e-6, maxiter=5000),
    lambda: NewtonCG(rtol=1e-15, atol=1e-10),
    lambda: LBFGS(rtol=1e-15, atol=1e-9),
], ids=["gd-rtol", "gd-atol", "adam-atol", "newton-atol", "lbfgs-atol"])
def test_tolerances_are_rtol_and_atol(make) -> None:
    solver = make()
    res = solver(_quad, X0)
    assert res.status is Status.SUCCESS
    g = torch.arange(1.0, 5.0, dtype=torch.float64) * res.x - 1.0
    tol = max((solver.rtol or 0.0) * 1.0 * max(1.0, float(torch.ones(4).norm())), solver.atol)
    assert float(g.norm()) <= tol * (1 + 1e-12)


def test_fixed_point_atol() -> None:
    res = FixedPointIteration(atol=1e-9, rtol=None)(lambda x: 0.5 * x + 1.0, torch.zeros(2, dtype=torch.float64))
    assert res.status is Status.SUCCESS and float(res.grad_norm) <= 1e-9


@pytest.mark.parametrize("make", [
    lambda: FixedPointIteration(damping=0.5, relaxation=0.9),
    lambda: StrongWolfe(max_steps=7, maxiter=30),
    lambda: BacktrackingArmijo(max_steps=7, maxiter=20),
    lambda: NewtonCG(cg_maxiter=3, linsolve=CG()),
    lambda: GradientDescent(lr=0.1, steps=3, rtol=1e-3, maxiter=3),
], ids=["relaxation", "wolfe", "armijo", "newton-cg", "gd"])
def test_an_old_and_a_new_name_together_are_refused(make) -> None:
    with pytest.raises(ValueError, match="not both|does not apply"):
        make()


def test_newton_cg_refuses_a_preconditioned_cg() -> None:
    with pytest.raises(ValueError, match="preconditioner"):
        NewtonCG(linsolve=CG(preconditioner=lambda r: r))


def test_newton_cg_takes_a_cg() -> None:
    fixed = NewtonCG(linsolve=CG(steps=1), maxiter=200)(_quad, X0)
    assert fixed.status is Status.SUCCESS
    torch.testing.assert_close(fixed.x, SOLUTION, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("old, new, match", [
    (lambda: GradientDescent(lr=0.2, steps=30, rtol=1e-6), lambda: GradientDescent(lr=0.2, maxiter=30, rtol=1e-6), "maxiter"),
    (lambda: Adam(lr=0.1, steps=30, rtol=1e-6), lambda: Adam(lr=0.1, maxiter=30, rtol=1e-6), "maxiter"),
    (lambda: NewtonCG(cg_maxiter=2, cg_rtol=0.1), lambda: NewtonCG(linsolve=CG(maxiter=2, rtol=0.1)), "linsolve=CG"),
    (lambda: FixedPointIteration(damping=0.5), lambda: FixedPointIteration(relaxation=0.5), "relaxation"),
    (lambda: NewtonCG(line_search=BacktrackingArmijo(max_steps=5)),
     lambda: NewtonCG(line_search=BacktrackingArmijo(maxiter=5)), "maxiter"),
    (lambda: LBFGS(line_search=StrongWolfe(max_steps=7)), lambda: LBFGS(line_search=StrongWolfe(maxiter=7)), "maxiter"),
], ids=["gd-steps-cap", "adam-steps-cap", "newton-cg-options", "fixed-point-damping", "armijo-max-steps",
        "wolfe-max-steps"])
def test_old_names_warn_and_mean_the_new(old, new, match) -> None:
    with pytest.warns(DeprecationWarning, match=match):
        solver = old()
    assert solver == new()
    fn = (lambda x: 0.5 * x + 1.0) if isinstance(solver, FixedPointIteration) else _quad
    a, b = solver(fn, X0), new()(fn, X0)
    assert a.status is b.status and torch.equal(a.x, b.x)
