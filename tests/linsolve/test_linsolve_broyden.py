"""The linear Broyden solver (``bilevel.linsolve.Broyden``): the inner solver's algorithm on
``A x - b``, against ``torch.linalg.solve``, its scaling rule, its fixed budget, batches,
trees and the fixed-point backward it is meant for."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bilevel import BilevelValueError, Status, UnsupportedError
from bilevel._tree import default_tol
from bilevel.linsolve import GMRES, Broyden, LinearSolver
from bilevel.solvers import _broyden as core

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]
VARIANTS = ["good", "bad"]


def _near_identity(n: int = 16, radius: float = 0.6, seed: int = 0) -> torch.Tensor:
    """``I - M^T`` with ``||M||_2 = radius``: the transposed operator of a fixed point's backward."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return torch.eye(n, dtype=torch.float64) - (radius * m / torch.linalg.matrix_norm(m, ord=2)).T


def test_it_is_a_linear_solver_running_the_inner_algorithm(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Broyden()
    assert isinstance(s, LinearSolver) and not s.requires_symmetric and Broyden.vmap_tolerance
    assert (s.memory, s.variant, s.initial_jacobian) == (20, "good", 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.memory = 2  # type: ignore[misc]
    calls = []
    real = core.broyden_init
    monkeypatch.setattr(core, "broyden_init", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = _near_identity(6)
    s(lambda v: a @ v, torch.ones(6, dtype=torch.float64))
    assert calls == [1]  # one algorithm, in bilevel/solvers/_broyden.py


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(memory=0), "memory"),
        (dict(variant="best"), "variant"),
        (dict(initial_jacobian=0), "initial_jacobian"),
        (dict(steps=3, rtol=1e-6), "steps"),
        (dict(steps=0), "steps"),
        (dict(maxiter=0), "maxiter"),
    ],
)
def test_invalid_configuration(kwargs, match) -> None:
    with pytest.raises(BilevelValueError, match=match):
        Broyden(**kwargs)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["tensor", "dict"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch_linalg_solve_near_the_identity(trees, dtype, kind, variant) -> None:
    a64 = _near_identity()
    b64 = torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_ref = torch.linalg.solve(a64, b64)
    res = Broyden(variant=variant)(trees.matvec(a64.to(dtype), kind), trees.to_tree(b64.to(dtype), kind))
    assert res.status is Status.SUCCESS, res.summary()
    x = trees.from_tree(res.x, kind)
    assert x.dtype == dtype
    assert float((x.double() - x_ref).norm() / x_ref.norm()) <= 100 * default_tol(dtype)
    # The reported residual is the true one of the returned x, and meets the rule.
    true_res = float((b64 - a64 @ x.double()).norm())
    assert float(res.residual_norm) == pytest.approx(true_res, rel=1e-3, abs=100 * torch.finfo(dtype).eps)
    assert float(res.residual_norm) <= default_tol(dtype) * float(b64.to(dtype).norm())


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_memory_terminates_in_2n_steps_whatever_the_scale(variant) -> None:
    """Gay (1979): on an affine root Broyden's method needs at most 2n steps, for any H0 --
    here a non-symmetric A far from the identity, with the default initial_jacobian=1."""
    g = torch.Generator().manual_seed(4)
    n = 6
    a = torch.randn(n, n, generator=g, dtype=torch.float64) + 3 * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    res = Broyden(variant=variant, rtol=1e-10)(lambda v: a @ v, b)
    assert res.status is Status.SUCCESS and res.iterations <= 2 * n
    torch.testing.assert_close(res.x, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-10)


def test_initial_jacobian_scales_the_first_step() -> None:
    """A = 5 (I - M^T): with initial_jacobian = 5 the iterates are those of A/5 with b/5."""
    a = _near_identity(10, radius=0.5)
    b = torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    scaled = Broyden(initial_jacobian=5.0, memory=4, rtol=1e-10)(lambda v: 5 * (a @ v), b)
    unit = Broyden(memory=4, rtol=1e-10)(lambda v: a @ v, b / 5)
    assert scaled.status is Status.SUCCESS and scaled.iterations == unit.iterations
    torch.testing.assert_close(scaled.x, unit.x, rtol=1e-8, atol=1e-12)


def test_fixed_budget_runs_exactly_steps_and_completes() -> None:
    a = _near_identity(12)
    b = torch.randn(2, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    res = Broyden(steps=5)(lambda v: v @ a.T, b, batched=True)
    assert res.status is Status.COMPLETED and res.task_status == (Status.COMPLETED,) * 2
    assert res.iterations == 5 and res.task_iterations.tolist() == [5, 5]
    capped = Broyden(rtol=1e-300, maxiter=5)(lambda v: v @ a.T, b, batched=True)
    assert capped.status is Status.MAX_ITERATIONS
    torch.testing.assert_close(res.x, capped.x, rtol=0, atol=0)


def test_batched_equals_per_task() -> None:
    a = torch.stack([_near_identity(10, radius=r, seed=i) for i, r in enumerate((0.05, 0.4, 0.9))])
    b = torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    solver = Broyden(memory=5, rtol=1e-12)
    res = solver(lambda v: torch.stack([a[i] @ v[i] for i in range(3)]), b, batched=True)
    singles = [solver(lambda v, i=i: a[i] @ v, b[i]) for i in range(3)]
    assert res.task_status == tuple(s.status for s in singles) == (Status.SUCCESS,) * 3
    assert res.task_iterations.tolist() == [s.iterations for s in singles]
    assert len(set(res.task_iterations.tolist())) == 3
    for i, s in enumerate(singles):
        torch.testing.assert_close(res.x[i], s.x, rtol=0, atol=1e-13)
    torch.testing.assert_close(res.x, torch.linalg.solve(a, b), rtol=1e-9, atol=1e-10)


def test_a_singular_system_is_not_a_success() -> None:
    a = torch.diag(torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    res = Broyden(maxiter=200)(lambda v: a @ v, torch.ones(3, dtype=torch.float64))
    assert res.status in (Status.MAX_ITERATIONS, Status.NONFINITE) and not res.success
    assert float(res.residual_norm) >= 1.0 - 1e-12  # the third equation 0 = 1 never holds


def test_under_vmap_a_tolerance_solve_runs_and_a_fixed_budget_matches() -> None:
    a = _near_identity(8)
    b = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    tol = torch.func.vmap(lambda r: Broyden(rtol=1e-12)(lambda v: a @ v, r).x)(b)
    torch.testing.assert_close(tol, torch.linalg.solve(a, b.T).T, rtol=1e-9, atol=1e-10)
    fixed = torch.func.vmap(lambda r: Broyden(steps=3)(lambda v: a @ v, r).x)(b)
    torch.testing.assert_close(fixed, torch.stack([Broyden(steps=3)(lambda v: a @ v, r).x for r in b]), rtol=1e-12, atol=1e-13)
    with pytest.raises(UnsupportedError, match="vmap"):
        torch.func.vmap(lambda r: GMRES()(lambda v: a @ v, r).x)(b)  # the contrast: GMRES needs steps there


def test_the_fixed_point_backward_system_agrees_with_gmres() -> None:
    """(I - J)^T u = v for a contraction J: Broyden and GMRES give the same u."""
    a = _near_identity(20, radius=0.95, seed=7)
    v = torch.randn(20, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    mine = Broyden(rtol=1e-12)(lambda w: a @ w, v)
    ref = GMRES(rtol=1e-12)(lambda w: a @ w, v)
    assert mine.status is Status.SUCCESS and ref.status is Status.SUCCESS
    torch.testing.assert_close(mine.x, ref.x, rtol=1e-9, atol=1e-10)
