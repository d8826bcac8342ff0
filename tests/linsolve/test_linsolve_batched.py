"""Batched (multi-task) mode of every solver equals the per-task solves."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bilevel import Status
from bilevel.linsolve import Dense
from tests import registry

B = 3

# Three tasks of different difficulty, so that they converge at different iterations:
# condition numbers for the Krylov solvers, contraction radii for the Neumann series.
CASES = registry.cases(
    ("CG", "spd"),
    ("MINRES", "indefinite"),
    ("MINRES", "spd"),
    ("GMRES", "nonsymmetric"),
    ("GMRES-restart8", "nonsymmetric"),
    ("BiCGSTAB", "nonsymmetric"),
    ("BiCGSTAB", "indefinite"),
    ("Neumann", "neumann-nonsymmetric"),
    ("Broyden", "neumann-nonsymmetric"),
    ("Dense", "nonsymmetric"),
)


def test_every_batched_linear_solver_has_a_case() -> None:
    assert {type(c.values[0]) for c in CASES} == {type(e.solver) for e in registry.entries("linear", tags={"batched"})}


def _task_matrices(systems, system: str) -> torch.Tensor:
    if system == "neumann-nonsymmetric":
        return torch.stack([systems.neumann(radius=r) for r in (0.05, 0.3, 0.7)])
    if system == "nonsymmetric":
        # Task 0 is nearly a multiple of I (clustered spectrum: a few GMRES steps), task 2
        # is far from it (full GMRES needs all n steps).
        return torch.stack([systems.nonsymmetric(cond=c, skew=k) for c, k in ((1.1, 0.05), (10.0, 0.5), (100.0, 0.5))])
    return torch.stack([systems.system(system, cond=c) for c in (1.1, 10.0, 100.0)])


def _looped_matvec(trees, a, kind):
    """Batched matvec that applies each task's matrix separately, so that its rounding is
    bit-for-bit that of the per-task matvec (a bmm may round differently)."""

    def mv(v):
        flat = trees.from_tree(v, kind, batched=True)
        return trees.to_tree(torch.stack([a[i] @ flat[i] for i in range(a.shape[0])]), kind, batched=True)

    return mv


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["tensor", "dict"])
@pytest.mark.parametrize("solver, system", CASES)
def test_batched_equals_per_task(systems, trees, solver, system, kind, dtype):
    a64 = _task_matrices(systems, system)
    b64 = systems.randn(B, systems.n)
    x_ref = torch.linalg.solve(a64, b64)
    a, bf = a64.to(dtype), b64.to(dtype)
    b_tree = trees.to_tree(bf, kind, batched=True)

    res = solver(_looped_matvec(trees, a, kind), b_tree, batched=True)
    singles = [solver(trees.matvec(a[i], kind), trees.to_tree(bf[i], kind)) for i in range(B)]

    assert res.task_status == (Status.SUCCESS,) * B, res.summary()
    assert res.status is Status.SUCCESS
    assert [s.status for s in singles] == [Status.SUCCESS] * B
    assert res.residual_norm.shape == (B,)
    assert res.task_iterations.shape == (B,)
    assert res.iterations == int(res.task_iterations.max())

    x = trees.from_tree(res.x, kind, batched=True)
    assert x.shape == (B, systems.n) and x.dtype == dtype
    eps = torch.finfo(dtype).eps
    its = res.task_iterations.tolist()
    # With an operator that rounds identically, every task follows exactly its own
    # per-task trajectory: same iteration count, same iterate up to rounding.
    assert its == [s.iterations for s in singles]
    for i in range(B):
        xi = trees.from_tree(singles[i].x, kind)
        assert (x[i] - xi).norm() <= 100 * eps * xi.norm()
        rel = (x[i].double() - x_ref[i]).norm() / x_ref[i].norm()
        assert rel <= systems.rtol[dtype], f"task {i}: relative error {rel:.3g}"
        true_res = (b64[i] - a64[i] @ x[i].double()).norm()
        assert abs(res.residual_norm[i].double() - true_res) <= 10 * systems.n * eps * (
            torch.linalg.matrix_norm(a64[i], ord=2) * x_ref[i].norm() + b64[i].norm()
        )
    if isinstance(solver, Dense):
        assert its == [0] * B
    else:
        # Different conditioning -> different iteration counts: converged tasks stopped
        # while the others went on (otherwise all counts would equal the largest).
        assert len(set(its)) > 1, its

    # The same solve with an ordinary batched (bmm) matvec: same statuses and accuracy.
    res_bmm = solver(trees.matvec(a, kind, batched=True), b_tree, batched=True)
    assert res_bmm.task_status == (Status.SUCCESS,) * B, res_bmm.summary()
    x_bmm = trees.from_tree(res_bmm.x, kind, batched=True).double()
    rel = (x_bmm - x_ref).norm(dim=1) / x_ref.norm(dim=1)
    assert (rel <= systems.rtol[dtype]).all(), rel


@pytest.mark.parametrize("solver, system", CASES)
def test_converged_task_stops_moving(systems, trees, solver, system):
    """A task with b = 0 is solved at iteration 0 and stays exactly 0 while others iterate."""
    a = _task_matrices(systems, system)
    b = systems.randn(B, systems.n)
    b[1] = 0.0
    res = solver(lambda v: (a @ v.unsqueeze(-1)).squeeze(-1), b, batched=True)
    assert res.task_status == (Status.SUCCESS,) * B
    assert res.task_iterations[1] == 0
    assert torch.equal(res.x[1], torch.zeros(systems.n, dtype=torch.float64))
    assert res.residual_norm[1] == 0
    if not isinstance(solver, Dense):
        assert res.task_iterations[0] > 0 and res.task_iterations[2] > 0


ITERATIVE_CASES = [c for c in CASES if "direct" not in registry.capabilities(c.values[0])]


@pytest.mark.parametrize("solver, system", ITERATIVE_CASES)
def test_batched_maxiter_is_per_task(systems, solver, system):
    """With a cap between the tasks' needs, easy tasks succeed and the hard one reports
    MAX_ITERATIONS after exactly maxiter iterations -- with the true residual."""
    a = _task_matrices(systems, system)
    b = systems.randn(B, systems.n)
    mv = lambda v: (a @ v.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    full = solver(mv, b, batched=True)
    its = full.task_iterations.tolist()
    cap = min(its) if min(its) < max(its) else max(its) - 1
    capped = dataclasses.replace(solver, maxiter=cap)(mv, b, batched=True)
    for i in range(B):
        if its[i] <= cap:
            assert capped.task_status[i] is Status.SUCCESS
        else:
            assert capped.task_status[i] is Status.MAX_ITERATIONS
            assert capped.task_iterations[i] == cap
    assert capped.status is Status.MAX_ITERATIONS
    true_res = (b - mv(capped.x)).norm(dim=1)
    assert torch.allclose(capped.residual_norm, true_res, rtol=1e-6, atol=1e-12)

