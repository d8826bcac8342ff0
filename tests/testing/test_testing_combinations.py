"""Every inner solver x linear solver combination that applies passes check_implicit_grad.

* symmetric layers (Proximal, Argmin): GradientDescent, Adam, LBFGS, NewtonCG,
  ScipyMinimize(L-BFGS-B) x CG, MINRES, Dense, GMRES, BiCGSTAB, and Neumann with
  ``alpha = 1/L_obj`` (``1/(λ + L)`` for Proximal), where the series converges because
  the operator's eigenvalues lie in ``[mu_obj, L_obj]``, so ``I − alpha A`` has spectral
  radius ``1 − mu_obj/L_obj < 1``;
* FixedPoint (non-symmetric ``J − I``): FixedPointIteration (plain and damped) x GMRES,
  BiCGSTAB, Dense, Neumann.  FixedPoint + Neumann is an expected failure (a core issue:
  FixedPoint's residual ``fn(x) − x`` has Jacobian ``J − I`` with eigenvalues of negative
  real part, while Neumann requires ``alpha > 0``, so the series diverges); the same
  fixed point written with the residual ``x − fn(x)`` through ``custom_root`` passes.

Each check uses one random direction per input (the combinations are many; the planted
bug tests show that one direction suffices to catch real bugs); for Proximal, θ and λ
form one input, so that direction moves both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch

import bilevel
from bilevel import ConvergenceWarning, FixedPoint, custom_root
from bilevel.linsolve import Neumann
from bilevel.solvers import (
    LBFGS,
    Adam,
    FixedPointIteration,
    GradientDescent,
    NewtonCG,
    ScipyMinimize,
)
from bilevel.testing import BilevelProblem, check_implicit_grad, make_logistic
from tests import registry

DT = torch.float64
TOL = 1e-12



# One small, non-quadratic, tree-valued problem (logistic regression, θ = {'w', 'b'}).
PROBLEM: BilevelProblem = make_logistic(3, DT, "dict", 21)

INNER_SOLVERS: dict[str, Callable[[float], Any]] = {
    # Each gets the objective's L (for a step size) and is configured tightly.
    "GradientDescent": lambda L: GradientDescent(lr=1.0 / L, maxiter=20000, rtol=1e-11),
    "Adam": lambda L: Adam(lr=0.01, maxiter=20000, rtol=1e-11),
    "LBFGS": lambda L: LBFGS(rtol=1e-11, maxiter=500),
    "NewtonCG": lambda L: NewtonCG(rtol=1e-11, maxiter=100),
    "ScipyMinimize(L-BFGS-B)": lambda L: ScipyMinimize("L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-16, "maxiter": 2000}),
}


def _tight(solver: Any, **neumann: Any) -> Any:
    """A linear solver of the registry at ``rtol=TOL`` (Dense has no tolerance); the
    Neumann series with the step and cap ``neumann``."""
    caps = registry.capabilities(solver)
    if "direct" in caps:
        return solver
    return dataclasses.replace(solver, rtol=TOL, **(neumann if "contraction" in caps else {}))


# Every linear solver at its defaults: all of them solve the SPD systems of the symmetric
# layers (Neumann with alpha = 1/L_obj).
SYMMETRIC_LINSOLVES: dict[str, Callable[[float], Any]] = {
    e.id: (lambda L, s=e.solver: _tight(s, alpha=1.0 / L, maxiter=5000))
    for e in registry.entries("linear", tags={"default"})
}


@pytest.mark.parametrize("linsolve", list(SYMMETRIC_LINSOLVES))
@pytest.mark.parametrize("solver", list(INNER_SOLVERS))
def test_proximal_combination_passes(solver: str, linsolve: str) -> None:
    p = PROBLEM
    L = p.proximal_curvature[1]  # λ + L
    layer = p.proximal_layer(INNER_SOLVERS[solver](L), SYMMETRIC_LINSOLVES[linsolve](L), on_failure="raise")
    lam = torch.tensor(p.lam, dtype=DT, requires_grad=True)
    meta = p.proximal_meta_loss(layer)

    def fn(params: tuple[dict, torch.Tensor]) -> torch.Tensor:
        return meta(params[0], params[1])

    # (θ, λ) as one input: a single random direction moves both (two inner solves).
    report = check_implicit_grad(fn, ((p.theta_leaf(), lam),), directions=1, solver_tol=1e-9)
    assert report.ok
    assert layer.diagnostics.backward is not None and layer.diagnostics.backward.success


@pytest.mark.parametrize("linsolve", list(SYMMETRIC_LINSOLVES))
@pytest.mark.parametrize("solver", list(INNER_SOLVERS))
def test_argmin_combination_passes(solver: str, linsolve: str) -> None:
    p = PROBLEM
    L = p.argmin_curvature[1]  # L + 3λ/2
    layer = p.argmin_layer(INNER_SOLVERS[solver](L), SYMMETRIC_LINSOLVES[linsolve](L), on_failure="raise")
    report = check_implicit_grad(p.argmin_meta_loss(layer), (p.theta_leaf(),), directions=1, solver_tol=1e-9)
    assert report.ok


# -- FixedPoint ---------------------------------------------------------------------------
N_FP = 4


def _fixed_point_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x = tanh(W x + U a): ||W||_2 = 0.6, so fn is a contraction (tanh is 1-Lipschitz)."""
    g = torch.Generator().manual_seed(5)
    W0 = torch.randn(N_FP, N_FP, generator=g, dtype=DT)
    W = 0.6 * W0 / torch.linalg.matrix_norm(W0, 2)
    U = torch.randn(N_FP, 2, generator=g, dtype=DT)
    a = torch.randn(2, generator=g, dtype=DT)
    return W, U, a


