"""The one iterative driver (bilevel/_iterate.py): masks, budgets, claims and restarts,
and that every iterative solver of the package runs on it."""

from __future__ import annotations

import importlib

import pytest
import torch

from bilevel import Status
from bilevel._iterate import Outcome, Tally, Verifier, iterate
from tests import registry


def countdown_step(stop_at: torch.Tensor):
    """Task b moves until its counter reaches stop_at[b], then converges (SUCCESS)."""

    def step(state: torch.Tensor, active: torch.Tensor):
        new = torch.where(active, state + 1, state)
        return new, Outcome(moved=active, stopped={Status.SUCCESS: active & (new >= stop_at)})

    return step


def test_per_task_masks_and_iterations() -> None:
    stop_at = torch.tensor([1, 3, 10])
    tally = Tally(stop_at, (Status.SUCCESS, Status.NONFINITE))
    state = iterate(countdown_step(stop_at), torch.zeros(3, dtype=torch.long), tally, maxiter=5)
    assert state.tolist() == [1, 3, 5]
    assert tally.iters.tolist() == [1, 3, 5]
    codes = tally.codes(Status.MAX_ITERATIONS)
    assert [tuple(Status)[c] for c in codes.tolist()] == [Status.SUCCESS, Status.SUCCESS, Status.MAX_ITERATIONS]


def test_stops_early_when_no_task_is_active() -> None:
    calls = []
    stop_at = torch.tensor([2, 2])
    inner = countdown_step(stop_at)

    def step(state, active):
        calls.append(active.clone())
        return inner(state, active)

    iterate(step, torch.zeros(2, dtype=torch.long), Tally(stop_at, (Status.SUCCESS,)), maxiter=100)
    assert len(calls) == 2


def test_fixed_budget_runs_every_step_without_reading_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = []
    real_bool = torch.Tensor.__bool__

    def counting_bool(self):
        reads.append(1)
        return real_bool(self)

    stop_at = torch.tensor([1, 2])
    tally = Tally(stop_at, (Status.SUCCESS,))
    calls = []
    inner = countdown_step(stop_at)

    def step(state, active):
        calls.append(1)
        return inner(state, active)

    monkeypatch.setattr(torch.Tensor, "__bool__", counting_bool)
    state = iterate(step, torch.zeros(2, dtype=torch.long), tally, maxiter=6, fixed=True)
    monkeypatch.undo()
    assert len(calls) == 6  # all tasks stopped after 2 steps, but a fixed budget has no test
    assert reads == []
    assert state.tolist() == [1, 2] and tally.iters.tolist() == [1, 2]


def test_claims_are_verified_and_false_claims_restart() -> None:
    # Each task claims convergence at every step; the true test accepts a claim only once
    # the counter reaches 3.  A failed claim restarts the task (here: counter kept, a
    # restart count incremented).
    like = torch.zeros(2)
    tally = Tally(like, (Status.SUCCESS, Status.NONFINITE))
    restarts = torch.zeros(2, dtype=torch.long)

    def step(state, active):
        new = torch.where(active, state + 1, state)
        return new, Outcome(moved=active, claimed=active.clone())

    def check(state, mask):
        return state, mask & (state >= 3), torch.zeros_like(mask)

    def restart(state, mask):
        restarts.add_(mask.long())
        return state

    state = iterate(step, torch.zeros(2, dtype=torch.long), tally, maxiter=10, verifier=Verifier(check, restart))
    assert state.tolist() == [3, 3]
    assert restarts.tolist() == [2, 2]  # claims at 1 and 2 failed
    assert tally.stops[Status.SUCCESS].tolist() == [True, True]


def test_a_claim_on_the_last_step_is_settled_and_a_false_one_is_not_success() -> None:
    tally = Tally(torch.zeros(1), (Status.SUCCESS, Status.NONFINITE))

    def step(state, active):
        return state + 1, Outcome(moved=active, claimed=active.clone())

    def check(state, mask):
        return state, mask & (state >= 100), torch.zeros_like(mask)

    iterate(step, torch.zeros(1), tally, maxiter=2, verifier=Verifier(check, lambda s, m: s))
    assert tally.codes(Status.MAX_ITERATIONS).tolist() == [tuple(Status).index(Status.MAX_ITERATIONS)]
    assert not tally.pending.any()


