"""Issue 9, items 3-5: the backward's linear solves never hide a NaN, never hang on a bad
preconditioner, and never overflow on a representable right-hand side."""

from __future__ import annotations

import pytest
import torch

from bilevel import NonFiniteError, Proximal, Status
from bilevel.linsolve import CG
from bilevel.solvers import GradientDescent
from tests import registry

# Every linear solver at its defaults (Neumann with a step for the test operators, whose
# eigenvalues reach 5), and fixed budgets.
ALL = registry.solvers("linear", tags={"default"}, exclude={"contraction"}) + registry.solvers(
    ids=["Neumann-alpha0.3", "CG-steps4", "MINRES-steps4"]
)


# -- item 3: a NaN/Inf cotangent -----------------------------------------------------------
@pytest.mark.parametrize("on_failure", ["warn", "raise", "ignore"])
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_cotangent_raises_whatever_on_failure_says(on_failure: str, batched: bool, bad: float) -> None:
    def loss(phi, x):
        return ((phi - x) ** 2).sum()

    theta = torch.zeros(3, requires_grad=True)
    x = torch.ones(2, 3) if batched else torch.ones(3)
    layer = Proximal(loss, 1.0, solver=GradientDescent(lr=0.1, steps=3), linsolve=CG(steps=3), on_failure=on_failure)
    phi = layer(theta, x, batched=batched)
    v = torch.ones_like(phi)
    v.reshape(-1)[-1] = bad  # the last task's cotangent
    with pytest.raises(NonFiniteError, match=r"Proximal.*NaN or Inf" + (r".*task\(s\) \[1\]" if batched else "")):
        phi.backward(v)
    assert theta.grad is None  # nothing was accumulated: no silent zero gradient


@pytest.mark.parametrize("solver", ALL)
def test_solver_reports_nonfinite_rhs_per_task_and_solves_the_others(solver) -> None:
    b = torch.tensor([[1.0, 2.0, 3.0], [1.0, float("nan"), 0.0]], dtype=torch.float64)
    res = solver(lambda v: 2.0 * v, b, batched=True)
    assert res.task_status[1] is Status.NONFINITE and res.status is Status.NONFINITE
    assert res.task_status[0].ok
    torch.testing.assert_close(res.x[0], b[0] / 2)


# -- item 4: a preconditioner of the wrong shape ------------------------------------------
def test_preconditioner_of_the_wrong_shape_is_refused_at_once() -> None:
    def bad_precond(r):
        return r.unsqueeze(0)  # (1, n): broadcasting would grow the iterate a dimension per step

    with pytest.raises(ValueError, match=r"preconditioner .*bad_precond.* shape \(1, 4\)"):
        CG(preconditioner=bad_precond)(lambda v: 3.0 * v, torch.ones(4))


@pytest.mark.parametrize(
    "precond, err, match",
    [
        (lambda r: r.double(), ValueError, "dtype"),
        (lambda r: {"a": r}, ValueError, "structure"),
        (lambda r: r * float("nan"), NonFiniteError, "NaN or Inf"),
        (lambda r: "not a tensor", TypeError, "tensor tree"),
    ],
)
def test_preconditioner_output_is_validated(precond, err, match: str) -> None:
    with pytest.raises(err, match=match):
        CG(preconditioner=precond)(lambda v: 3.0 * v, torch.ones(4, dtype=torch.float32))


def test_a_good_preconditioner_still_works() -> None:
    d = torch.arange(1.0, 6.0, dtype=torch.float64)
    res = CG(preconditioner=lambda r: r / d)(lambda v: d * v, torch.ones(5, dtype=torch.float64))
    assert res.status is Status.SUCCESS and res.iterations == 1
    torch.testing.assert_close(res.x, 1 / d)


# -- item 5: huge and tiny right-hand sides in float32 --------------------------------------
@pytest.mark.parametrize("solver", ALL)
@pytest.mark.parametrize("magnitude", [1e25, 1e-30])
def test_float32_extreme_rhs_is_solved(solver, magnitude: float) -> None:
    # ||b||² overflows (1e50) or underflows (1e-60) float32, though b and x are representable.
    d = torch.tensor([1.0, 2.0, 4.0, 5.0])
    b = magnitude * torch.tensor([1.0, -1.0, 2.0, 0.5])
    res = solver(lambda v: d * v, b)
    assert res.success, res.summary()
    torch.testing.assert_close(res.x, b / d, rtol=1e-4, atol=0.0)
    assert torch.isfinite(res.residual_norm)


def test_scaling_is_exact_for_a_well_scaled_rhs() -> None:
    # A solve that starts at the exact answer returns it bit for bit (power-of-two scaling).
    d = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    b = torch.tensor([0.3, -0.7, 1.9], dtype=torch.float64)
    x0 = b / d
    assert torch.equal(CG()(lambda v: d * v, b, x0).x, x0)
