"""The "works with" table of docs/works-with.md, cell by cell: what composes with an implicit layer and
what raises a clear error naming the layer (the supported cells' numerics are checked in
test_forward_mode.py, test_vmap_rule.py, test_backward_dtype.py and test_meta_device.py)."""

from __future__ import annotations

import inspect

import pytest
import torch

import bilevel
from bilevel import UnsupportedError
from bilevel.linsolve import CG, GMRES, MINRES, BiCGSTAB, Neumann
from bilevel.solvers import GradientDescent, NewtonCG

DT = torch.float64
X, Y = torch.randn(30, 4, dtype=DT), torch.randn(30, dtype=DT)


def _tanh_layer(linsolve) -> bilevel.Proximal:
    return bilevel.Proximal(lambda p, x, y: ((torch.tanh(x @ p) - y) ** 2).mean(), 0.7,
                            solver=NewtonCG(rtol=1e-12), linsolve=linsolve)


def _layer() -> bilevel.Proximal:
    return _tanh_layer(CG(rtol=1e-12))


@pytest.mark.parametrize("transform", ["jacrev", "jacfwd"])
def test_vmapped_products_with_a_tolerance_raise_a_clear_error_naming_the_layer(transform: str) -> None:
    # GMRES to a tolerance: its data-dependent stopping tests cannot run under vmap
    # (CG, MINRES and Neumann can: see the next test).
    layer = _tanh_layer(GMRES(rtol=1e-12))
    fn = getattr(torch.func, transform)
    with pytest.raises(bilevel.UnsupportedError, match=r"Proximal: vmapped .*fixed budget.*Python loop of torch\.func"):
        fn(lambda t: layer(t, X, Y))(torch.randn(4, dtype=DT))