def test_exhausted_ends_the_loop() -> None:
    tally = Tally(torch.zeros(1), (Status.SUCCESS,))
    state = iterate(lambda s, a: (s + 1, Outcome(moved=a, exhausted=s + 1 >= 4)), 0, tally, maxiter=None)
    assert state == 4


def test_without_a_tally_only_a_fixed_budget_runs() -> None:
    assert iterate(lambda s, _: (s + 1, None), 0, None, maxiter=5, fixed=True) == 5
    with pytest.raises(ValueError, match="fixed budget"):
        iterate(lambda s, _: (s + 1, None), 0, None, maxiter=5)


def test_unknown_initial_status_is_refused() -> None:
    with pytest.raises(KeyError, match="BREAKDOWN"):
        Tally(torch.zeros(1), (Status.SUCCESS,), {Status.BREAKDOWN: torch.zeros(1, dtype=torch.bool)})


# -- every iterative solver runs on the driver ----------------------------------------------
def _spd(n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return m @ m.T + n * torch.eye(n, dtype=torch.float64)


# Every default configuration of an iterative linear solver, fixed budgets and restarts,
# and a Neumann step for the test operator (eigenvalues >= 6: alpha * lambda_max < 2).
LINEAR = registry.solvers("linear", tags={"driver", "default"}, exclude={"contraction"}) + registry.solvers(
    ids=["CG-steps3", "GMRES-restart3", "Neumann-maxiter400-alpha0.05"]
)
# The minimisers (FixedPointIteration has its own test below): defaults, and first-order
# solvers with a fixed budget, a tolerance and the monitored loop, at a step for the test
# quadratic.
INNER = registry.solvers("inner", tags={"driver", "default"}, exclude={"fixed_point"}) + registry.solvers(
    ids=[
        "GradientDescent-lr0.05-steps5",
        "GradientDescent-lr0.05-rtol1e-06-maxiter500",
        "Adam-lr0.05-steps5",
        "Adam-lr0.05-steps5-monitor",
    ]
)


# The fixed-point solvers (they take a map, not an objective): each configuration.
FIXED_POINT = registry.solvers("inner", tags={"driver", "fixed_point"})


def test_every_solver_on_the_driver_is_tested_here() -> None:
    """A solver class registered as running on the driver has a configuration above."""
    tested = {type(p.values[0]) for p in LINEAR + INNER + FIXED_POINT}
    assert tested == {type(e.solver) for e in registry.entries(tags={"driver"})}


def _counting(monkeypatch: pytest.MonkeyPatch, module: str) -> list[int]:
    """Count the calls of ``iterate`` from ``module`` (where the solver class is defined)."""
    mod = importlib.import_module(module)
    calls: list[int] = []
    real = mod.iterate

    def wrapper(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(mod, "iterate", wrapper)
    return calls


@pytest.mark.parametrize("solver", LINEAR)
def test_linear_solvers_run_on_the_driver(monkeypatch: pytest.MonkeyPatch, solver) -> None:
    calls = _counting(monkeypatch, type(solver).__module__)
    A = _spd()
    b = torch.ones(6, dtype=torch.float64)
    res = solver(lambda v: A @ v, b)
    assert calls == [1]
    assert res.status in (Status.SUCCESS, Status.COMPLETED)
    if res.status is Status.SUCCESS:
        torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("solver", INNER)
def test_inner_solvers_run_on_the_driver(monkeypatch: pytest.MonkeyPatch, solver) -> None:
    calls = _counting(monkeypatch, type(solver).__module__)
    A = _spd()
    b = torch.ones(6, dtype=torch.float64)
    res = solver(lambda x: 0.5 * x @ A @ x - b @ x, torch.zeros(6, dtype=torch.float64))
    assert calls == [1]
    assert res.status in (Status.SUCCESS, Status.COMPLETED)


@pytest.mark.parametrize("solver", FIXED_POINT)
def test_fixed_point_solvers_run_on_the_driver(monkeypatch: pytest.MonkeyPatch, solver) -> None:
    calls = _counting(monkeypatch, type(solver).__module__)
    res = solver(lambda x: 0.5 * torch.cos(x), torch.zeros(3, dtype=torch.float64))
    assert calls == [1] and res.status is Status.SUCCESS
    torch.testing.assert_close(res.x, 0.5 * torch.cos(res.x), rtol=0, atol=1e-10)
