"""check_implicit_grad must catch real bugs: each test plants one and also shows that the
correct layer on the same problem passes, so that the test can fail both ways.

Planted bugs:
1. a wrong sign (on the θ-term of the optimality condition only; negating the whole
   residual is *not* a bug — −F has the same root and the same implicit gradient);
   and a wrong sign introduced by an autograd.Function around the layer output;
2. a zero gradient: θ passed only as the initial point of an Argmin whose objective does
   not involve it (docs/design.md §2), and θ closed over instead of passed;
3. a stale residual in CG (r never recomputed), used as the backward linear solver;
4. a wrong λ scaling (λ/2 in the optimality condition while the solver solves the
   correct proximal problem).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import bilevel
from bilevel import Argmin, ClosedOverTensorWarning, ImplicitLayer, LinearSolveResult, Status
from bilevel._tree import tree_axpy, tree_flatten, tree_map, tree_norm, tree_vdot, tree_zeros_like
from bilevel.linsolve import CG, LinearSolver
from bilevel.solvers import GradientDescent
from bilevel.testing import (
    BilevelProblem,
    GradCheckError,
    check_implicit_grad,
    make_logistic,
    make_quadratic,
    make_ridge,
)

DT = torch.float64



class HandProximal(ImplicitLayer):
    """A proximal layer written by hand, with knobs to plant bugs in its optimality condition.

    ``solve`` minimises the correct objective ``L(φ) + λ/2 ||φ − θ||²``; ``optimality``
    returns ``∇L(φ) + λ (cx φ − cθ θ)``.  Correct: ``cx = cθ = 1``.  Called as
    ``layer(theta.detach(), theta, lam, *data)``.
    """

    symmetric = True

    def __init__(self, problem: BilevelProblem, cx: float = 1.0, ctheta: float = 1.0, linsolve: Any = None) -> None:
        super().__init__(linsolve or problem.linsolve, on_failure="raise")
        self.problem = problem
        self.cx = cx
        self.ctheta = ctheta

    def solve(self, x0: Any, theta: Any, lam: torch.Tensor, *data: Any) -> Any:
        problem = self.problem

        def objective(phi: Any, theta_: Any, lam_: torch.Tensor, *d: Any) -> torch.Tensor:
            return problem.proximal_objective(phi, theta_, *d, lam=lam_)

        return problem.solver(objective, x0, theta, lam, *data)

    def optimality(self, x: Any, theta: Any, lam: torch.Tensor, *data: Any) -> Any:
        g = torch.func.grad(self.problem.inner)(x, *data)
        return tree_map(lambda gi, xi, ti: gi + lam * (self.cx * xi - self.ctheta * ti), g, x, theta)


def _hand_fn(problem: BilevelProblem, layer: HandProximal) -> Any:
    def fn(theta: Any, lam: torch.Tensor) -> torch.Tensor:
        x0 = tree_map(lambda t: t.detach(), theta)
        return problem.outer(layer(x0, theta, lam, *problem.data))

    return fn


def _inputs(problem: BilevelProblem) -> tuple[Any, torch.Tensor]:
    return problem.theta_leaf(), torch.tensor(problem.lam, dtype=problem.dtype, requires_grad=True)


def _assert_caught(excinfo: pytest.ExceptionInfo[GradCheckError]) -> None:
    report = excinfo.value.report
    assert not report.ok and report.failures
    assert "FAIL" in str(excinfo.value) and "FAILED" in str(report)


PROBLEMS = {
    "ridge-tensor": lambda: make_ridge(4, DT, "tensor", 11),
    "logistic-dict": lambda: make_logistic(4, DT, "dict", 12),
    "quadratic-tuple": lambda: make_quadratic(5, 20.0, DT, "tuple", 13),
}


@pytest.mark.parametrize("name", ["ridge-tensor", "logistic-dict"])
def test_correct_hand_written_layer_passes(name: str) -> None:
    p = PROBLEMS[name]()
    fn = _hand_fn(p, HandProximal(p))
    report = check_implicit_grad(fn, _inputs(p), directions=2, solver_tol=p.solver_tol)
    assert report.ok
    # The hand-written layer agrees with the library's Proximal: the reference is sound.
    th = p.theta_leaf()
    g1 = torch.autograd.grad(fn(th, torch.tensor(p.lam, dtype=DT)), tree_flatten(th)[0])
    th2 = p.theta_leaf()
    g2 = torch.autograd.grad(p.proximal_meta_loss()(th2), tree_flatten(th2)[0])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ["ridge-tensor", "logistic-dict"])
def test_wrong_sign_on_theta_term_is_caught(name: str) -> None:
    """∇L + λ(φ + θ) instead of ∇L + λ(φ − θ): the θ-gradient flips sign (and the λ one changes)."""
    p = PROBLEMS[name]()
    fn = _hand_fn(p, HandProximal(p, ctheta=-1.0))
    with pytest.raises(GradCheckError) as excinfo:
        check_implicit_grad(fn, _inputs(p), directions=2, solver_tol=p.solver_tol)
    _assert_caught(excinfo)
    rows = [e for e in excinfo.value.report.entries if e.input == "inputs[0]"]
    assert all(not e.ok for e in rows)
    # Exactly the negated gradient: analytic == -reference (to the check's accuracy).
    for e in rows:
        assert abs(e.analytic + e.reference) <= 1e-5 * max(1.0, abs(e.reference))


def test_negating_the_whole_residual_is_not_a_bug() -> None:
    """−F has the same root and the same implicit gradient: the check must pass (no false alarm)."""
    p = PROBLEMS["ridge-tensor"]()

    class NegatedProximal(HandProximal):
        def optimality(self, x: Any, theta: Any, lam: torch.Tensor, *data: Any) -> Any:
            return tree_map(torch.neg, HandProximal.optimality(self, x, theta, lam, *data))

    # −(H + λI) is negative definite: MINRES (symmetric indefinite), not CG.
    layer = NegatedProximal(p, linsolve=bilevel.linsolve.MINRES(rtol=1e-12))
    fn = _hand_fn(p, layer)
    assert check_implicit_grad(fn, _inputs(p), directions=2, solver_tol=p.solver_tol).ok


class _NegateGrad(torch.autograd.Function):
    """Identity forward, negated backward: a sign bug outside the implicit layer."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return -g