@pytest.mark.parametrize(
    "linsolve", [CG(rtol=1e-12), CG(), MINRES(rtol=1e-12), Neumann(alpha=0.2, rtol=1e-12, maxiter=2000)],
    ids=["cg", "cg-default", "minres", "neumann"],
)
@pytest.mark.parametrize("transform", ["jacrev", "jacfwd"])
def test_jacrev_and_jacfwd_work_with_a_tolerance_on_syncless_solvers(transform: str, linsolve) -> None:
    # Under vmap no stopping test can run: the solver runs all maxiter iterations with
    # converged slices masked on the device.
    layer = _tanh_layer(linsolve)
    th = torch.randn(4, dtype=DT, generator=torch.Generator().manual_seed(3))
    jac = getattr(torch.func, transform)(lambda t: layer(t, X, Y))(th)
    dense = _tanh_layer(bilevel.linsolve.Dense())
    ref = torch.autograd.functional.jacobian(lambda t: dense(t, X, Y), th)
    torch.testing.assert_close(jac, ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("transform", ["jacrev", "jacfwd"])
def test_a_vmapped_solve_that_misses_its_tolerance_gives_nan_not_a_silent_error(transform: str) -> None:
    layer = _tanh_layer(CG(rtol=1e-12, maxiter=1))
    th = torch.randn(4, dtype=DT, generator=torch.Generator().manual_seed(3))
    jac = getattr(torch.func, transform)(lambda t: layer(t, X, Y))(th)
    assert torch.isnan(jac).all()


@pytest.mark.parametrize("linsolve", [CG(steps=10), MINRES(steps=10), GMRES(steps=10), BiCGSTAB(steps=10)],
                         ids=["cg", "minres", "gmres", "bicgstab"])
@pytest.mark.parametrize("transform", ["jacrev", "jacfwd"])
def test_jacrev_and_jacfwd_work_with_a_fixed_krylov_budget(transform: str, linsolve) -> None:
    layer = _tanh_layer(linsolve)
    th = torch.randn(4, dtype=DT, generator=torch.Generator().manual_seed(3))
    jac = getattr(torch.func, transform)(lambda t: layer(t, X, Y))(th)
    ref = torch.autograd.functional.jacobian(lambda t: layer(t, X, Y), th)
    torch.testing.assert_close(jac, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["hessian", "grad-of-grad", "jvp-of-grad", "grad-of-jvp"])
def test_second_derivatives_raise_instead_of_being_silently_wrong(kind: str) -> None:
    # Differentiating the implicit derivative again would differentiate CG's iterations:
    # measured 52 % off a finite-difference Hessian before this was refused.
    layer = _tanh_layer(CG(steps=10))
    th = torch.randn(4, dtype=DT)

    def f(t):
        return (layer(t, X, Y) ** 2).sum()

    calls = {
        "hessian": lambda: torch.func.hessian(f)(th),
        "grad-of-grad": lambda: torch.func.grad(lambda t: torch.func.grad(f)(t).sum())(th),
        "jvp-of-grad": lambda: torch.func.jvp(torch.func.grad(f), (th,), (th,)),
        "grad-of-jvp": lambda: torch.func.grad(lambda t: torch.func.jvp(lambda u: layer(u, X, Y), (t,), (t,))[1].sum())(th),
    }
    with pytest.raises(bilevel.UnsupportedError, match="Proximal: second derivatives"):
        calls[kind]()


def test_jacobian_rows_by_a_loop_of_vjps_as_the_error_suggests() -> None:
    layer = _layer()
    th = torch.randn(4, dtype=DT)
    out, vjp = torch.func.vjp(lambda t: layer(t, X, Y), th)
    rows = torch.stack([vjp(e)[0] for e in torch.eye(out.numel(), dtype=DT)])
    torch.testing.assert_close(rows, torch.autograd.functional.jacobian(lambda t: layer(t, X, Y), th))


def test_second_order_autograd_raises_instead_of_being_silently_wrong() -> None:
    # The backward is first-order (once_differentiable): a second derivative raises.
    layer = _layer()
    th = torch.randn(4, dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad((layer(th, X, Y) ** 2).sum(), th, create_graph=True)
    with pytest.raises(RuntimeError, match="not have been used in the graph|once_differentiable"):
        torch.autograd.grad(g.sum(), th)


def _cube_root(x0: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return a.sign() * a.abs() ** (1 / 3)


@pytest.mark.parametrize("kind", ["Proximal", "Argmin", "FixedPoint", "custom_root"])
def test_second_order_autograd_error_names_the_layer(kind: str) -> None:
    a = torch.tensor([0.4, -0.3, 0.2, 0.5], dtype=DT, requires_grad=True)
    x0 = torch.zeros(4, dtype=DT)
    calls = {
        "Proximal": lambda: _layer()(a, X, Y),
        "Argmin": lambda: bilevel.Argmin(lambda x, a: 0.5 * (x**2).sum() - (a * x).sum() + (x**4).sum())(x0, a),
        "FixedPoint": lambda: bilevel.FixedPoint(lambda x, a: 0.5 * torch.tanh(x) + a)(x0, a),
        "custom_root": lambda: bilevel.custom_root(lambda x, a: x**3 - a)(_cube_root)(x0 + 0.5, a),
    }
    (g,) = torch.autograd.grad((calls[kind]() ** 2).sum(), a, create_graph=True)
    (g_plain,) = torch.autograd.grad((calls[kind]() ** 2).sum(), a)
    torch.testing.assert_close(g.detach(), g_plain)  # first-order use of create_graph=True is unchanged
    name = "_cube_root" if kind == "custom_root" else kind
    with pytest.raises(UnsupportedError, match=rf"^{name}: a second derivative .* once_differentiable"):
        torch.autograd.grad(g.sum(), a)


# Two warnings of torch 2.13's own compile stack (a deprecated torch.jit API; dynamo's
# resume function reading .grad of the non-leaf output): not ours, not about the layer.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning")
def test_torch_compile_of_an_outer_step_equals_eager() -> None:
    x, y = X.float(), Y.float()
    layer = bilevel.Proximal(lambda p, a, b: ((a @ p - b) ** 2).mean(), 0.7,
                             solver=GradientDescent(lr=0.1, steps=20), linsolve=CG(steps=5))

    def step(th: torch.Tensor) -> torch.Tensor:
        return (layer(th, x, y) ** 2).sum()

    th = torch.randn(4, requires_grad=True)
    (eager,) = torch.autograd.grad(step(th), th)
    (compiled,) = torch.autograd.grad(torch.compile(step, fullgraph=False)(th), th)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_fullgraph_names_the_layer_and_the_alternative() -> None:
    # A backward to a tolerance is not traceable (fixed budgets are: tests/core/test_traced.py).
    x, y = X.float(), Y.float()
    layer = bilevel.Proximal(lambda p, a, b: ((a @ p - b) ** 2).mean(), 0.7,
                             solver=GradientDescent(lr=0.1, steps=20), linsolve=CG(rtol=1e-5))
    th = torch.zeros(4, requires_grad=True)
    torch._dynamo.reset()
    step = torch.compile(lambda t: (layer(t, x, y) ** 2).sum(), fullgraph=True, backend="eager")
    # torch >= 2.8 shows our reason; older versions only their own "disable" message.
    reason = "bilevel implicit layer runs eagerly" if "reason" in str(inspect.signature(torch.compiler.disable)) else "disable"
    with pytest.raises(Exception, match=reason) as info:
        step(th)
    if reason != "disable":
        assert "fullgraph=False" in str(info.value)
