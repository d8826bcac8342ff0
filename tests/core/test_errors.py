"""Bad input gets a clear error (or warning), never a wrong number."""

from __future__ import annotations

import math

import pytest
import torch

import bilevel
from bilevel import (
    Argmin,
    ClosedOverTensorWarning,
    ConvergenceError,
    ConvergenceWarning,
    NonFiniteError,
    Proximal,
    custom_root,
)
from bilevel.linsolve import CG
from tests.core.core_helpers import DenseNewton, PlainGD

DT = torch.float64


def quad(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((x - a) ** 2).sum()


@pytest.mark.parametrize("lam", [0.0, -1.0, math.inf, math.nan])
def test_bad_float_lam_rejected_at_construction(lam: float) -> None:
    with pytest.raises(ValueError, match="lam must be finite and > 0"):
        Proximal(quad, lam)


@pytest.mark.parametrize(
    "lam",
    [torch.tensor(0.0, dtype=DT), torch.tensor([1.0, -0.5, 2.0], dtype=DT), torch.tensor([1.0, math.nan, 2.0], dtype=DT)],
)
def test_bad_tensor_lam_rejected_at_call(lam: torch.Tensor) -> None:
    layer = Proximal(quad, solver=DenseNewton())
    with pytest.raises(ValueError, match="lam must be finite and > 0"):
        layer(torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT), lam=lam)


def test_lam_tree_must_match_theta() -> None:
    layer = Proximal(lambda p: (p["w"] ** 2).sum() + (p["b"] ** 2).sum(), solver=DenseNewton())
    theta = {"w": torch.zeros(2, dtype=DT), "b": torch.zeros((), dtype=DT)}
    with pytest.raises(ValueError, match="structure"):
        layer(theta, lam={"w": torch.tensor(1.0, dtype=DT)})
    with pytest.raises(ValueError, match="shape"):
        layer(theta, lam={"w": torch.ones(3, dtype=DT), "b": torch.tensor(1.0, dtype=DT)})


def test_objective_must_be_scalar() -> None:
    layer = Argmin(lambda x, a: (x - a) ** 2, solver=DenseNewton())
    with pytest.raises(ValueError, match="scalar"):
        layer(torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT))


def test_residual_structure_must_match_x() -> None:
    @custom_root(lambda x, a: (x - a).sum(), symmetric=True)
    def solve(x0: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return a.clone()

    a = torch.ones(3, dtype=DT, requires_grad=True)
    x = solve(torch.zeros(3, dtype=DT), a)
    with pytest.raises(ValueError, match="optimality residual must have the structure of x"):
        x.sum().backward()


@pytest.mark.parametrize("bad", ["none", "x_none"])
def test_solver_result_without_solution(bad: str) -> None:
    def solver(obj, x0, *args, batched=False):  # type: ignore[no-untyped-def]
        if bad == "none":
            return None
        return bilevel.SolverResult(x=None, status=bilevel.Status.SUCCESS, iterations=1)

    layer = Argmin(quad, solver=solver)
    with pytest.raises(TypeError, match="solution"):
        layer(torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT, requires_grad=True))


def test_solution_with_wrong_shape() -> None:
    layer = Argmin(quad, solver=lambda obj, x0, *a, batched=False: torch.zeros(4, dtype=DT))
    with pytest.raises(ValueError, match="shape"):
        layer(torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT))


def test_nan_solution_names_the_task() -> None:
    def solver(obj, x0, *args, batched=False):  # type: ignore[no-untyped-def]
        x = x0.clone()
        x[2, 1] = math.nan
        return bilevel.SolverResult(x=x, status=bilevel.Status.SUCCESS, iterations=1)

    layer = Proximal(quad, solver=solver)
    with pytest.raises(NonFiniteError, match=r"task\(s\) \[2\]"):
        layer(torch.zeros(3, dtype=DT), torch.ones(4, 3, dtype=DT), batched=True)


def test_closed_over_tensor_that_requires_grad_warns() -> None:
    hidden = torch.tensor(2.0, dtype=DT, requires_grad=True)
    layer = Argmin(lambda x, a: 0.5 * (hidden * (x - a) ** 2).sum(), solver=DenseNewton())
    a = torch.ones(3, dtype=DT, requires_grad=True)
    x = layer(torch.zeros(3, dtype=DT), a)
    with pytest.warns(ClosedOverTensorWarning, match="receive no gradient"):
        x.sum().backward()
    torch.testing.assert_close(a.grad, torch.ones(3, dtype=DT))  # the argument's gradient is still right
    assert hidden.grad is None


def _hard_problem() -> tuple[Proximal, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    M = torch.randn(30, 30, generator=g, dtype=DT)
    A = M @ M.T

    def loss(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        return 0.5 * x @ A @ x

    return loss, A, torch.randn(30, generator=g, dtype=DT)  # type: ignore[return-value]


def test_backward_non_convergence_warns_by_default() -> None:
    loss, A, theta = _hard_problem()
    layer = Proximal(loss, 0.01, solver=DenseNewton(), linsolve=CG(maxiter=2))
    th = theta.clone().requires_grad_(True)
    phi = layer(th, A)
    with pytest.warns(ConvergenceWarning, match="backward linear solve"):
        phi.sum().backward()
    assert layer.diagnostics.backward.status is bilevel.Status.MAX_ITERATIONS
    assert layer.diagnostics.backward.iterations == 2


def test_backward_non_convergence_can_raise() -> None:
    loss, A, theta = _hard_problem()
    layer = Proximal(loss, 0.01, solver=DenseNewton(), linsolve=CG(maxiter=2), on_failure="raise")
    phi = layer(theta.clone().requires_grad_(True), A)
    with pytest.raises(ConvergenceError, match="MAX_ITERATIONS"):
        phi.sum().backward()


def test_forward_non_convergence_is_reported() -> None:
    loss, A, theta = _hard_problem()
    layer = Proximal(loss, 0.01, solver=DenseNewton(steps=0), linsolve=CG())
    with pytest.warns(ConvergenceWarning, match="inner solve did not converge"):
        layer(theta, A)
    assert layer.diagnostics.forward.status is bilevel.Status.MAX_ITERATIONS


def test_on_failure_value_validated() -> None:
    with pytest.raises(ValueError, match="on_failure"):
        Proximal(quad, on_failure="sometimes")


def test_symmetric_only_linsolve_rejected_for_nonsymmetric_layer() -> None:
    with pytest.raises(ValueError, match="symmetric"):
        bilevel.FixedPoint(lambda x: x, linsolve=CG())


def test_integer_unknowns_rejected() -> None:
    layer = Argmin(quad, solver=DenseNewton())
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=DT))


def test_batched_task_count_mismatch() -> None:
    layer = Argmin(quad, solver=PlainGD(0.1, 3))
    with pytest.raises(ValueError, match="tasks"):
        layer(torch.zeros(2, 3, dtype=DT), torch.ones(4, 3, dtype=DT), batched=True)


def test_double_backward_raises_instead_of_wrong_number() -> None:
    layer = Argmin(quad, solver=DenseNewton())
    a = torch.ones(3, dtype=DT, requires_grad=True)
    x = layer(torch.zeros(3, dtype=DT), a)
    (g,) = torch.autograd.grad((x**3).sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|not have been used in the graph"):
        torch.autograd.grad(g.sum(), a)
