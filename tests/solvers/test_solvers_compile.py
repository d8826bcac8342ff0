"""``GradientDescent``/``Adam(compile=...)``: the lean fixed-step loop with each step one
torch.compile'd function -- the same iterates, compiled once per objective (issue 8)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import bilevel
import bilevel.solvers._compiled as compiled_mod
from bilevel import BilevelValueError, NonFiniteError
from bilevel.solvers import GradientDescent
from tests import registry

DT = torch.float64

# No filter for torch's own torch.jit DeprecationWarning from its compile stack: the
# option hides it (warnings are errors in this run), which these tests check too.


def _ridge(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(40, 6, generator=g, dtype=DT)
    b = torch.randn(40, generator=g, dtype=DT)
    th = torch.randn(6, generator=g, dtype=DT)

    def loss(p, th, A, b):
        return 0.5 * ((A @ p - b) ** 2).mean() + 0.5 * ((p - th) ** 2).sum() + 0.1 * (p**4).sum()

    return loss, th, A, b


SOLVERS = registry.solvers("inner", tags={"compile"})
CLASSES = registry.classes("inner", tags={"compile"})


@pytest.mark.parametrize("solver", SOLVERS)
def test_compiled_iterates_equal_the_eager_ones(solver) -> None:
    loss, th, A, b = _ridge()
    fast = dataclasses.replace(solver, compile=True)
    e = solver(loss, th, th, A, b)
    c = fast(loss, th, th, A, b)
    torch.testing.assert_close(c.x, e.x, rtol=1e-12, atol=1e-13)
    assert c.status is e.status and c.n_grad == e.n_grad == solver.steps


@pytest.mark.parametrize("cls", CLASSES)
def test_compiled_batched_tasks_equal_the_eager_ones(cls) -> None:
    loss, th, A, b = _ridge()
    vl = torch.func.vmap(loss, in_dims=(0, None, 0, 0))
    Ab = torch.stack([A, 2 * A, -A])
    bb = torch.stack([b, b, 3 * b])
    x0 = th.expand(3, -1).clone()
    e = cls(lr=0.05, steps=10)(vl, x0, th, Ab, bb, batched=True)
    c = cls(lr=0.05, steps=10, compile=True)(vl, x0, th, Ab, bb, batched=True)
    torch.testing.assert_close(c.x, e.x, rtol=1e-12, atol=1e-13)
    assert c.task_status == e.task_status


def test_a_layer_compiles_its_step_once_across_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    builds = []
    real = torch.compile

    def counting(fn, **kw):
        builds.append(1)
        return real(fn, **kw)

    monkeypatch.setattr(compiled_mod.torch, "compile", counting)
    loss, th, A, b = _ridge(1)
    inner = lambda p, A, b: 0.5 * ((A @ p - b) ** 2).mean()  # noqa: E731
    layer = bilevel.Proximal(inner, 0.8, solver=GradientDescent(lr=0.1, steps=8, compile=True),
                             linsolve=bilevel.linsolve.CG(steps=6))
    eager = bilevel.Proximal(inner, 0.8, solver=GradientDescent(lr=0.1, steps=8),
                             linsolve=bilevel.linsolve.CG(steps=6))
    Ab, bb = torch.stack([A, 2 * A]), torch.stack([b, -b])
    for batched in (False, "vmap", "loop"):
        for _ in range(3):
            t = th.clone().requires_grad_(True)
            args = (Ab, bb) if batched else (A, b)
            (g,) = torch.autograd.grad(layer(t, *args, batched=batched).square().sum(), t)
            (ge,) = torch.autograd.grad(eager(t, *args, batched=batched).square().sum(), t)
            torch.testing.assert_close(g, ge, rtol=1e-10, atol=1e-12)
    assert len(builds) == 3  # one per strategy (unbatched, vmapped, one task of the loop), not per call


def test_a_non_finite_compiled_step_is_named_by_the_monitored_replay() -> None:
    def blows_up(p):  # each step p <- p + 4 p^3: overflows within a few steps
        return -(p**4).sum()

    with pytest.raises(NonFiniteError, match=r"iteration \d+"):
        GradientDescent(lr=1.0, steps=10, compile=True)(blows_up, torch.ones(3, dtype=DT))


@pytest.mark.parametrize("cls", CLASSES)
def test_compile_is_only_for_the_lean_loop_and_takes_a_bool_or_a_mode(cls) -> None:
    kw = {"lr": 0.1, "steps": 3}
    with pytest.raises(BilevelValueError, match="lean fixed-step loop"):
        cls(lr=0.1, maxiter=3, rtol=1e-3, compile=True)
    # monitor=True is a fixed-step loop too: its health statistics are computed in the step.
    assert cls(**kw, monitor=True, compile=True).monitor
    with pytest.raises(BilevelValueError, match="compile must be"):
        cls(**kw, compile="fastest")
    assert cls(**kw, compile="reduce-overhead").compile == "reduce-overhead"


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("batched", [False, True])
def test_compiled_health_statistics_equal_the_monitored_path(solver, batched: bool) -> None:
    # The health statistics computed inside the compiled step (issue 17) equal those of the
    # host-tested monitored path (a tolerance too tight to stop: it runs every step), task by task.
    loss, th, A, b = _ridge(2)
    args: tuple = (th, A, b)
    x0 = th
    if batched:
        loss = torch.func.vmap(loss, in_dims=(0, None, 0, 0))
        args = (th, torch.stack([A, 3 * A]), torch.stack([b, -b]))
        x0 = th.expand(2, -1).clone()
    ref = dataclasses.replace(solver, steps=None, maxiter=solver.steps, rtol=1e-30)(loss, x0, *args, batched=batched)
    for fast in (dataclasses.replace(solver, monitor=True), dataclasses.replace(solver, monitor=True, compile=True)):
        got = fast(loss, x0, *args, batched=batched)
        torch.testing.assert_close(got.x, ref.x, rtol=1e-12, atol=1e-13)
        for field in ("grad_norm", "value", "grad_norm_initial"):
            torch.testing.assert_close(getattr(got, field), getattr(ref, field), rtol=1e-12, atol=1e-13)
        for field in ("grad_norm_monotone", "value_monotone"):
            assert torch.equal(getattr(got, field), getattr(ref, field))
        assert got.n_grad == solver.steps + 1 and got.status is bilevel.Status.COMPLETED


def test_compiled_health_flags_an_oscillating_loop() -> None:
    # lr·H_max = 2.5 > 2 on one task: the compiled health flags say so (descent lemma).
    curv = torch.tensor([1.0, 10.0], dtype=DT)

    def quad(x, s):
        return 0.5 * s * (curv * x * x).sum()

    res = GradientDescent(lr=0.15, steps=10, monitor=True, compile=True)(
        torch.func.vmap(quad), torch.ones(2, 2, dtype=DT), torch.tensor([1.0, 2.0], dtype=DT), batched=True)
    assert res.grad_norm_monotone.tolist() == [True, False]
    assert res.value_monotone.tolist() == [True, False]
    assert float(res.grad_norm[0] / res.grad_norm_initial[0]) < 0.2
