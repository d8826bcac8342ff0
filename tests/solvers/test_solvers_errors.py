"""Bad input: non-finite values raise, failed line searches are reported, bad arguments rejected."""

from __future__ import annotations

import pytest
import torch

from bilevel import NonFiniteError, Status
from bilevel.linsolve import CG, GMRES
from bilevel.solvers import (
    LBFGS,
    Adam,
    BacktrackingArmijo,
    FixedPointIteration,
    GradientDescent,
    NewtonCG,
    ScipyMinimize,
    Solver,
    StrongWolfe,
)
from tests.problems import quadratic, quadratic_problem


def _linear_until_zero(x: torch.Tensor) -> torch.Tensor:
    # f(x) = sum(x) for x > 0; 0 * log(x) is NaN once x <= 0 (0 * log 0 = 0 * -inf = NaN),
    # while the gradient stays exactly 1 for x > 0.
    return x.sum() + (0.0 * torch.log(x)).sum()


@pytest.mark.parametrize(
    "solver",
    [GradientDescent(lr=0.3, steps=10), GradientDescent(lr=0.3, maxiter=10, rtol=1e-8), Adam(lr=0.3, steps=10)],
    ids=["gd", "gd_tol", "adam"],
)
def test_nonfinite_value_raises_naming_iteration(solver) -> None:
    # From x0 = 1 with gradient 1, both take steps of 0.3 (Adam: lr * m_hat / sqrt(v_hat)
    # = 0.3 for a constant gradient): x_k = 1 - 0.3 k, first <= 0 at k = 4.
    x0 = torch.ones(1, dtype=torch.float64)
    with pytest.raises(NonFiniteError, match=rf"{type(solver).__name__}.*iteration 4\b"):
        solver(_linear_until_zero, x0)


def test_nonfinite_value_batched_names_task() -> None:
    x0 = torch.tensor([[5.0], [1.0], [5.0]], dtype=torch.float64)

    def obj(x):
        return x.sum(-1) + (0.0 * torch.log(x)).sum(-1)

    with pytest.raises(NonFiniteError, match=r"iteration 4 for task\(s\) \[1\]"):
        GradientDescent(lr=0.3, steps=10)(obj, x0, batched=True)


@pytest.mark.parametrize(
    "solver", [LBFGS(), NewtonCG(), GradientDescent(lr=0.1, steps=3)], ids=["lbfgs", "newton", "gd"]
)
def test_nonfinite_at_start_raises_iteration_0(solver) -> None:
    x0 = -torch.ones(2, dtype=torch.float64)
    with pytest.raises(NonFiniteError, match=r"iteration 0"):
        solver(lambda x: torch.log(x).sum(), x0)


@pytest.mark.parametrize("solver", [LBFGS(), NewtonCG(), Adam(steps=3)], ids=["lbfgs", "newton", "adam"])
def test_nonfinite_gradient_raises(solver) -> None:
    # sqrt is finite at 0 but its derivative is not.
    x0 = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(NonFiniteError, match=r"gradient.*iteration 0"):
        solver(lambda x: torch.sqrt(x).sum(), x0)


def _jump(x: torch.Tensor) -> torch.Tensor:
    # 0.5 ||x||^2 plus a jump of +10 as soon as the coordinate sum drops below its value at
    # x0 = ones: every descent step from x0 (they all lower the sum) increases f.
    return 0.5 * (x * x).sum() + 10.0 * (x.sum() < 4.0).to(x.dtype)


@pytest.mark.parametrize("solver", [LBFGS(), NewtonCG()], ids=["lbfgs", "newton"])
def test_line_search_failure_is_reported_not_raised(solver) -> None:
    x0 = torch.ones(4, dtype=torch.float64)
    res = solver(_jump, x0)
    assert res.status is Status.LINESEARCH_FAILED
    assert not res.success
    assert torch.equal(res.x, x0) and res.iterations == 0
    assert float(res.value) == 2.0
    assert res.n_fun > 1


def test_lbfgs_line_search_failure_on_unbounded_linear_function() -> None:
    # f = sum(x) on x > 0, NaN beyond: no point satisfies the strong Wolfe curvature test.
    res = LBFGS()(_linear_until_zero, torch.ones(3, dtype=torch.float64))
    assert res.status is Status.LINESEARCH_FAILED
    assert torch.isfinite(res.x).all()


def test_newton_cg_nan_along_direction_is_reported() -> None:
    x0 = torch.ones(2, dtype=torch.float64)

    def fn(x):  # finite only at x0
        return torch.where((x - x0).abs().sum() > 0, torch.nan, 0.5 * (x * x).sum())

    res = NewtonCG()(fn, x0)
    assert res.status is Status.LINESEARCH_FAILED and torch.equal(res.x, x0)


