"""Forward mode through implicit layers (issue 10, first part): ``s = −A⁻¹ B t``.

Checked against central finite differences in float64 and against the reverse-mode
Jacobian (``J t``), with ``torch.autograd.forward_ad`` and ``torch.func.jvp``, for Proximal
(θ, λ and data tangents, one task and a vmapped batch), Argmin, FixedPoint (non-symmetric)
and custom_root.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import bilevel
from bilevel.linsolve import CG, GMRES
from bilevel.solvers import FixedPointIteration, NewtonCG

DT = torch.float64
g = torch.Generator().manual_seed(0)
X, Y = torch.randn(30, 4, generator=g, dtype=DT), torch.randn(30, generator=g, dtype=DT)
XB, YB = torch.randn(3, 12, 4, generator=g, dtype=DT), torch.randn(3, 12, generator=g, dtype=DT)


def _inner(phi, x, y):
    return ((torch.tanh(x @ phi) - y) ** 2).mean()


def _prox() -> bilevel.Proximal:
    return bilevel.Proximal(_inner, 0.7, solver=NewtonCG(rtol=1e-12), linsolve=CG(rtol=1e-12))


def _cases() -> dict[str, tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]]:
    prox = _prox()
    am = bilevel.Argmin(lambda w, a: ((X @ w - Y) ** 2).mean() + 0.5 * (torch.exp(a) * w * w).sum(),
                        solver=NewtonCG(rtol=1e-12), linsolve=CG(rtol=1e-12))
    fp = bilevel.FixedPoint(lambda z, m, c: 0.5 * torch.tanh(m @ z) + c,
                            solver=FixedPointIteration(rtol=1e-13, maxiter=500), linsolve=GMRES(rtol=1e-12))

    @bilevel.custom_root(lambda x, a: x**3 - a, symmetric=True, linsolve=CG(rtol=1e-13))
    def cube_root(x0, a):
        return a.sign() * a.abs() ** (1 / 3)

    m = 0.3 * torch.randn(4, 4, generator=g, dtype=DT)
    return {
        "proximal-theta": (lambda th: prox(th, X, Y), (torch.randn(4, generator=g, dtype=DT),)),
        "proximal-theta-lam-data": (lambda th, lam, x: prox(th, x, Y, lam=lam),
                                    (torch.randn(4, generator=g, dtype=DT), torch.tensor(0.9, dtype=DT), X)),
        "proximal-batched": (lambda th: prox(th, XB, YB, batched=True), (torch.randn(4, generator=g, dtype=DT),)),
        "argmin": (lambda a: am(torch.zeros(4, dtype=DT), a), (torch.randn(4, generator=g, dtype=DT),)),
        "fixed-point": (lambda c: fp(torch.zeros(4, dtype=DT), m, c), (torch.randn(4, generator=g, dtype=DT),)),
        "custom-root": (lambda a: cube_root(torch.ones(3, dtype=DT), a), (torch.tensor([2.0, 5.0, 0.5], dtype=DT),)),
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_jvp_matches_finite_differences_and_the_reverse_jacobian(name: str) -> None:
    f, primals = CASES[name]
    gen = torch.Generator().manual_seed(1)
    tangents = tuple(torch.randn(p.shape, generator=gen, dtype=DT) for p in primals)
    eps = 1e-6
    plus = f(*[p + eps * t for p, t in zip(primals, tangents)])
    minus = f(*[p - eps * t for p, t in zip(primals, tangents)])
    fd = (plus - minus) / (2 * eps)

    _, tj = torch.func.jvp(f, primals, tangents)
    torch.testing.assert_close(tj, fd, rtol=1e-6, atol=1e-8)

    with fwAD.dual_level():
        out = f(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents)])
        tan = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(tan, tj, rtol=1e-12, atol=1e-14)

    jac = torch.autograd.functional.jacobian(f, primals)
    jt = sum(j.reshape(tj.numel(), -1) @ t.reshape(-1) for j, t in zip(jac, tangents))
    torch.testing.assert_close(jt.reshape(tj.shape), tj, rtol=1e-9, atol=1e-12)


def test_loop_strategy_refuses_forward_mode_clearly() -> None:
    prox = _prox()
    th = torch.randn(4, dtype=DT)
    with pytest.raises(bilevel.UnsupportedError, match="batched='loop'"):
        torch.func.jvp(lambda t: prox(t, XB, YB, batched="loop"), (th,), (torch.ones(4, dtype=DT),))


@pytest.mark.parametrize("name", ["proximal-theta", "proximal-theta-lam-data", "proximal-batched", "argmin",
                                  "fixed-point", "custom-root"])
def test_func_grad_of_a_loss_containing_a_layer_equals_autograd(name: str) -> None:
    # The backward runs inside torch.func.grad with torch.func primitives only.
    f, primals = CASES[name]

    def loss(*ps: torch.Tensor) -> torch.Tensor:
        return (f(*ps) ** 2).sum()

    grads = torch.func.grad(loss, argnums=tuple(range(len(primals))))(*primals)
    req = [p.clone().requires_grad_(True) for p in primals]
    ref = torch.autograd.grad(loss(*req), req)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_auto_strategy_runs_forward_mode_even_when_the_loop_was_measured_faster() -> None:
    """``batched=True`` measures vmap against the loop; under load the loop can win. Forward
    mode (dual tensors) must then still run -- vmapped -- and give the vmap strategy's tangent,
    not refuse because of a timing."""
    prox = _prox()
    th, t = torch.randn(4, dtype=DT), torch.randn(4, dtype=DT)
    prox(th, XB, YB, batched=True)                       # the first call measures and caches a choice
    state = prox.strategy_state()
    assert len(state) == 1
    (key,) = state
    prox.load_strategy_state({key: {"vmap": 1.0, "loop": 0.5}})    # as if the loop had been faster
    prox(th, XB, YB, batched=True)
    assert prox.diagnostics.strategy == "loop"
    with fwAD.dual_level():
        out = prox(fwAD.make_dual(th, t), XB, YB, batched=True)
        tan = fwAD.unpack_dual(out).tangent
    assert prox.diagnostics.strategy == "vmap"
    _, ref = torch.func.jvp(lambda p: _prox()(p, XB, YB, batched="vmap"), (th,), (t,))
    torch.testing.assert_close(tan, ref, rtol=1e-10, atol=1e-12)
