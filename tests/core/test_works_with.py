"""The README's "works with" table, cell by cell: what composes with an implicit layer and
what raises a clear error naming the layer (the supported cells' numerics are checked in
test_forward_mode.py, test_vmap_rule.py, test_backward_dtype.py and test_meta_device.py)."""

from __future__ import annotations

import pytest
import torch

import bilevel
from bilevel.linsolve import CG, MINRES
from bilevel.solvers import GradientDescent, NewtonCG

DT = torch.float64
X, Y = torch.randn(30, 4, dtype=DT), torch.randn(30, dtype=DT)


def _layer() -> bilevel.Proximal:
    return bilevel.Proximal(lambda p, x, y: ((torch.tanh(x @ p) - y) ** 2).mean(), 0.7,
                            solver=NewtonCG(rtol=1e-12), linsolve=CG(rtol=1e-12))


@pytest.mark.parametrize("transform", ["jacrev", "jacfwd"])
def test_vmapped_products_with_a_tolerance_raise_a_clear_error_naming_the_layer(transform: str) -> None:
    layer = _layer()  # CG to a tolerance: data-dependent stopping tests cannot run under vmap
    fn = getattr(torch.func, transform)
    with pytest.raises(bilevel.UnsupportedError, match=r"Proximal: vmapped .*fixed budget.*Python loop of torch\.func"):
        fn(lambda t: layer(t, X, Y))(torch.randn(4, dtype=DT))


@pytest.mark.parametrize("linsolve", [CG(steps=10), MINRES(steps=10)], ids=["cg", "minres"])
@pytest.mark.parametrize("transform", ["jacrev", "jacfwd"])
def test_jacrev_and_jacfwd_work_with_a_fixed_krylov_budget(transform: str, linsolve) -> None:
    layer = bilevel.Proximal(lambda p, x, y: ((torch.tanh(x @ p) - y) ** 2).mean(), 0.7,
                             solver=NewtonCG(rtol=1e-12), linsolve=linsolve)
    th = torch.randn(4, dtype=DT, generator=torch.Generator().manual_seed(3))
    jac = getattr(torch.func, transform)(lambda t: layer(t, X, Y))(th)
    ref = torch.autograd.functional.jacobian(lambda t: layer(t, X, Y), th)
    torch.testing.assert_close(jac, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["hessian", "grad-of-grad", "jvp-of-grad", "grad-of-jvp"])
def test_second_derivatives_raise_instead_of_being_silently_wrong(kind: str) -> None:
    # Differentiating the implicit derivative again would differentiate CG's iterations:
    # measured 52 % off a finite-difference Hessian before this was refused.
    layer = bilevel.Proximal(lambda p, x, y: ((torch.tanh(x @ p) - y) ** 2).mean(), 0.7,
                             solver=NewtonCG(rtol=1e-12), linsolve=CG(steps=10))
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
    # The backward is first-order (once_differentiable): a second derivative raises
    # (torch's own message, not one naming the layer -- see the README).
    layer = _layer()
    th = torch.randn(4, dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad((layer(th, X, Y) ** 2).sum(), th, create_graph=True)
    with pytest.raises(RuntimeError, match="not have been used in the graph|once_differentiable"):
        torch.autograd.grad(g.sum(), th)


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
