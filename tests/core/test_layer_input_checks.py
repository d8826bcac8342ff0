"""What a careful user gets wrong, found by probing the public API as a new user: each
mistake gets a clear error (or the right number), never a silent wrong result."""

from __future__ import annotations

import warnings

import pytest
import torch

import bilevel
from bilevel import BilevelTypeError, BilevelValueError, ConvergenceWarning, NonFiniteError
from bilevel import linsolve as ls
from bilevel import solvers as sv

DT = torch.float64


def _half_plus(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return 0.5 * x + a  # x* = 2a, dx*/da = 2


# --------------------------------------------------------------------------------------
# solvers given in the wrong place, or as classes or strings
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("linear", [ls.Broyden(), ls.GMRES(), ls.BiCGSTAB(), ls.CG()], ids=lambda s: type(s).__name__)
def test_a_linear_solver_as_the_inner_solver_is_refused(linear: object) -> None:
    """Its call ``(matvec, b)`` fits ``solver(fn, x0)``: unchecked, it solved fn(x) = x0 and
    reported SUCCESS with x* = 0 for x = x/2 + 1."""
    with pytest.raises(BilevelTypeError, match=f"{type(linear).__name__} from bilevel.linsolve is a linear solver"):
        bilevel.FixedPoint(_half_plus, solver=linear)
    with pytest.raises(BilevelTypeError, match="is a linear solver"):
        bilevel.Argmin(lambda x, a: ((x - a) ** 2).sum(), solver=linear)


def test_the_error_names_the_inner_solver_of_the_same_name() -> None:
    with pytest.raises(BilevelTypeError, match=r"use bilevel\.solvers\.Broyden\(\)"):
        bilevel.FixedPoint(_half_plus, solver=ls.Broyden())
    with pytest.raises(BilevelTypeError, match=r"bilevel\.linsolve\.Broyden\(\)"):
        bilevel.FixedPoint(_half_plus, linsolve=sv.Broyden())


@pytest.mark.parametrize("inner", [sv.Anderson(), sv.FixedPointIteration(), sv.NewtonCG()], ids=lambda s: type(s).__name__)
def test_an_inner_solver_as_the_linear_solver_is_refused(inner: object) -> None:
    with pytest.raises(BilevelTypeError, match="is an inner solver"):
        bilevel.FixedPoint(_half_plus, linsolve=inner)


@pytest.mark.parametrize(("kw", "match"), [
    ({"solver": sv.Anderson}, r"solver must be a solver instance, e\.g\. Anderson\(\), got the class"),
    ({"linsolve": ls.GMRES}, r"linsolve must be a solver instance, e\.g\. GMRES\(\), got the class"),
    ({"solver": "anderson"}, "got the string 'anderson'"),
    ({"linsolve": "gmres"}, "got the string 'gmres'"),
])
def test_classes_and_strings_are_refused_at_construction(kw: dict, match: str) -> None:
    with pytest.raises(BilevelTypeError, match=match):
        bilevel.FixedPoint(_half_plus, **kw)


def test_a_user_written_solver_callable_is_still_accepted() -> None:
    def solver(fn, x0, *args, batched=False):
        x = x0.clone()
        for _ in range(80):
            x = fn(x, *args)
        return x

    a = torch.tensor([1.0, -2.0], dtype=DT, requires_grad=True)
    x = bilevel.FixedPoint(_half_plus, solver=solver)(torch.zeros(2, dtype=DT), a)
    x.sum().backward()
    torch.testing.assert_close(x.detach(), 2 * a.detach())
    torch.testing.assert_close(a.grad, torch.full((2,), 2.0, dtype=DT))


# --------------------------------------------------------------------------------------
# symmetric roots that are not positive definite
# --------------------------------------------------------------------------------------
def test_a_symmetric_negative_definite_root_gets_the_right_gradient_by_default() -> None:
    """F(x, a) = a − x² (Jacobian −2x): CG stopped at its first step (zero gradient, a
    warning); the default for a symmetric root is MINRES."""

    @bilevel.custom_root(lambda x, a: a - x**2, symmetric=True)
    def sqrt(x0: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return a.sqrt()

    a = torch.tensor([4.0, 9.0], dtype=DT, requires_grad=True)
    sqrt(torch.ones(2, dtype=DT), a).sum().backward()
    assert isinstance(sqrt.linsolve, ls.MINRES)
    torch.testing.assert_close(a.grad, 0.5 / a.detach().sqrt())


def test_cg_on_a_non_positive_definite_root_warns_with_what_to_use() -> None:
    @bilevel.custom_root(lambda x, a: a - x**2, symmetric=True, linsolve=ls.CG())
    def sqrt(x0: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return a.sqrt()

    a = torch.tensor([4.0, 9.0], dtype=DT, requires_grad=True)
    with pytest.warns(ConvergenceWarning, match=r"NEGATIVE_CURVATURE.*use linsolve=MINRES\(\)"):
        sqrt(torch.ones(2, dtype=DT), a).sum().backward()


def test_argmin_and_proximal_keep_cg() -> None:
    assert isinstance(bilevel.Argmin(lambda x: (x**2).sum()).linsolve, ls.CG)
    assert isinstance(bilevel.Proximal(lambda p: (p**2).sum(), 1.0).linsolve, ls.CG)


# --------------------------------------------------------------------------------------
# NaN/Inf in the backward: where it came from
# --------------------------------------------------------------------------------------
def test_a_diverging_backward_solve_is_blamed_on_the_system_not_the_cotangent() -> None:
    """A feature that the data never uses: the Hessian has a zero direction and the
    cotangent a component along it, so CG's iterates overflow."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(20, 3, generator=g, dtype=DT), torch.randn(20, generator=g, dtype=DT)
    X[:, 2] = 0
    w = torch.tensor(1.0, dtype=DT, requires_grad=True)
    x = bilevel.Argmin(lambda x, w: 0.5 * ((X @ x - w * y) ** 2).mean())(torch.zeros(3, dtype=DT), w)
    with pytest.raises(NonFiniteError, match="grew without bound.*singular or indefinite system") as err:
        x.sum().backward()
    assert "cotangent holds" not in str(err.value)


def test_a_nan_cotangent_is_named() -> None:
    a = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    x = bilevel.FixedPoint(_half_plus)(torch.zeros(2, dtype=DT), a)
    with pytest.raises(NonFiniteError, match="the cotangent holds a NaN or Inf"):
        (x * torch.tensor([float("nan"), 1.0], dtype=DT)).sum().backward()


# --------------------------------------------------------------------------------------
# precision: nothing lowered, and a closed-over half-precision tensor explained
# --------------------------------------------------------------------------------------
def test_a_float64_leaf_beside_a_bfloat16_one_keeps_float64() -> None:
    """``solve_dtype``/``backward_dtype='auto'`` lift half precision to float32 and lower
    nothing (they once cast every input to float32)."""
    a = torch.tensor([1 / 3], dtype=DT, requires_grad=True)
    b = torch.tensor([0.5, 0.25], dtype=torch.bfloat16, requires_grad=True)
    x0 = {"u": torch.zeros(2, dtype=torch.bfloat16), "v": torch.zeros(1, dtype=DT)}
    layer = bilevel.FixedPoint(lambda z, a, b: {"u": 0.5 * z["u"] + b, "v": 0.5 * z["v"] + a},
                               solver=sv.FixedPointIteration(rtol=1e-15, maxiter=500))
    x = layer(x0, a, b)
    assert layer.diagnostics.solve_dtype == torch.float32  # the half leaf lifted; the float64 one left as it is
    assert x["u"].dtype == torch.bfloat16 and x["v"].dtype == DT
    assert float((x["v"] - 2 * a).detach().abs()) < 1e-14  # float32 rounding would leave ~1e-8
    (x["v"].sum() + x["u"].float().sum()).backward()
    torch.testing.assert_close(a.grad, torch.tensor([2.0], dtype=DT), rtol=1e-13, atol=0)
    assert b.grad is not None and b.grad.dtype == torch.bfloat16


def test_bfloat16_data_with_float32_unknowns_is_solved_in_float32() -> None:
    data = torch.randn(12, 3).to(torch.bfloat16)
    layer = bilevel.Argmin(lambda x, d: ((d @ x - 1) ** 2).mean() + 0.1 * (x**2).sum())
    x = layer(torch.zeros(3), data)
    assert x.dtype == torch.float32 and layer.diagnostics.solve_dtype == torch.float32


def test_a_closed_over_half_precision_tensor_is_explained() -> None:
    W = (0.3 * torch.randn(3, 3)).to(torch.bfloat16)
    b = torch.randn(3, dtype=torch.bfloat16, requires_grad=True)
    layer = bilevel.FixedPoint(lambda z, b: torch.tanh(W @ z + b))
    with pytest.raises(BilevelTypeError, match="inner solve ran in float32.*closes over.*Pass it as an argument"):
        layer(torch.zeros(3, dtype=torch.bfloat16), b)
    # Passed as an argument, it is lifted with the rest.
    x = bilevel.FixedPoint(lambda z, W, b: torch.tanh(W @ z + b))(torch.zeros(3, dtype=torch.bfloat16), W, b)
    x.float().sum().backward()
    assert b.grad is not None and torch.isfinite(b.grad.float()).all()


# --------------------------------------------------------------------------------------
# FixedPoint's batched calls, and the initial point
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["loop", "auto", "bogus", 2])
def test_fixed_point_batched_must_be_a_bool(bad: object) -> None:
    with pytest.raises(BilevelTypeError, match="batched must be True or False"):
        bilevel.FixedPoint(_half_plus)(torch.zeros(2, 2), torch.ones(2, 2), batched=bad)  # type: ignore[arg-type]


def test_fixed_point_batched_accepts_bool_like_values() -> None:
    import numpy as np

    want = bilevel.FixedPoint(_half_plus)(torch.zeros(2, 2), torch.ones(2, 2), batched=True)
    for flag in (1, np.bool_(True)):
        torch.testing.assert_close(bilevel.FixedPoint(_half_plus)(torch.zeros(2, 2), torch.ones(2, 2), batched=flag), want)


def test_fixed_point_task_count_mismatch_is_named() -> None:
    with pytest.raises(BilevelValueError, match="x0 has 4 tasks but the task data has 3"):
        bilevel.FixedPoint(_half_plus)(torch.zeros(4, 3), torch.ones(3, 3), batched=True)


def test_a_solver_that_writes_into_x0_is_refused() -> None:
    def solver(fn, x0, *args, batched=False):
        for _ in range(60):
            x0.copy_(fn(x0, *args))
        return x0

    z0 = torch.zeros(2)
    with pytest.raises(BilevelValueError, match="modified the initial point x0 in place"):
        bilevel.FixedPoint(_half_plus, solver=solver)(z0, torch.ones(2))


def test_library_solvers_leave_x0_alone() -> None:
    for solver in (sv.FixedPointIteration(), sv.Anderson(), sv.Broyden()):
        z0 = torch.zeros(2, dtype=DT)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            bilevel.FixedPoint(_half_plus, solver=solver)(z0, torch.ones(2, dtype=DT))
        assert torch.equal(z0, torch.zeros(2, dtype=DT))


def test_fixed_point_diagnostics_call_its_norm_a_residual() -> None:
    layer = bilevel.FixedPoint(_half_plus)
    layer(torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT, requires_grad=True)).sum().backward()
    assert layer.diagnostics.forward_norm == "residual norm"
    assert "iterations, residual norm" in str(layer.diagnostics).splitlines()[0]
    argmin = bilevel.Argmin(lambda x, a: ((x - a) ** 2).sum())
    argmin(torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT))
    assert "gradient norm" in str(argmin.diagnostics)


def test_a_user_solver_s_status_named_by_a_string_is_understood() -> None:
    class Result:
        def __init__(self, x: torch.Tensor, status: str) -> None:
            self.x, self.status, self.iterations = x, status, 3

    for status, ok in (("SUCCESS", True), ("max_iterations", False)):
        layer = bilevel.FixedPoint(_half_plus, solver=lambda fn, x0, a, s=status: Result(2 * a, s), on_failure="ignore")
        layer(torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT))
        assert layer.diagnostics.forward.status.name == status.upper() and layer.diagnostics.forward.success is ok


def test_half_precision_loop_strategy_evaluates_without_gradients() -> None:
    """The closed-over-tensor check of an evaluation call (no argument requiring grad)
    evaluates F in the backward's precision, task 0 of the loop included."""
    layer = bilevel.Argmin(lambda x, a, b: 0.5 * ((a @ x - b) ** 2).mean() + 0.5 * x @ x)
    a, b = torch.randn(3, 20, 4).to(torch.bfloat16), torch.randn(3, 20).to(torch.bfloat16)
    x = layer(torch.zeros(3, 4, dtype=torch.bfloat16), a, b, batched="loop")
    assert x.shape == (3, 4) and x.dtype == torch.bfloat16


def _grad(f, x, *args):
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        return torch.autograd.grad(f(xg, *args), xg)[0]


def test_proximal_lets_a_solver_update_its_own_copy_of_theta_in_place() -> None:
    def solver(f, x0, *args, batched=False):
        for _ in range(200):
            x0.sub_(0.1 * _grad(f, x0, *args))  # in place, on the layer's copy of θ
        return x0

    theta = torch.ones(3, dtype=DT, requires_grad=True)
    target = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    phi = bilevel.Proximal(lambda p, t: ((p - t) ** 2).sum(), 1.0, solver=solver)(theta, target)
    torch.testing.assert_close(phi.detach(), (2 * target + theta.detach()) / 3)  # argmin (p−t)² + ½(p−θ)²
    torch.testing.assert_close(theta.detach(), torch.ones(3, dtype=DT))


def test_an_unrelated_error_inside_a_lifted_solve_passes_through() -> None:
    def fn(z, b, idx):
        return z * 0.5 + b.index_select(0, idx.float())  # a float index: the user's bug, whose message says "dtype"

    with pytest.raises(RuntimeError, match="dtype") as err:
        bilevel.FixedPoint(fn)(torch.zeros(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16), torch.arange(3))
    assert not isinstance(err.value, BilevelTypeError)