def _fp_fn(x: torch.Tensor, W: torch.Tensor, U: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return torch.tanh(W @ x + U @ a)


FP_SOLVERS: dict[str, Any] = {
    "FixedPointIteration": FixedPointIteration(rtol=1e-13, maxiter=2000),
    "FixedPointIteration(relaxation=0.5)": FixedPointIteration(rtol=1e-13, maxiter=4000, relaxation=0.5),
    "Broyden": bilevel.solvers.Broyden(rtol=1e-13),
    "Anderson": bilevel.solvers.Anderson(rtol=1e-13, maxiter=500),
}
# The linear solvers for non-symmetric systems, and the Neumann series with alpha = 1.
FP_LINSOLVES: dict[str, Any] = {
    e.id: _tight(e.solver, alpha=1.0, maxiter=500)
    for e in registry.entries("linear", tags={"default"})
    if e.tags & {"nonsymmetric", "contraction"}
}


def _check_fixed_point(layer: Any) -> None:
    W, U, a = _fixed_point_data()
    W, U, a = (t.clone().requires_grad_(True) for t in (W, U, a))

    def fn(W: torch.Tensor, U: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        x = layer(torch.zeros(N_FP, dtype=DT), W, U, a)
        return (x * torch.linspace(-1.0, 2.0, N_FP, dtype=DT)).sum() + (x**2).sum()

    report = check_implicit_grad(fn, (W, U, a), directions=1, solver_tol=1e-11)
    assert report.ok


@pytest.mark.parametrize("linsolve", list(FP_LINSOLVES))
@pytest.mark.parametrize("solver", list(FP_SOLVERS))
def test_fixed_point_combination_passes(solver: str, linsolve: str) -> None:
    layer = FixedPoint(_fp_fn, FP_SOLVERS[solver], FP_LINSOLVES[linsolve])
    _check_fixed_point(layer)


@pytest.mark.parametrize("solver", list(FP_SOLVERS))
def test_fixed_point_with_neumann_via_custom_root(solver: str) -> None:
    """The Neumann series solves (I − J)^T u = v with alpha = 1 (u = Σ (J^T)^k v): the
    fixed point written with the residual x − fn(x), whose Jacobian is I − J."""
    fp_solver = FP_SOLVERS[solver]

    def residual(x: torch.Tensor, W: torch.Tensor, U: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return x - _fp_fn(x, W, U, a)

    @custom_root(residual, FP_LINSOLVES["Neumann"], on_failure="raise")
    def layer(x0: torch.Tensor, W: torch.Tensor, U: torch.Tensor, a: torch.Tensor) -> Any:
        return fp_solver(_fp_fn, x0, W, U, a)

    _check_fixed_point(layer)


def test_neumann_alpha_outside_its_range_is_reported_not_silent() -> None:
    """alpha > 2/L_obj makes the series diverge: the layer must say so (warn), not return garbage."""
    p = PROBLEM
    L = p.proximal_curvature[1]
    layer = p.proximal_layer(linsolve=Neumann(alpha=3.0 / L, rtol=TOL, maxiter=200))
    theta = p.theta_leaf()
    with pytest.warns(ConvergenceWarning, match="Neumann"):
        phi = layer(theta, *p.data)
        torch.autograd.grad(p.outer(phi), list(theta.values()))
    assert not layer.diagnostics.backward.success
    assert isinstance(bilevel.linsolve.Neumann(alpha=1.0), bilevel.linsolve.LinearSolver)


def test_every_inner_solver_is_combined() -> None:
    minimisers = {type(e.solver).__name__ for e in registry.entries("inner", exclude={"fixed_point"})}
    assert {name.split("(")[0] for name in INNER_SOLVERS} == minimisers
    fixed_point = {type(e.solver) for e in registry.entries("inner", tags={"fixed_point"})}
    assert {type(s) for s in FP_SOLVERS.values()} == fixed_point