def test_wrong_sign_in_a_wrapper_function_is_caught() -> None:
    p = PROBLEMS["ridge-tensor"]()
    layer = p.proximal_layer()

    def good(theta: torch.Tensor) -> torch.Tensor:
        return p.outer(layer(theta, *p.data))

    def bad(theta: torch.Tensor) -> torch.Tensor:
        return p.outer(_NegateGrad.apply(layer(theta, *p.data)))

    assert check_implicit_grad(good, (p.theta_leaf(),), directions=2, solver_tol=p.solver_tol).ok
    report = check_implicit_grad(bad, (p.theta_leaf(),), directions=2, solver_tol=p.solver_tol, raise_exception=False)
    assert not report.ok and len(report.failures) == 2


def test_zero_gradient_theta_only_in_x0_is_caught() -> None:
    """The first pitfall of docs/design.md §2: θ enters only as the initial point of an Argmin whose objective
    does not involve it.  Its implicit gradient is zero; the function actually computed
    (5 gradient steps from θ, as in first-order MAML) does depend on θ."""
    p = PROBLEMS["ridge-tensor"]()
    solver = GradientDescent(lr=0.5 / p.L, steps=5)  # no tol: COMPLETED, a trusted status
    trap = Argmin(p.inner, solver, p.linsolve)

    def fn(theta: torch.Tensor) -> torch.Tensor:
        return p.outer(trap(theta, *p.data))

    report = check_implicit_grad(fn, (p.theta_leaf(),), directions=2, solver_tol=p.solver_tol, raise_exception=False)
    assert not report.ok
    assert all(e.analytic == 0.0 and abs(e.reference) > 1e-3 for e in report.entries)
    assert any("does not require grad" in n for n in report.notes)

    # The fix: the proximal term carries θ into the optimality condition.
    fixed = p.proximal_layer(solver=GradientDescent(lr=1.0 / (p.L + p.lam), maxiter=2000, rtol=1e-12))

    def fn_fixed(theta: torch.Tensor) -> torch.Tensor:
        return p.outer(fixed(theta, *p.data))

    assert check_implicit_grad(fn_fixed, (p.theta_leaf(),), directions=2, solver_tol=p.solver_tol).ok


