"""Each minimiser reaches independently computed minimisers (scipy / torch.linalg.solve).

Accuracy checks use the strong-convexity bound ``||x - x*|| <= ||grad f(x)|| / mu``
(``mu`` = smallest Hessian eigenvalue) with the gradient recomputed here, plus the
reference's own error, so no tolerance is tuned to the solvers' output.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bilevel import Status
from bilevel.solvers import LBFGS, Adam, GradientDescent, NewtonCG, ScipyMinimize
from tests import registry
from tests.problems import (
    LAM,
    logistic_dict,
    logistic_problem,
    logistic_reference,
    logistic_torch,
    logistic_tuple,
    quadratic,
    quadratic_problem,
)

REF_ERR = 1e-10 / LAM  # bound on the reference's own error (see logistic_reference)


def _grad(fn, x, *args):
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x, *args), x)
    return g


def _lipschitz_logistic(a: torch.Tensor) -> float:
    # Hessian <= 0.25 A^T A / n + lam I.
    return float(0.25 * torch.linalg.eigvalsh(a.T @ a / a.shape[0]).max()) + LAM


def _solvers_logistic(a: torch.Tensor):
    L = _lipschitz_logistic(a)
    lr = 2.0 / (L + LAM)  # the optimal fixed step for a mu-strongly convex, L-smooth function
    return {
        "gd": GradientDescent(lr=lr, maxiter=2000, rtol=1e-10),
        "gd_momentum": GradientDescent(lr=1.0 / L, maxiter=2000, momentum=0.5, rtol=1e-10),
        "gd_nesterov": GradientDescent(lr=1.0 / L, maxiter=2000, momentum=0.5, nesterov=True, rtol=1e-10),
        # Adam with a constant step is not guaranteed to converge (its second-moment estimate
        # decays once g -> 0 and the effective step grows), so it is used with a tolerance.
        "adam": Adam(lr=0.03, maxiter=3000, rtol=1e-10),
        "lbfgs": LBFGS(rtol=1e-10),
        "newton_cg": NewtonCG(rtol=1e-10),
        "scipy_lbfgsb": ScipyMinimize("L-BFGS-B", options={"gtol": 1e-11, "ftol": 0.0}),
        "scipy_newton_cg": ScipyMinimize("Newton-CG", options={"xtol": 1e-12}),
    }


def test_every_minimiser_reaches_the_logistic_minimiser() -> None:
    tested = {type(s) for s in _solvers_logistic(logistic_problem()[0]).values()}
    assert tested == {type(e.solver) for e in registry.entries("inner", exclude={"fixed_point"})}


@pytest.mark.parametrize("name", list(_solvers_logistic(logistic_problem()[0])))
def test_logistic_regression_reaches_scipy_minimiser(name: str) -> None:
    a, y = logistic_problem()
    solver = _solvers_logistic(a)[name]
    ref = torch.tensor(logistic_reference())
    x0 = torch.zeros(5, dtype=torch.float64)
    with torch.no_grad():  # as the layers call them: derivatives come from torch.func anyway
        res = solver(logistic_torch, x0, a, y)
    assert res.status is Status.SUCCESS, res.status
    assert res.x.shape == x0.shape and res.x.dtype == x0.dtype
    assert torch.equal(x0, torch.zeros(5, dtype=torch.float64))  # x0 untouched
    gnorm = float(_grad(logistic_torch, res.x, a, y).norm())
    if res.grad_norm is not None:
        assert abs(float(res.grad_norm) - gnorm) <= 1e-12 + 1e-6 * gnorm
    if not isinstance(solver, ScipyMinimize):
        g0 = float(_grad(logistic_torch, x0, a, y).norm())
        assert gnorm <= 1e-10 * max(1.0, g0)
    err = float((res.x - ref).norm())
    assert err <= gnorm / LAM + REF_ERR
    # scipy's Newton-CG stops on the size of its update (xtol), not on the gradient.
    assert err < (1e-6 if name == "scipy_newton_cg" else 1e-8)
    assert torch.allclose(res.value, logistic_torch(res.x, a, y), rtol=1e-14, atol=0)
    assert res.iterations >= 1 and res.n_fun >= res.iterations and res.n_grad >= 1


def test_newton_cg_uses_hvps_and_lbfgs_none() -> None:
    a, y = logistic_problem()
    x0 = torch.zeros(5, dtype=torch.float64)
    rn = NewtonCG()(logistic_torch, x0, a, y)
    rl = LBFGS()(logistic_torch, x0, a, y)
    assert rn.n_hvp >= rn.iterations >= 1
    assert rl.n_hvp == 0
    # The default tolerance is eps**0.5 (relative to max(1, ||g0||)).
    for r in (rn, rl):
        assert r.status is Status.SUCCESS
        assert float(r.grad_norm) <= torch.finfo(torch.float64).eps ** 0.5


@pytest.mark.parametrize("solver", [LBFGS(), NewtonCG()], ids=["lbfgs", "newton_cg"])
def test_float32_default_tolerance_is_reached(solver) -> None:
    a, y = logistic_problem(torch.float32)
    x0 = torch.zeros(5, dtype=torch.float32)
    res = solver(logistic_torch, x0, a, y)
    assert res.status is Status.SUCCESS
    assert res.x.dtype == torch.float32
    ref = torch.tensor(logistic_reference(), dtype=torch.float32)
    # ||g|| <= sqrt(eps_32) ~ 3.5e-4 gives ||x - x*|| <= 3.5e-3 by strong convexity.
    assert float((res.x - ref).norm()) <= torch.finfo(torch.float32).eps ** 0.5 / LAM


@pytest.mark.parametrize(
    "solver",
    [LBFGS(rtol=1e-10), NewtonCG(rtol=1e-10), ScipyMinimize("L-BFGS-B", options={"gtol": 1e-11, "ftol": 0.0})],
    ids=["lbfgs", "newton_cg", "scipy"],
)
@pytest.mark.parametrize("kind", ["dict", "tuple"])
def test_tree_inputs_logistic_with_bias(solver, kind: str) -> None:
    a, y = logistic_problem()
    ref = torch.tensor(logistic_reference(with_bias=True))
    w0, b0 = torch.zeros(5, dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    if kind == "dict":
        fn, x0 = logistic_dict, {"w": w0, "b": b0}
    else:
        fn, x0 = logistic_tuple, (w0, b0)
    res = solver(fn, x0, a, y)
    assert res.status is Status.SUCCESS
    x = res.x
    if kind == "dict":
        assert isinstance(x, dict) and list(x) == ["w", "b"]
        w, b = x["w"], x["b"]
    else:
        assert isinstance(x, tuple) and len(x) == 2
        w, b = x
    assert w.shape == (5,) and b.shape == () and w.dtype == b.dtype == torch.float64
    assert float((torch.cat([w, b.reshape(1)]) - ref).norm()) < 1e-8


def test_tree_inputs_gradient_descent_dict() -> None:
    a, y = logistic_problem()
    ref = torch.tensor(logistic_reference(with_bias=True))
    a1 = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)  # bias as a feature
    L = _lipschitz_logistic(a1)
    x0 = {"w": torch.zeros(5, dtype=torch.float64), "b": torch.zeros((), dtype=torch.float64)}
    res = GradientDescent(lr=2.0 / (L + LAM), maxiter=3000, rtol=1e-10)(logistic_dict, x0, a, y)
    assert res.status is Status.SUCCESS
    assert float((torch.cat([res.x["w"], res.x["b"].reshape(1)]) - ref).norm()) < 1e-8


@pytest.mark.parametrize(
    "solver",
    [GradientDescent(lr=0.5, steps=5), Adam(steps=5), LBFGS(), NewtonCG()],
    ids=["gd", "adam", "lbfgs", "newton_cg"],
)
def test_x0_requiring_grad_is_not_differentiated_through(solver) -> None:
    # The solver is opaque to autograd (the layers differentiate implicitly): no graph to x0.
    a, y = logistic_problem()
    x0 = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    res = solver(logistic_torch, x0, a, y)
    assert not res.x.requires_grad and res.x.grad_fn is None
    assert x0.grad is None and torch.equal(x0.detach(), torch.zeros(5, dtype=torch.float64))


# -- ill-conditioned quadratic ------------------------------------------------------------
@pytest.mark.parametrize("solver", [LBFGS(rtol=1e-8), NewtonCG(rtol=1e-10)], ids=["lbfgs", "newton_cg"])
def test_ill_conditioned_quadratic(solver) -> None:
    h, b, xs = quadratic_problem(cond=1e3)
    res = solver(quadratic, torch.zeros(10, dtype=torch.float64), h, b)
    assert res.status is Status.SUCCESS
    g = h @ res.x - b
    assert float(g.norm()) <= solver.rtol * max(1.0, float(b.norm()))
    # lambda_min(H) = 1: ||x - x*|| <= ||H x - b||.
    assert float((res.x - xs).norm()) <= float(g.norm()) * (1 + 1e-6)
    assert float((res.x - xs).norm()) < 1e-7


def test_newton_cg_far_fewer_iterations_than_gd() -> None:
    """On a condition-number-1e3 quadratic GD needs O(kappa log(1/tol)) steps, Newton-CG O(1)."""
    h, b, _ = quadratic_problem(cond=1e3)
    x0 = torch.zeros(10, dtype=torch.float64)
    tol = 1e-6
    newton = NewtonCG(rtol=tol)(quadratic, x0, h, b)
    assert newton.status is Status.SUCCESS
    # GD at its best fixed step 2/(L + mu), allowed 20x Newton's iterations, must still
    # be short of the same gradient tolerance: GD needs more than 20x as many iterations.
    budget = 20 * newton.iterations
    gd = GradientDescent(lr=2.0 / (1e3 + 1.0), maxiter=budget, rtol=tol)(quadratic, x0, h, b)
    assert gd.status is Status.MAX_ITERATIONS
    assert gd.iterations == budget
    assert float(gd.grad_norm) > tol * max(1.0, float(b.norm()))


@pytest.mark.parametrize("name", ["gd", "adam"])
def test_first_order_on_well_conditioned_quadratic(name: str) -> None:
    # GD/Adam need O(kappa log 1/tol) steps; at kappa = 1e3 that is ~10^4 evaluations, too
    # slow for the test suite, so they get a condition-number-10 instance (the ill-
    # conditioned one is covered by the Newton-CG vs GD comparison above).
    h, b, xs = quadratic_problem(cond=10.0)
    solver = (
        GradientDescent(lr=2.0 / (10.0 + 1.0), maxiter=1000, rtol=1e-10)
        if name == "gd"
        else Adam(lr=0.05, maxiter=3000, rtol=1e-10)
    )
    res = solver(quadratic, torch.zeros(10, dtype=torch.float64), h, b)
    assert res.status is Status.SUCCESS
    g = h @ res.x - b
    assert float((res.x - xs).norm()) <= float(g.norm()) * (1 + 1e-6) < 1e-9 * max(1.0, float(b.norm())) + 1e-12


def test_fixed_budget_is_completed() -> None:
    h, b, _ = quadratic_problem(cond=10.0)
    x0 = torch.zeros(10, dtype=torch.float64)
    for solver in (GradientDescent(lr=0.1, steps=7, monitor=True), Adam(lr=0.1, steps=7, monitor=True)):
        res = solver(quadratic, x0, h, b)
        assert res.status is Status.COMPLETED
        assert res.iterations == 7 and res.n_fun == res.n_grad == 8
        assert torch.allclose(res.grad_norm, (h @ res.x - b).norm(), rtol=1e-12, atol=0)
    res = GradientDescent(lr=0.1, steps=0)(quadratic, x0, h, b)
    assert res.status is Status.COMPLETED and res.iterations == 0 and torch.equal(res.x, x0)


def test_gradient_descent_matches_closed_form_iterates() -> None:
    # On a quadratic, heavy-ball momentum has the closed-form recursion
    # x_{k+1} = x_k - lr * v_{k+1}, v_{k+1} = mu v_k + (H x_k - b).
    h, b, _ = quadratic_problem(cond=10.0, d=4)
    lr, mu, steps = 0.05, 0.7, 5
    for nesterov in (False, True):
        x = np.zeros(4)
        v = np.zeros(4)
        hn, bn = h.numpy(), b.numpy()
        for _ in range(steps):
            g = hn @ x - bn
            v = mu * v + g
            x = x - lr * (g + mu * v if nesterov else v)
        res = GradientDescent(lr=lr, steps=steps, momentum=mu, nesterov=nesterov)(
            quadratic, torch.zeros(4, dtype=torch.float64), h, b
        )
        np.testing.assert_allclose(res.x.numpy(), x, rtol=1e-13, atol=1e-15)


def test_adam_matches_kingma_ba_iterates() -> None:
    h, b, _ = quadratic_problem(cond=10.0, d=4)
    lr, (b1, b2), eps, steps = 0.1, (0.8, 0.99), 1e-8, 6
    x, m, v = np.zeros(4), np.zeros(4), np.zeros(4)
    for t in range(1, steps + 1):
        g = h.numpy() @ x - b.numpy()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        x = x - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    res = Adam(lr=lr, steps=steps, betas=(b1, b2), eps=eps)(quadratic, torch.zeros(4, dtype=torch.float64), h, b)
    np.testing.assert_allclose(res.x.numpy(), x, rtol=1e-13, atol=1e-15)


def _double_well(x: torch.Tensor) -> torch.Tensor:
    # Minimisers (+-1, 0), f = -1/4 there; Hessian diag(3 x0^2 - 1, 1) is indefinite for |x0| < 1/sqrt(3).
    return 0.25 * x[0] ** 4 - 0.5 * x[0] ** 2 + 0.5 * x[1] ** 2


@pytest.mark.parametrize("start", [(0.1, 0.0), (0.1, 1.0), (-0.3, -2.0), (0.05, 3.0)])
def test_newton_cg_handles_negative_curvature(start) -> None:
    x0 = torch.tensor(start, dtype=torch.float64)
    res = NewtonCG(rtol=1e-12)(_double_well, x0)
    assert res.status is Status.SUCCESS
    # Descent from a point with f > -1/4 must end at one of the two minimisers, on the side of x0[0].
    expected = torch.tensor([np.sign(start[0]), 0.0], dtype=torch.float64)
    assert torch.allclose(res.x, expected, atol=1e-10)
    assert abs(float(res.value) + 0.25) < 1e-15
