"""The traced path (bilevel/_traced.py): with fixed budgets a layer call is captured whole by
``torch.compile(fullgraph=True)`` -- zero graph breaks, the inner loop in the forward graph and
the implicit backward in the compiled backward -- and gives the eager result; every other
configuration keeps one clean graph break (docs/works-with.md).

Most tests compile with ``backend="aot_eager"`` (dynamo and AOTAutograd trace forward and
backward exactly as with inductor, without generating kernels: seconds instead of minutes);
the meta-step test uses the default inductor backend."""

from __future__ import annotations

import pytest
import torch

import bilevel
from bilevel import NonFiniteError
from bilevel.linsolve import CG
from bilevel.solvers import GradientDescent, NewtonCG
from tests import registry

DT = torch.float64
_g = torch.Generator().manual_seed(0)
X, Y = torch.randn(20, 4, generator=_g, dtype=DT), torch.randn(20, generator=_g, dtype=DT)


def _objective(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Not quadratic (x⁴): the Hessian-vector products depend on x*.
    return 0.5 * ((a @ x - b) ** 2).mean() + 0.5 * w * (x @ x) + 0.05 * (x**4).sum()


def _meta_loss(layer: bilevel.Argmin):
    def f(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = layer(torch.zeros(4, dtype=DT), w, a, b)
        return ((a @ x - b) ** 2).mean() + x.sum()

    return f


def _value_and_grad(f, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.detach().requires_grad_(True)
    loss = f(w, X, Y)
    (g,) = torch.autograd.grad(loss, w)
    return loss.detach(), g


def _check_traced(layer: bilevel.Argmin) -> None:
    f = _meta_loss(layer)
    w = torch.tensor(0.8, dtype=DT)
    eager = _value_and_grad(f, w)
    assert not layer.diagnostics.traced
    torch._dynamo.reset()
    # fullgraph=True: any graph break is an error (the meta-step test also counts them with explain).
    compiled = _value_and_grad(torch.compile(f, fullgraph=True, backend="aot_eager"), w)
    assert layer.diagnostics.traced
    torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver", registry.solvers("inner", tags={"traceable"}))
def test_every_traceable_inner_solver_traces_whole_and_equals_eager(solver) -> None:
    _check_traced(bilevel.Argmin(_objective, solver=solver, linsolve=CG(steps=4), on_failure="ignore"))


@pytest.mark.parametrize("linsolve", registry.solvers("linear", tags={"traceable"}))
def test_every_traceable_linear_solver_traces_whole_and_equals_eager(linsolve) -> None:
    _check_traced(bilevel.Argmin(_objective, solver=GradientDescent(0.3, steps=8), linsolve=linsolve,
                                 on_failure="ignore"))


@pytest.mark.parametrize("entry", registry.entries())
def test_the_traceable_flag_is_the_registry_s_tag(entry) -> None:
    assert entry.solver.traceable is ("traceable" in entry.tags)


class _Bisection(bilevel.ImplicitLayer):
    """A user-written solve (host-side control flow)."""

    symmetric = True

    def solve(self, x0, a):
        lo, hi = torch.zeros_like(a), a.clamp(min=1.0)
        while bool((hi - lo).max() > 1e-12):
            mid = (lo + hi) / 2
            lo, hi = torch.where(mid * mid < a, mid, lo), torch.where(mid * mid < a, hi, mid)
        return (lo + hi) / 2

    def optimality(self, x, a):
        return x * x - a


UNTRACEABLE = {
    "Argmin-default": lambda a: bilevel.Argmin(lambda x, a: ((x - a) ** 2).sum() + (x**4).sum())(torch.zeros(3, dtype=DT), a),
    "GD-tolerance": lambda a: bilevel.Argmin(lambda x, a: ((x - a) ** 2).sum(), solver=GradientDescent(0.2, rtol=1e-8, maxiter=200),
                                             linsolve=CG(steps=3))(torch.zeros(3, dtype=DT), a),
    "CG-tolerance": lambda a: bilevel.Proximal(lambda p, a: ((p - a) ** 2).sum(), 1.0, solver=GradientDescent(0.2, steps=10),
                                               linsolve=CG(rtol=1e-10))(torch.zeros(3, dtype=DT), a),
    "check_minimum": lambda a: bilevel.Argmin(lambda x, a: ((x - a) ** 2).sum(),
                                              solver=GradientDescent(0.2, steps=10, check_minimum=True),
                                              linsolve=CG(steps=3), on_failure="ignore")(torch.zeros(3, dtype=DT), a),
    "loop-strategy": lambda a: bilevel.Proximal(lambda p, a: ((p - a) ** 2).sum(), 1.0, solver=GradientDescent(0.2, steps=10),
                                                linsolve=CG(steps=3))(torch.zeros(3, dtype=DT), a.expand(2, 3), batched="loop"),
    "user-solve": lambda a: _Bisection()(torch.ones(3, dtype=DT), a),
    "NewtonCG": lambda a: bilevel.Argmin(lambda x, a: ((x - a) ** 2).sum(), solver=NewtonCG(),
                                         linsolve=CG(steps=3))(torch.zeros(3, dtype=DT), a),
}


# torch 2.13's own warning: dynamo's resume function after the graph break reads .grad of
# the layer's (non-leaf) output; not ours, not about the layer (as in test_works_with.py).
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning")
@pytest.mark.parametrize("kind", list(UNTRACEABLE))
def test_untraceable_configurations_keep_one_clean_graph_break_and_the_eager_result(kind: str) -> None:
    _check_one_graph_break(UNTRACEABLE[kind])


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning")
@pytest.mark.parametrize("linsolve", registry.solvers("linear", exclude={"traceable"}))
def test_every_untraceable_linear_solver_keeps_one_clean_graph_break(linsolve) -> None:
    # H = 0.5 I + λ I: every solver of the registry solves it (Neumann's series converges).
    layer = bilevel.Proximal(lambda p, a: 0.25 * ((p - a) ** 2).sum(), 1.0, solver=GradientDescent(0.2, steps=10),
                             linsolve=linsolve, on_failure="ignore")
    _check_one_graph_break(lambda a: layer(torch.zeros(3, dtype=DT), a))


def _check_one_graph_break(call) -> None:
    def f(a: torch.Tensor) -> torch.Tensor:
        return (call(a) ** 2).sum()

    a = torch.tensor([1.0, 2.0, 3.0], dtype=DT, requires_grad=True)
    (eager,) = torch.autograd.grad(f(a), a)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(f)(a)
    assert explained.graph_break_count == 1, explained.break_reasons
    (compiled,) = torch.autograd.grad(torch.compile(f, backend="aot_eager")(a), a)
    torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)


# torch 2.13's inductor calls its own deprecated torch.jit API when it compiles: not ours.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_a_traced_meta_step_has_no_graph_break_compiles_once_and_equals_eager() -> None:
    """The iMAML pattern with the default (inductor) backend: a batched Proximal over a dict
    θ with integer labels, the query loss vmapped over tasks; three steps, one compilation."""
    g = torch.Generator().manual_seed(1)
    theta = {"w1": torch.randn(6, 8, generator=g), "b1": torch.zeros(8), "w2": 0.3 * torch.randn(8, 3, generator=g)}
    theta = {k: v.requires_grad_(True) for k, v in theta.items()}

    def loss(p, x, y):
        return torch.nn.functional.cross_entropy(torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"], y)

    layer = bilevel.Proximal(loss, 2.0, solver=GradientDescent(0.3, steps=4), linsolve=CG(steps=3))

    def step(theta, xs, ys, xq, yq):
        phi = layer(theta, xs, ys, batched=True)
        return torch.func.vmap(loss)(phi, xq, yq).mean()

    graphs: list[object] = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.registry.lookup_backend("inductor")(gm, example_inputs)

    batch = (torch.randn(4, 5, 6, generator=g), torch.randint(0, 3, (4, 5), generator=g),
             torch.randn(4, 7, 6, generator=g), torch.randint(0, 3, (4, 7), generator=g))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(theta, *batch)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=counting)
    for _ in range(3):
        batch = (torch.randn(4, 5, 6, generator=g), torch.randint(0, 3, (4, 5), generator=g),
                 torch.randn(4, 7, 6, generator=g), torch.randint(0, 3, (4, 7), generator=g))
        want = torch.autograd.grad(step(theta, *batch), list(theta.values()))
        got = torch.autograd.grad(compiled(theta, *batch), list(theta.values()))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert len(graphs) == 1  # no recompilation from one meta-step to the next


def test_diagnostics_say_that_a_call_was_traced() -> None:
    layer = bilevel.Argmin(_objective, solver=GradientDescent(0.3, steps=5), linsolve=CG(steps=3))
    f = _meta_loss(layer)
    w = torch.tensor(0.8, dtype=DT)
    _value_and_grad(f, w)
    assert not layer.diagnostics.traced and layer.diagnostics.forward is not None
    torch._dynamo.reset()
    _value_and_grad(torch.compile(f, fullgraph=True, backend="aot_eager"), w)
    d = layer.diagnostics
    assert d.traced and d.forward is None and d.backward is None
    assert "traced: the last call ran inside a torch.compile graph" in str(d)
    _value_and_grad(f, w)
    assert not layer.diagnostics.traced and layer.diagnostics.backward is not None


def test_a_non_finite_traced_call_gives_nan_gradients_where_eager_raises() -> None:
    layer = bilevel.Argmin(_objective, solver=GradientDescent(0.3, steps=5), linsolve=CG(steps=3))
    f = _meta_loss(layer)
    bad = Y.clone()
    bad[3] = float("nan")
    w = torch.tensor(0.8, dtype=DT, requires_grad=True)
    with pytest.raises(NonFiniteError):
        torch.autograd.grad(f(w, X, bad), w)
    torch._dynamo.reset()
    (g,) = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(w, X, bad), w)
    assert torch.isnan(g).all()  # not a silent zero from a solver that stopped on a NaN curvature


@pytest.mark.parametrize("backend", ["aot_eager", "eager"])
def test_a_compiled_gradient_is_first_order_and_never_differentiated_silently(backend: str) -> None:
    """``create_graph=True`` through a compiled layer: the gradient equals the eager one, and
    differentiating it again raises -- AOTAutograd (inductor, aot_eager) refuses double
    backward; dynamo's ``eager`` backend returns every autograd.Function's gradient without a
    graph (torch's handling, docs/works-with.md), so there is nothing to differentiate."""
    layer = bilevel.Argmin(_objective, solver=GradientDescent(0.3, steps=30), linsolve=CG(steps=4))
    f = _meta_loss(layer)
    w = torch.tensor(0.8, dtype=DT, requires_grad=True)
    (want,) = torch.autograd.grad(f(w, X, Y), w)
    torch._dynamo.reset()
    (got,) = torch.autograd.grad(torch.compile(f, fullgraph=True, backend=backend)(w, X, Y), w, create_graph=True)
    torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)
    match = "double backward" if backend == "aot_eager" else "does not require grad"
    with pytest.raises(RuntimeError, match=match):
        torch.autograd.grad(got, w)