def test_zero_gradient_closed_over_theta_is_caught_and_warned() -> None:
    """θ closed over by the objective (λ passed properly): θ gets no gradient, and the core
    warns ClosedOverTensorWarning during the backward."""
    p = PROBLEMS["ridge-tensor"]()

    def fn(theta: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        def objective(x: torch.Tensor, lam_: torch.Tensor, *data: Any) -> torch.Tensor:
            return p.inner(x, *data) + 0.5 * lam_ * ((x - theta) ** 2).sum()  # BUG: θ closed over

        layer = Argmin(objective, p.solver, p.linsolve)
        return p.outer(layer(theta.detach(), lam, *p.data))

    with pytest.warns(ClosedOverTensorWarning):
        report = check_implicit_grad(fn, _inputs(p), directions=2, solver_tol=p.solver_tol, raise_exception=False)
    assert not report.ok
    theta_rows = [e for e in report.entries if e.input == "inputs[0]"]
    lam_rows = [e for e in report.entries if e.input == "inputs[1]"]
    assert all(not e.ok and e.analytic == 0.0 for e in theta_rows)
    assert all(e.ok for e in lam_rows)  # λ was passed as an argument: its gradient is right

    def fn_fixed(theta: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        def objective(x: torch.Tensor, theta_: torch.Tensor, lam_: torch.Tensor, *data: Any) -> torch.Tensor:
            return p.inner(x, *data) + 0.5 * lam_ * ((x - theta_) ** 2).sum()

        layer = Argmin(objective, p.solver, p.linsolve)
        return p.outer(layer(theta.detach(), theta, lam, *p.data))

    assert check_implicit_grad(fn_fixed, _inputs(p), directions=2, solver_tol=p.solver_tol).ok


@dataclasses.dataclass(frozen=True)
class StaleResidualCG(LinearSolver):
    """CG with the classic bug: the residual is never recomputed after the first step.

    ``r_new = r - alpha A p`` is computed but not assigned back to ``r``, so ``beta = 1``
    and every direction is a multiple of ``b``.  Like the peers' versions it trusts its
    iteration budget and reports SUCCESS, so nothing but a gradient check reveals it.
    """

    requires_symmetric = True

    def __call__(self, matvec: Any, b: Any, x0: Any = None, *, batched: bool = False) -> LinearSolveResult:
        if batched:
            raise NotImplementedError
        x = tree_zeros_like(b)
        r = b
        p = r
        rr = tree_vdot(r, r)
        r_new = r
        n = self._maxiter(b, batched)
        for _ in range(n):
            Ap = matvec(p)
            alpha = rr / tree_vdot(p, Ap)
            x = tree_axpy(alpha, p, x)
            r_new = tree_axpy(-alpha, Ap, r)  # BUG: should be `r = ...`
            rr_new = tree_vdot(r, r)
            p = tree_axpy(rr_new / rr, p, r)
            rr = rr_new
        return LinearSolveResult(x=x, status=Status.SUCCESS, iterations=n, residual_norm=tree_norm(r_new))


@pytest.mark.parametrize("name", ["quadratic-tuple", "logistic-dict"])
def test_stale_cg_residual_is_caught(name: str) -> None:
    p = PROBLEMS[name]()
    good = p.proximal_meta_loss(p.proximal_layer(linsolve=CG(rtol=1e-12, maxiter=p.dim)))
    bad_layer = p.proximal_layer(linsolve=StaleResidualCG(maxiter=p.dim))
    bad = p.proximal_meta_loss(bad_layer)
    # Same budget, n iterations: real CG is exact in n steps, the stale one is not.
    assert check_implicit_grad(good, (p.theta_leaf(),), directions=2, solver_tol=p.solver_tol).ok
    with pytest.raises(GradCheckError) as excinfo:
        check_implicit_grad(bad, (p.theta_leaf(),), directions=2, solver_tol=p.solver_tol)
    _assert_caught(excinfo)
    assert bad_layer.diagnostics.backward.status is Status.SUCCESS  # the status did not reveal it


@pytest.mark.parametrize("name", ["ridge-tensor", "quadratic-tuple"])
def test_wrong_lambda_scaling_is_caught(name: str) -> None:
    """Optimality ∇L + (λ/2)(φ − θ) while the solver solves the λ problem: A = H + λ/2,
    B = −λ/2 give (λ/2)(H + λ/2)^{-1} v instead of λ (H + λ)^{-1} v."""
    p = PROBLEMS[name]()
    fn = _hand_fn(p, HandProximal(p, cx=0.5, ctheta=0.5))
    with pytest.raises(GradCheckError) as excinfo:
        check_implicit_grad(fn, _inputs(p), directions=2, solver_tol=p.solver_tol)
    _assert_caught(excinfo)
    # ... and λ² (another common slip) is caught too.
    fn2 = _hand_fn(p, HandProximal(p, cx=p.lam, ctheta=p.lam))
    assert not check_implicit_grad(fn2, _inputs(p), directions=1, solver_tol=p.solver_tol, raise_exception=False).ok
