"""``batched=True`` / ``"auto"``: the faster of vmap and the per-task loop, measured once per
shape (issue 17: the earlier fixed rule, loop on the CPU from 64 examples per task, picked
the slower strategy on some nets); the same results either way."""

from __future__ import annotations

import pytest
import torch

import bilevel
import bilevel._timing as timing_mod
from bilevel.linsolve import CG
from bilevel.solvers import GradientDescent

DT = torch.float64


class Recording:
    """GradientDescent that records whether it was called batched (vmap) or per task (loop)."""

    supports_batched = True

    def __init__(self) -> None:
        self.inner = GradientDescent(lr=0.1, steps=30)
        self.calls: list[bool] = []

    def __call__(self, objective, x0, *args, batched: bool = False):  # type: ignore[no-untyped-def]
        self.calls.append(batched)
        return self.inner(objective, x0, *args, batched=batched)


def _loss(p, x, y):
    return ((x @ p - y) ** 2).mean()


def _data(examples: int, tasks: int = 3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(tasks, examples, 4, generator=g, dtype=DT), torch.randn(tasks, examples, generator=g, dtype=DT)


def _fake_clock(monkeypatch: pytest.MonkeyPatch, faster: str) -> list[str]:
    """Make the measurement see ``faster`` as the faster strategy; returns the probes run."""
    seen: list[str] = []

    def clock(fn, device):  # type: ignore[no-untyped-def]
        fn()
        name = fn.__name__
        seen.append(name)
        return 1.0 if (name == "vmapped") == (faster == "vmap") else 3.0

    monkeypatch.setattr(timing_mod, "probe_clock", clock)
    return seen


@pytest.mark.parametrize("examples", [5, 100])
@pytest.mark.parametrize("faster", ["vmap", "loop"])
@pytest.mark.parametrize("batched", [True, "auto"])
def test_auto_takes_the_strategy_measured_faster_with_the_same_results(
    monkeypatch: pytest.MonkeyPatch, examples: int, faster: str, batched
) -> None:
    x, y = _data(examples)
    _fake_clock(monkeypatch, faster)
    solver = Recording()
    layer = bilevel.Proximal(_loss, 1.0, solver=solver, linsolve=CG(rtol=1e-12, maxiter=50))
    th = torch.zeros(4, dtype=DT, requires_grad=True)
    phi = layer(th, x, y, batched=batched)
    assert solver.calls == ([False] * 3 if faster == "loop" else [True])
    assert layer.diagnostics.strategy == faster
    assert set(layer.diagnostics.strategy_seconds) == {"vmap", "loop"}
    assert f"batching: {faster} (measured" in str(layer.diagnostics)
    (ga,) = torch.autograd.grad((phi**2).sum(), th)
    ref = bilevel.Proximal(_loss, 1.0, solver=Recording(), linsolve=CG(rtol=1e-12, maxiter=50))
    phi_v = ref(th, x, y, batched="vmap")
    (gv,) = torch.autograd.grad((phi_v**2).sum(), th)
    torch.testing.assert_close(phi, phi_v, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ga, gv, rtol=1e-10, atol=1e-12)
    assert ref.diagnostics.strategy == "vmap" and ref.diagnostics.strategy_seconds is None


def test_auto_measures_once_per_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _fake_clock(monkeypatch, "loop")
    layer = bilevel.Argmin(lambda p, x, y: _loss(p, x, y) + 0.5 * (p**2).sum(), solver=GradientDescent(lr=0.1, steps=5),
                           linsolve=CG(steps=3))
    x, y = _data(7)
    for _ in range(3):
        layer(torch.zeros(3, 4, dtype=DT), x, y, batched=True)
    once = len(seen)
    assert once == 2  # one timed round of each (a clear winner: 3x; the warm-ups are not timed)
    x2, y2 = _data(9, tasks=2)
    layer(torch.zeros(2, 4, dtype=DT), x2, y2, batched=True)  # a new shape: measured again
    assert len(seen) == 2 * once
    layer(torch.zeros(3, 4, dtype=DT), x, y, batched=True)
    assert len(seen) == 2 * once


def test_close_times_get_a_second_round(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def clock(fn, device):  # type: ignore[no-untyped-def]
        fn()
        seen.append(fn.__name__)
        return {"vmapped": [1.0, 0.8], "looped": [1.1, 1.2]}[fn.__name__][sum(n == fn.__name__ for n in seen) - 1]

    monkeypatch.setattr(timing_mod, "probe_clock", clock)
    layer = bilevel.Proximal(_loss, 1.0, solver=GradientDescent(lr=0.1, steps=2), linsolve=CG(steps=2))
    x, y = _data(5)
    layer(torch.zeros(4, dtype=DT), x, y, batched=True)
    assert seen == ["vmapped", "looped", "vmapped", "looped"]  # 1.1 / 1.0 is close: measured again
    assert layer.diagnostics.strategy_seconds == {"vmap": 0.8, "loop": 1.1}  # the faster round of each
    assert layer.diagnostics.strategy == "vmap"


def test_auto_with_real_timings_records_what_it_measured() -> None:
    x, y = _data(20, tasks=4)
    layer = bilevel.Proximal(_loss, 1.0, solver=GradientDescent(lr=0.1, steps=5), linsolve=CG(steps=3))
    layer(torch.zeros(4, dtype=DT), x, y, batched=True)
    sec = layer.diagnostics.strategy_seconds
    assert sec is not None and all(v > 0 for v in sec.values())
    assert layer.diagnostics.strategy == min(sec, key=sec.__getitem__)


def test_solver_without_batched_mode_gets_the_loop_unmeasured(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _fake_clock(monkeypatch, "vmap")
    solver = Recording()
    solver.supports_batched = False  # type: ignore[misc]
    layer = bilevel.Proximal(_loss, 1.0, solver=solver, linsolve=CG(steps=3))
    x, y = _data(5)
    layer(torch.zeros(4, dtype=DT), x, y, batched=True)
    assert solver.calls == [False] * 3 and seen == []
    assert layer.diagnostics.strategy == "loop" and layer.diagnostics.strategy_seconds is None


def test_unbatched_call_has_no_strategy() -> None:
    x, y = _data(5)
    layer = bilevel.Proximal(_loss, 1.0, solver=GradientDescent(lr=0.1, steps=5), linsolve=CG(steps=3))
    layer(torch.zeros(4, dtype=DT), x, y, batched="loop")
    assert layer.diagnostics.strategy == "loop"
    layer(torch.zeros(4, dtype=DT), x[0], y[0])
    assert layer.diagnostics.strategy is None and "batching" not in str(layer.diagnostics)


@pytest.mark.parametrize("winner", ["vmap", "loop"])
def test_a_saved_strategy_state_makes_the_same_choice_without_measuring(monkeypatch: pytest.MonkeyPatch, winner: str) -> None:
    import bilevel._argmin as argmin_mod

    x, y = _data(6)
    first = bilevel.Proximal(_loss, 1.0, solver=GradientDescent(lr=0.1, steps=5), linsolve=CG(steps=3))
    monkeypatch.setattr(argmin_mod, "measure_strategies",
                        lambda *a, **k: {"vmap": 1.0, "loop": 2.0} if winner == "vmap" else {"vmap": 2.0, "loop": 1.0})
    first(torch.zeros(4, dtype=DT), x, y, batched=True)
    assert first.diagnostics.strategy == winner
    state = first.strategy_state()

    def refuse(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("measured again")

    monkeypatch.setattr(argmin_mod, "measure_strategies", refuse)
    again = bilevel.Proximal(_loss, 1.0, solver=GradientDescent(lr=0.1, steps=5), linsolve=CG(steps=3))
    again.load_strategy_state(state)
    again(torch.zeros(4, dtype=DT), x, y, batched=True)
    assert again.diagnostics.strategy == winner
    with pytest.raises(TypeError, match="strategy_state"):
        again.load_strategy_state({"not": "a state"})  # type: ignore[dict-item]
