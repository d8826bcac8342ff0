"""Solver-agnosticism (property-based): the implicit meta-gradient depends on the solution
only, never on the algorithm that found it.

On random well-posed problems from bilevel.testing, the meta-gradient ∂outer(x*(θ))/∂θ
through ``Proximal`` and through ``Argmin`` is computed with the solution produced by
GradientDescent, Adam, LBFGS, ScipyMinimize(L-BFGS-B) and (on problems with at most 3
unknowns, float64) ScipyMinimize(Nelder-Mead), and compared with a tight Newton-CG
reference.

Tolerance (per solver s; μ, L the objective's curvature bounds from the problem, κ = L/μ,
G = max(1, ||g_ref||), gn the achieved inner gradient norms, read from
``layer.diagnostics.forward.grad_norm`` or computed where the solver reports none)::

    ||x_s − x*|| <= gn_s / μ                         (strong convexity)
    ||g_s − g_ref|| <= G (1 + L)/μ · (gn_s + gn_ref)/μ   (the IFT gradient is Lipschitz in
                                                       the point it is evaluated at, with
                                                       unit-scale outer/third derivatives)
                     + κ G (10 tol_lin + sqrt(eps))    (backward solve + rounding, by dtype)

A sanity bound on gn (1e-6 in float64, 5e-2 in float32) keeps the test from passing
vacuously with a solver that did not converge.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bilevel._tree import tree_flatten, tree_map, tree_norm
from bilevel.solvers import LBFGS, Adam, GradientDescent, NewtonCG, ScipyMinimize
from bilevel.testing import (
    BilevelProblem,
    logistic_problems,
    make_logistic,
    mlp_proximal_problems,
    quadratic_problems,
    ridge_problems,
    softmax_problems,
)
from tests import registry

DT = torch.float64

# See test_testing_strategies.py: keeps hypothesis's failure report readable.
pytestmark = pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")



# Small problems of every family (conditioning kept moderate so that first-order solvers
# reach a tight tolerance in a few thousand steps).
PROBLEMS = st.one_of(
    quadratic_problems(dim=(2, 6), condition=(1.0, 30.0)),
    ridge_problems(dim=(2, 6)),
    logistic_problems(dim=(2, 6)),
    softmax_problems(features=(1, 2), classes=2),
    mlp_proximal_problems(inputs=1, hidden=(1, 2)),
)
SMALL_F64 = st.one_of(
    quadratic_problems(dim=(2, 3), condition=(1.0, 10.0), dtype=DT),
    ridge_problems(dim=(2, 3), dtype=DT),
    logistic_problems(dim=(2, 3), dtype=DT),
)


def _solvers(p: BilevelProblem, L: float) -> dict[str, Any]:
    f64 = p.dtype == DT
    tol = 1e-10 if f64 else 1e-4
    return {
        "GradientDescent": GradientDescent(lr=1.0 / L, maxiter=20000, rtol=tol),
        "Adam": Adam(lr=0.01, maxiter=20000, rtol=tol),
        "LBFGS": LBFGS(rtol=tol, maxiter=500),
        "ScipyMinimize(L-BFGS-B)": ScipyMinimize(
            "L-BFGS-B", options={"gtol": 1e-12 if f64 else 1e-5, "ftol": 1e-16 if f64 else 1e-10, "maxiter": 2000}
        ),
    }


def _nelder_mead() -> dict[str, Any]:
    return {
        "ScipyMinimize(Nelder-Mead)": ScipyMinimize(
            "Nelder-Mead", options={"xatol": 1e-11, "fatol": 1e-16, "maxiter": 20000, "maxfev": 20000}
        )
    }


def _meta_gradient(p: BilevelProblem, mode: str, solver: Any) -> tuple[torch.Tensor, float]:
    """(flat meta-gradient in float64, achieved inner gradient norm)."""
    # on_failure="ignore": a solver that stops short (e.g. scipy's line search in float32)
    # is judged by the gradient norm it achieved, which sets the tolerance below.
    theta = p.theta_leaf()
    if mode == "proximal":
        layer: Any = p.proximal_layer(solver=solver, on_failure="ignore")
        x = layer(theta, *p.data)

        def objective(x_: Any) -> torch.Tensor:
            return p.proximal_objective(x_, p.theta, *p.data)

    else:
        layer = p.argmin_layer(solver=solver, on_failure="ignore")
        x = layer(p.x0, theta, *p.data)

        def objective(x_: Any) -> torch.Tensor:
            return p.argmin_objective(x_, p.theta, *p.data)

    grads = torch.autograd.grad(p.outer(x), tree_flatten(theta)[0])
    assert layer.diagnostics.backward is not None and layer.diagnostics.backward.success
    fwd = layer.diagnostics.forward
    if fwd is not None and fwd.grad_norm is not None:
        gn = float(fwd.grad_norm)
    else:  # e.g. Nelder-Mead: derivative-free, reports no gradient; measure it at x*
        gn = float(tree_norm(torch.func.grad(objective)(tree_map(torch.detach, x))))
    return torch.cat([g.reshape(-1) for g in grads]).to(DT), gn


def _check_agnostic(p: BilevelProblem, mode: str, solvers: dict[str, Any]) -> None:
    mu, L = p.proximal_curvature if mode == "proximal" else p.argmin_curvature
    ref, gn_ref = _meta_gradient(p, mode, p.solver)
    G = max(1.0, float(ref.norm()))
    eps = torch.finfo(p.dtype).eps
    floor = (L / mu) * G * (10 * p.linsolve_tol + math.sqrt(eps))
    sane = 1e-6 if p.dtype == DT else 5e-2
    for name, solver in solvers.items():
        g, gn = _meta_gradient(p, mode, solver)
        assert gn <= sane, f"{name} did not converge on {p} ({mode}): gradient norm {gn:.2e}"
        tol = G * (1 + L) / mu * (gn + gn_ref) / mu + floor
        err = float((g - ref).norm())
        assert err <= tol, f"{name} vs Newton-CG on {p} ({mode}): |dg| = {err:.3e} > tol {tol:.3e} (gn {gn:.1e})"


@given(problem=PROBLEMS)
def test_proximal_meta_gradient_is_solver_agnostic(problem: BilevelProblem) -> None:
    _check_agnostic(problem, "proximal", _solvers(problem, problem.proximal_curvature[1]))


@given(problem=PROBLEMS)
def test_argmin_meta_gradient_is_solver_agnostic(problem: BilevelProblem) -> None:
    _check_agnostic(problem, "argmin", _solvers(problem, problem.argmin_curvature[1]))


@given(problem=SMALL_F64, mode=st.sampled_from(["proximal", "argmin"]))
def test_nelder_mead_agrees_on_small_problems(problem: BilevelProblem, mode: str) -> None:
    """Derivative-free Nelder-Mead (only on <= 3 unknowns, float64, tight xatol/fatol)."""
    assert problem.dim <= 3
    _check_agnostic(problem, mode, _nelder_mead())


def test_tolerance_is_not_vacuous() -> None:
    """The comparison would catch a solver that stopped early: 3 plain GD steps are far
    outside the tolerance's dtype floor, and the sanity bound flags them."""
    from bilevel.testing import make_quadratic

    p = make_quadratic(4, 30.0, DT, "tensor", 3)
    mu, L = p.argmin_curvature
    ref, gn_ref = _meta_gradient(p, "argmin", p.solver)
    g, gn = _meta_gradient(p, "argmin", GradientDescent(lr=1.0 / L, steps=3))
    G = max(1.0, float(ref.norm()))
    floor = (L / mu) * G * (10 * p.linsolve_tol + math.sqrt(torch.finfo(DT).eps))
    assert float((g - ref).norm()) > 10 * floor  # the dtype floor alone would not excuse it
    assert gn > 1e-6  # ... and the sanity bound would have flagged the unconverged solve


def test_every_minimiser_is_compared() -> None:
    """Every minimiser of the registry meets the Newton-CG reference (the problems' own solver)."""
    p = make_logistic(3, DT, "tensor", 0)
    tested = {type(s) for s in _solvers(p, 1.0).values()} | {type(p.solver)}
    assert type(p.solver) is NewtonCG
    assert tested == {type(e.solver) for e in registry.entries("inner", exclude={"fixed_point"})}
