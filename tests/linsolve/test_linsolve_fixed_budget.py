"""A fixed budget of Krylov steps (``steps=m``): exactly m iterations, ``COMPLETED``, the
same iterates as a tolerance run that never stops early, and no host sync inside the loop
(CG, MINRES, Neumann) -- the number of device-to-host reads must not grow with m."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from bilevel import Status
from bilevel.linsolve import CG
from tests import registry

DT = torch.float64
N = 12


def _spd(seed: int = 0, n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))[0]
    return q @ torch.diag(torch.linspace(1.0, 30.0, n, dtype=DT)) @ q.T


# Every fixed-budget configuration (the test operator's eigenvalues lie in [1, 30]).
FIXED = registry.solvers("linear", tags={"fixed_budget"})


def fixed(solver: Any, m: int) -> Any:
    """``solver`` with a budget of ``m`` steps."""
    return dataclasses.replace(solver, steps=m)


def capped(solver: Any, m: int) -> Any:
    """Its tolerance twin that never stops early: ``rtol=1e-300, maxiter=m``."""
    return dataclasses.replace(solver, steps=None, rtol=1e-300, maxiter=m)


def test_every_iterative_linear_solver_has_a_fixed_budget() -> None:
    assert {type(p.values[0]) for p in FIXED} == {type(e.solver) for e in registry.entries("linear", exclude={"direct"})}


@pytest.mark.parametrize("solver", FIXED)
@pytest.mark.parametrize("batched", [False, True])
def test_fixed_budget_runs_exactly_m_steps_and_completes(solver: Any, batched: bool) -> None:
    a = _spd()
    b = torch.randn(3, N, dtype=DT, generator=torch.Generator().manual_seed(1))
    if not batched:
        b = b[0]
    def mv(v):
        return v @ a.T

    m = 4
    res = fixed(solver, m)(mv, b, batched=batched)
    ref = capped(solver, m)(mv, b, batched=batched)
    assert res.status is Status.COMPLETED and res.success
    assert ref.status is Status.MAX_ITERATIONS and not ref.success
    assert res.iterations == m
    if batched:
        assert res.task_status == (Status.COMPLETED,) * 3
    torch.testing.assert_close(res.x, ref.x, rtol=1e-12, atol=1e-12)


def test_fixed_budget_stops_on_an_exact_solution_with_success() -> None:
    # b is an eigenvector: CG solves the system in one step, then has nothing left to do.
    a = torch.diag(torch.arange(1.0, N + 1, dtype=DT))
    b = torch.zeros(N, dtype=DT)
    b[3] = 2.0
    res = CG(steps=5)(lambda v: a @ v, b)
    assert res.status is Status.SUCCESS and res.iterations == 1
    torch.testing.assert_close(res.x, b / 4.0)


def test_fixed_budget_still_reports_negative_curvature() -> None:
    a = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=DT))
    res = CG(steps=5)(lambda v: a @ v, torch.ones(3, dtype=DT))
    assert res.status is Status.NEGATIVE_CURVATURE and not res.success


@pytest.mark.parametrize(
    "kwargs", [dict(steps=3, rtol=1e-6), dict(steps=3, atol=1e-9), dict(steps=3, maxiter=10), dict(steps=0), dict(steps=2.0)]
)
def test_steps_is_a_budget_exclusive_with_a_tolerance(kwargs) -> None:
    with pytest.raises(ValueError, match="steps"):
        CG(**kwargs)


@contextlib.contextmanager
def _count_host_reads() -> Iterator[dict[str, int]]:
    """Count tensor-to-Python conversions (each one is a device sync on an accelerator)."""
    counts = {"n": 0}
    names = ("__bool__", "item", "tolist", "__int__", "__float__")
    saved = {k: getattr(torch.Tensor, k) for k in names}

    def wrap(fn):
        def inner(self, *a, **kw):
            counts["n"] += 1
            return fn(self, *a, **kw)

        return inner

    for k in names:
        setattr(torch.Tensor, k, wrap(saved[k]))
    try:
        yield counts
    finally:
        for k, fn in saved.items():
            setattr(torch.Tensor, k, fn)


@pytest.mark.parametrize("solver", registry.solvers("linear", tags={"fixed_budget", "device_loop"}))
@pytest.mark.parametrize("batched", [False, True])
def test_fixed_budget_has_no_host_sync_in_the_loop(solver: Any, batched: bool) -> None:
    a = _spd(n=40)
    b = torch.randn(2, 40, dtype=DT, generator=torch.Generator().manual_seed(2))
    if not batched:
        b = b[0]
    reads = {}
    for m in (2, 9):
        with _count_host_reads() as c:
            fixed(solver, m)(lambda v: v @ a.T, b, batched=batched)
        reads[m] = c["n"]
    assert reads[2] == reads[9], reads  # a constant number of reads, to build the result
    # ... whereas a tolerance run reads once per iteration at least.
    with _count_host_reads() as c:
        capped(solver, 9)(lambda v: v @ a.T, b, batched=batched)
    assert c["n"] >= reads[9] + 7
