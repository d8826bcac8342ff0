"""check_implicit_grad itself: passes correct gradients, fails wrong ones, reports readably.

The planted-bug tests (test_testing_planted_bugs.py) exercise it on implicit layers; here
it is also tested on plain differentiable functions (where torch.autograd.gradcheck is
the ground truth), on trees, non-scalar outputs, unrolled references, float32, and its
documented tolerance formula.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from bilevel._tree import tree_flatten
from bilevel.testing import (
    GradCheckError,
    GradCheckReport,
    check_implicit_grad,
    default_tolerances,
    make_logistic,
    make_mlp,
    make_quadratic,
    make_ridge,
)

DT = torch.float64



class _Scaled(torch.autograd.Function):
    """Identity forward, backward scaled by ``s`` (a planted relative error of ``s − 1``)."""

    @staticmethod
    def forward(x: torch.Tensor, s: float) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.s = inputs[1]

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return g * ctx.s, None


def _smooth(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (torch.sin(x) * y).sum() + (x**2).sum() * torch.exp(-y.sum())


def test_plain_function_passes_like_gradcheck() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, generator=g, dtype=DT, requires_grad=True)
    y = torch.randn(5, generator=g, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(_smooth, (x, y))
    report = check_implicit_grad(_smooth, (x, y), solver_tol=0.0)
    assert isinstance(report, GradCheckReport) and report.ok
    assert len(report.entries) == 2 * 3  # two inputs x three directions
    # With no solver in the loop the central differences are accurate to ~eps^(2/3).
    assert report.max_rel_error < 1e-7


@pytest.mark.parametrize("scale", [1.001, 0.999, 0.0, -1.0])
def test_small_planted_errors_are_caught_in_float64(scale: float) -> None:
    """A 0.1% error of the gradient is caught (float64, exact function), as is zero or sign."""
    x = torch.linspace(-1, 1, 4, dtype=DT).requires_grad_(True)

    def f(x: torch.Tensor) -> torch.Tensor:
        return (torch.sin(_Scaled.apply(x, scale)) * torch.arange(1.0, 5.0, dtype=DT)).sum()

    with pytest.raises(GradCheckError) as excinfo:
        check_implicit_grad(f, (x,), solver_tol=0.0)
    assert isinstance(excinfo.value, AssertionError)
    assert not excinfo.value.report.ok


def test_tree_inputs_non_scalar_outputs_and_static_arguments() -> None:
    g = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(3, 2, generator=g, dtype=DT, requires_grad=True), "b": torch.randn(2, generator=g, dtype=DT)}
    pair = (torch.randn(3, generator=g, dtype=DT, requires_grad=True), torch.randn((), generator=g, dtype=DT, requires_grad=True))

    def f(params: dict, pair: tuple, power: int) -> dict:
        h = torch.tanh(pair[0] @ params["w"] + params["b"]) * pair[1]
        return {"h": h**power, "s": (h.sum(), h.prod())}

    report = check_implicit_grad(f, (params, pair, 2), directions=2, solver_tol=0.0)
    assert report.ok
    # params['b'] does not require grad: only params['w'] is checked in inputs[0].
    assert {e.input for e in report.entries} == {"inputs[0]", "inputs[1]"}
    assert set(report.eps) == {"inputs[0]", "inputs[1]"}


def test_unused_leaf_gets_a_note_and_fails() -> None:
    a = torch.ones(3, dtype=DT, requires_grad=True)
    b = torch.ones(2, dtype=DT, requires_grad=True)

    def f(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a**2).sum() + b.detach().sum() + (b.sum() * 0).detach()  # b's gradient is lost

    report = check_implicit_grad(f, (a, b), solver_tol=0.0, raise_exception=False)
    assert not report.ok
    assert all(e.ok for e in report.entries if e.input == "inputs[0]")
    assert all(not e.ok for e in report.entries if e.input == "inputs[1]")
    assert any("inputs[1]" in n and "no gradient" in n for n in report.notes)


def test_report_table_is_readable() -> None:
    p = make_ridge(3, DT, "tensor", 0)
    report = check_implicit_grad(p.proximal_meta_loss(), (p.theta_leaf(),), directions=2, solver_tol=p.solver_tol)
    text = str(report)
    lines = text.splitlines()
    assert lines[0].startswith("check_implicit_grad: OK (2 checks)")
    header = lines[1].split()
    for col in ("input", "dir", "analytic", "abs", "rel", "tol", "result"):
        assert col in header
    assert len([ln for ln in lines if ln.startswith("inputs[0]")]) == 2
    assert "tol = atol + rtol*|reference|" in text and "eps: inputs[0]=" in text
    for e in report.entries:
        assert e.abs_error == pytest.approx(abs(e.analytic - e.reference))
        assert e.tolerance == pytest.approx(report.atol[e.input] + report.rtol * abs(e.reference))


def test_gradient_with_respect_to_lambda_too() -> None:
    p = make_logistic(4, DT, "dict", 5)
    lam = torch.tensor(p.lam, dtype=DT, requires_grad=True)
    report = check_implicit_grad(p.proximal_meta_loss(), (p.theta_leaf(), lam), directions=2, solver_tol=p.solver_tol)
    assert report.ok and {e.input for e in report.entries} == {"inputs[0]", "inputs[1]"}


def test_unrolled_reference_passes_when_converged_and_fails_when_not() -> None:
    p = make_ridge(4, DT, "tuple", 2)
    lam = torch.tensor(p.lam, dtype=DT, requires_grad=True)
    report = check_implicit_grad(
        p.proximal_meta_loss(),
        (p.theta_leaf(), lam),
        directions=1,
        solver_tol=p.solver_tol,
        unrolled=p.unrolled_proximal_meta_loss(steps=300),
    )
    kinds = [e.kind for e in report.entries]
    assert kinds.count("unrolled") == 2 and kinds.count("unrolled value") == 1 and report.ok
    # Too few unrolled steps: the unrolled gradient is a different (truncated) function.
    report = check_implicit_grad(
        p.argmin_meta_loss(),
        (p.theta_leaf(),),
        directions=2,
        solver_tol=p.solver_tol,
        unrolled=p.unrolled_argmin_meta_loss(steps=5),
        raise_exception=False,
    )
    assert not report.ok
    assert all(e.ok for e in report.entries if e.kind == "central difference")
    assert any(not e.ok for e in report.entries if e.kind.startswith("unrolled"))


@pytest.mark.parametrize("maker", ["quadratic", "mlp"])
def test_float32_layers_pass_with_dtype_tolerances(maker: str) -> None:
    p = make_quadratic(4, 10.0, torch.float32, "dict", 1) if maker == "quadratic" else make_mlp(1, 2, torch.float32, "tuple", 2)
    report = check_implicit_grad(p.proximal_meta_loss(), (p.theta_leaf(),), directions=2, solver_tol=p.solver_tol)
    assert report.ok and report.dtype == torch.float32 and report.fd_dtype == torch.float32


def test_upcast_evaluates_finite_differences_in_float64() -> None:
    """With dtype-generic fn (the data cast to the input's dtype), upcast=True tightens the
    reference: the finite differences run in float64 while autograd stays in float32."""
    p = make_logistic(4, torch.float64, "tensor", 9)

    def fn(theta: torch.Tensor) -> torch.Tensor:
        data = tuple(d.to(theta.dtype) for d in p.data)
        layer = p.proximal_layer() if theta.dtype == DT else p.proximal_layer(
            solver=type(p.solver)(rtol=3e-4, maxiter=100), linsolve=type(p.linsolve)()
        )
        return p.inner(layer(theta, *data), *data)

    theta32 = p.theta.float().requires_grad_(True)
    report = check_implicit_grad(fn, (theta32,), upcast=True)
    assert report.ok and report.fd_dtype == DT and report.dtype == torch.float32


def test_default_tolerance_formula() -> None:
    """The documented formula: eps = (u + tau)^(1/3) s, atol = C F ((u + tau)/(eps/s) + (eps/s)^2),
    rtol = C (tau + sqrt(u_in))."""
    u = torch.finfo(DT).eps
    tau = 1e-10
    h, rtol, atol = default_tolerances(DT, solver_tol=tau, scale=2.0, value_scale=3.0)
    hr = (u + tau) ** (1 / 3)
    assert h == pytest.approx(2.0 * hr)
    assert atol == pytest.approx(10 * 3.0 * ((u + tau) / hr + hr**2))
    assert rtol == pytest.approx(10 * (tau + math.sqrt(u)))
    # Defaults follow the dtype: float32 is looser than float64 by orders of magnitude.
    h32, r32, a32 = default_tolerances(torch.float32)
    h64, r64, a64 = default_tolerances(DT)
    assert h32 > 10 * h64 and r32 > 10 * r64 and a32 > 100 * a64
    # A looser declared solver tolerance widens the tolerances.
    assert default_tolerances(DT, solver_tol=1e-6)[2] > default_tolerances(DT, solver_tol=1e-10)[2]


def test_explicit_tolerances_and_eps_override() -> None:
    x = torch.tensor([0.3, -0.2], dtype=DT, requires_grad=True)
    report = check_implicit_grad(lambda x: torch.exp(x).sum(), (x,), eps=1e-3, rtol=0.0, atol=1e-5)
    assert report.ok and report.eps == {"inputs[0]": 1e-3} and report.atol == {"inputs[0]": 1e-5}
    assert report.rtol == 0.0
    # Forward-difference-size steps with a tiny tolerance fail: the tolerance is honoured.
    report = check_implicit_grad(lambda x: torch.exp(x).sum(), (x,), eps=1e-1, rtol=0.0, atol=1e-8, raise_exception=False)
    assert not report.ok


def test_reproducible_with_seed() -> None:
    x = torch.tensor([0.3, -0.2, 0.5], dtype=DT, requires_grad=True)
    f = lambda x: torch.sin(x).prod()  # noqa: E731
    r1 = check_implicit_grad(f, (x,), seed=3)
    r2 = check_implicit_grad(f, (x,), seed=3)
    r3 = check_implicit_grad(f, (x,), seed=4)
    assert [e.analytic for e in r1.entries] == [e.analytic for e in r2.entries]
    assert [e.analytic for e in r1.entries] != [e.analytic for e in r3.entries]


def test_single_tensor_input_is_wrapped() -> None:
    x = torch.tensor([0.3, -0.2], dtype=DT, requires_grad=True)
    assert check_implicit_grad(lambda x: (x**3).sum(), x).ok


def test_invalid_calls_are_refused() -> None:
    x = torch.ones(2, dtype=DT)
    with pytest.raises(ValueError, match="no input requires grad"):
        check_implicit_grad(lambda x: x.sum(), (x,))
    y = x.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="directions"):
        check_implicit_grad(lambda x: x.sum(), (y,), directions=0)
    with pytest.raises(ValueError, match="solver_tol"):
        check_implicit_grad(lambda x: x.sum(), (y,), solver_tol=-1.0)
    with pytest.raises(ValueError, match="eps"):
        check_implicit_grad(lambda x: x.sum(), (y,), eps=0.0)
    with pytest.raises(TypeError, match="tensor"):
        check_implicit_grad(lambda x: 1.0, (y,))


def test_directions_are_unit_vectors_over_the_checked_leaves() -> None:
    """For f = <c, x> the directional derivative is <c, d>; |<c, d>| <= ||c|| (unit d)."""
    c = {"a": torch.tensor([3.0, 4.0], dtype=DT), "b": torch.tensor(12.0, dtype=DT)}
    x = {"a": torch.zeros(2, dtype=DT, requires_grad=True), "b": torch.zeros((), dtype=DT, requires_grad=True)}

    def f(x: dict) -> torch.Tensor:
        return (c["a"] * x["a"]).sum() + c["b"] * x["b"]

    report = check_implicit_grad(f, (x,), directions=10, solver_tol=0.0)
    assert report.ok
    assert all(abs(e.analytic) <= 13.0 + 1e-12 for e in report.entries)
    assert sum(t.numel() for t in tree_flatten(x)[0]) == 3
