"""Batched (multi-task) solves equal solving each task alone: iterates, statuses, counts."""

from __future__ import annotations

import pytest
import torch

from bilevel import Status
from bilevel.solvers import Adam, FixedPointIteration, GradientDescent, NewtonCG
from tests.problems import logistic_problem, logistic_torch, quadratic, spd_matrix

CONDS = (1.0, 10.0, 300.0)  # three tasks with different conditioning


def _quadratic_tasks(d: int = 4):
    # Eigenvalues in [1/cond, 1]: one step size suits all tasks, but they converge at very
    # different rates (condition numbers 1, 10, 300).
    hs = torch.stack([spd_matrix(d, c, 10 + i) / c for i, c in enumerate(CONDS)])
    bs = torch.randn(3, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return hs, bs


def _compare(res_b, singles, atol: float = 1e-12) -> None:
    assert res_b.task_status == tuple(r.status for r in singles)
    assert res_b.task_iterations.tolist() == [r.iterations for r in singles]
    assert res_b.iterations == max(r.iterations for r in singles)
    for i, r in enumerate(singles):
        x_b = res_b.x[i] if isinstance(res_b.x, torch.Tensor) else res_b.x
        assert torch.allclose(x_b, r.x, rtol=0, atol=atol), (i, x_b, r.x)
        assert torch.allclose(res_b.grad_norm[i], r.grad_norm, rtol=1e-9, atol=1e-15)
        if r.value is not None:
            assert torch.allclose(res_b.value[i], r.value, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "solver",
    [
        GradientDescent(lr=1.0, maxiter=200, rtol=1e-6),
        GradientDescent(lr=0.5, maxiter=200, momentum=0.5, nesterov=True, rtol=1e-6),
        Adam(lr=0.2, maxiter=200, rtol=1e-4),
    ],
    ids=["gd", "gd_nesterov", "adam"],
)
def test_batched_first_order_equals_single_task(solver) -> None:
    hs, bs = _quadratic_tasks()
    x0 = torch.zeros(3, 4, dtype=torch.float64)
    res = solver(quadratic, x0, hs, bs, batched=True)
    singles = [solver(quadratic, x0[i], hs[i], bs[i]) for i in range(3)]
    _compare(res, singles)
    statuses = {r.status for r in singles}
    # The budget is chosen so that the tasks finish differently (some converge early,
    # the worst-conditioned may not): per-task bookkeeping is really exercised.
    assert len({r.iterations for r in singles}) > 1
    assert Status.SUCCESS in statuses
    assert res.status is (Status.SUCCESS if statuses == {Status.SUCCESS} else Status.MAX_ITERATIONS)


def test_batched_gd_without_tol_completes_every_task() -> None:
    hs, bs = _quadratic_tasks()
    x0 = torch.zeros(3, 4, dtype=torch.float64)
    solver = Adam(lr=0.01, steps=25, monitor=True)
    res = solver(quadratic, x0, hs, bs, batched=True)
    singles = [solver(quadratic, x0[i], hs[i], bs[i]) for i in range(3)]
    _compare(res, singles)
    assert res.status is Status.COMPLETED and res.task_status == (Status.COMPLETED,) * 3
    assert res.task_iterations.tolist() == [25, 25, 25]


def test_batched_newton_cg_equals_single_task() -> None:
    a, y = logistic_problem()
    lams = torch.tensor([1.0, 0.1, 0.003], dtype=torch.float64)  # increasingly ill-conditioned

    def batched_obj(w, a, y, lams):
        return logistic_torch(w, a, y, lams)

    w0 = torch.zeros(3, 5, dtype=torch.float64)
    solver = NewtonCG(rtol=1e-10)
    res = solver(batched_obj, w0, a, y, lams, batched=True)
    singles = [solver(logistic_torch, w0[i], a, y, float(lams[i])) for i in range(3)]
    assert all(r.status is Status.SUCCESS for r in singles)
    assert len({r.iterations for r in singles}) > 1
    _compare(res, singles, atol=1e-10)
    assert res.status is Status.SUCCESS


def test_batched_newton_cg_per_task_line_search_failure() -> None:
    # Task 1 has a jump of +10 for any move that lowers its coordinate sum below its start,
    # which is exactly what its Newton direction does: no step decreases f.  The other
    # tasks must be unaffected and reach their minimisers.
    hs, bs = _quadratic_tasks()
    x0 = torch.ones(3, 4, dtype=torch.float64)
    s0 = x0.sum(-1)

    def obj(x, hs, bs):
        jump = 10.0 * (x.sum(-1) < s0).to(x.dtype) * torch.tensor([0.0, 1.0, 0.0], dtype=x.dtype)
        return 0.5 * (x * x).sum(-1) + jump

    res = NewtonCG(rtol=1e-10)(obj, x0, hs, bs, batched=True)
    assert res.task_status == (Status.SUCCESS, Status.LINESEARCH_FAILED, Status.SUCCESS)
    assert res.status is Status.LINESEARCH_FAILED
    assert torch.equal(res.x[1], x0[1])  # the failed task stays at its last point
    assert res.task_iterations.tolist() == [1, 0, 1]  # Newton on 0.5||x||^2: one step
    assert torch.allclose(res.x[[0, 2]], torch.zeros(2, 4, dtype=torch.float64), atol=1e-12)


def test_batched_fixed_point_equals_single_task() -> None:
    # x = M x + c with spectral norms 0.1, 0.5, 0.9: per-task iteration counts differ.
    g = torch.Generator().manual_seed(3)
    ms = []
    for rho in (0.1, 0.5, 0.9):
        m = torch.randn(4, 4, generator=g, dtype=torch.float64)
        ms.append(rho * m / torch.linalg.matrix_norm(m, ord=2))
    ms = torch.stack(ms)
    cs = torch.randn(3, 4, generator=g, dtype=torch.float64)

    def fn(x, ms, cs):
        return torch.einsum("...ij,...j->...i", ms, x) + cs

    solver = FixedPointIteration(rtol=1e-12, maxiter=500, relaxation=0.9)
    x0 = torch.zeros(3, 4, dtype=torch.float64)
    res = solver(fn, x0, ms, cs, batched=True)
    singles = [solver(fn, x0[i], ms[i], cs[i]) for i in range(3)]
    _compare(res, singles)
    assert all(r.status is Status.SUCCESS for r in singles)
    its = [r.iterations for r in singles]
    assert its[0] < its[1] < its[2]
    xs = torch.linalg.solve(torch.eye(4, dtype=torch.float64) - ms, cs)
    assert torch.allclose(res.x, xs, atol=1e-10)


def test_batched_tree_input() -> None:
    # A tuple tree whose leaves both carry the task dimension.
    hs, bs = _quadratic_tasks()

    def obj(p, hs, bs):
        x = torch.cat([p[0], p[1]], dim=-1)
        return quadratic(x, hs, bs)

    x0 = (torch.zeros(3, 1, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64))
    res = NewtonCG(rtol=1e-10)(obj, x0, hs, bs, batched=True)
    assert isinstance(res.x, tuple) and res.x[0].shape == (3, 1) and res.x[1].shape == (3, 3)
    assert res.status is Status.SUCCESS
    xs = torch.linalg.solve(hs, bs)
    assert torch.allclose(torch.cat(res.x, dim=-1), xs, atol=1e-9)