def test_max_iterations_status() -> None:
    h, b, _ = quadratic_problem(cond=1e3)
    x0 = torch.zeros(10, dtype=torch.float64)
    for solver in (LBFGS(maxiter=3), NewtonCG(maxiter=1, linsolve=CG(maxiter=1)), GradientDescent(lr=1e-3, maxiter=3, rtol=1e-8)):
        res = solver(quadratic, x0, h, b)
        assert res.status is Status.MAX_ITERATIONS and not res.success
        assert res.iterations == getattr(solver, "maxiter", getattr(solver, "steps", None))


@pytest.mark.parametrize("solver", [LBFGS(), ScipyMinimize()], ids=["lbfgs", "scipy"])
def test_batched_unsupported(solver) -> None:
    with pytest.raises(NotImplementedError, match=type(solver).__name__):
        solver(lambda x: (x * x).sum(-1), torch.zeros(2, 3), batched=True)


def test_objective_shape_checked() -> None:
    with pytest.raises(ValueError, match="scalar"):
        NewtonCG()(lambda x: x * x, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        GradientDescent(lr=0.1, steps=1)(lambda x: (x * x).sum(), torch.zeros(2, 3), batched=True)


def test_non_tree_input_rejected() -> None:
    with pytest.raises(TypeError):
        GradientDescent(lr=0.1, steps=1)(lambda x: x, [1.0, 2.0])


@pytest.mark.parametrize(
    "make",
    [
        lambda: GradientDescent(lr=0.0, steps=10),
        lambda: GradientDescent(lr=-1.0, steps=10),
        lambda: GradientDescent(lr=float("inf"), steps=10),
        lambda: GradientDescent(lr=0.1, steps=-1),
        lambda: GradientDescent(lr=0.1, steps=1.5),
        lambda: GradientDescent(lr=0.1, steps=10, momentum=1.0),
        lambda: GradientDescent(lr=0.1, steps=10, momentum=-0.1),
        lambda: GradientDescent(lr=0.1, steps=10, nesterov=True),
        lambda: GradientDescent(lr=0.1, maxiter=10, rtol=0.0),
        lambda: GradientDescent(lr=0.1, maxiter=10, rtol=2.0),
        lambda: GradientDescent(lr="0.1", steps=10),
        lambda: Adam(lr=0.0),
        lambda: Adam(betas=(0.9,)),
        lambda: Adam(betas=(1.0, 0.999)),
        lambda: Adam(betas=(0.9, -0.1)),
        lambda: Adam(eps=0.0),
        lambda: Adam(steps=True),
        lambda: LBFGS(rtol=-1e-6),
        lambda: LBFGS(maxiter=-1),
        lambda: LBFGS(history=0),
        lambda: LBFGS(line_search=BacktrackingArmijo()),
        lambda: NewtonCG(linsolve=CG(maxiter=0)),
        lambda: NewtonCG(linsolve=CG(rtol=1.5)),
        lambda: NewtonCG(linsolve=GMRES()),
        lambda: NewtonCG(atol=-1.0),
        lambda: GradientDescent(lr=0.1, steps=10, maxiter=10),
        lambda: GradientDescent(lr=0.1),
        lambda: GradientDescent(lr=0.1, rtol=1e-3, steps=5, maxiter=5),
        lambda: LBFGS(atol=-1.0),
        lambda: FixedPointIteration(atol=-1.0),
        lambda: NewtonCG(maxiter=None),
        lambda: NewtonCG(line_search=StrongWolfe()),
        lambda: FixedPointIteration(relaxation=0.0),
        lambda: FixedPointIteration(relaxation=1.5),
        lambda: FixedPointIteration(maxiter=-2),
        lambda: FixedPointIteration(rtol=1.0),
        lambda: ScipyMinimize("not-a-method"),
        lambda: ScipyMinimize(tol=-1.0),
        lambda: ScipyMinimize(options=[("maxiter", 3)]),
    ],
)
def test_bad_constructor_arguments(make) -> None:
    with pytest.raises(ValueError):
        make()


def test_solvers_are_immutable_and_hashable() -> None:
    s = ScipyMinimize("l-bfgs-b", options={"maxiter": 5})
    with pytest.raises(AttributeError):
        s.method = "BFGS"  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.options["maxiter"] = 6  # type: ignore[index]
    for solver in (s, GradientDescent(lr=0.1, steps=3), Adam(), LBFGS(), NewtonCG(), FixedPointIteration()):
        assert isinstance(solver, Solver)
        hash(solver)
    assert NewtonCG() == NewtonCG()
