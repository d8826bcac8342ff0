"""FixedPointIteration against closed-form fixed points."""

from __future__ import annotations

import math

import pytest
import torch

from bilevel import BilevelValueError, Status
from bilevel._tree import default_tol
from bilevel.solvers import FixedPointIteration
from tests.registry import solvers


def _contraction(rho: float, seed: int = 0, d: int = 5):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    m = rho * m / torch.linalg.matrix_norm(m, ord=2)
    c = torch.randn(d, generator=g, dtype=torch.float64)
    xs = torch.linalg.solve(torch.eye(d, dtype=torch.float64) - m, c)
    return m, c, xs


def _affine(x, m, c):
    return m @ x + c


def test_contraction_reaches_closed_form_fixed_point() -> None:
    rho = 0.8
    m, c, xs = _contraction(rho)
    res = FixedPointIteration()(_affine, torch.zeros(5, dtype=torch.float64), m, c)
    assert res.status is Status.SUCCESS
    r = float((_affine(res.x, m, c) - res.x).norm())
    assert float(res.grad_norm) == pytest.approx(r, rel=1e-12, abs=1e-300)
    tol = default_tol(torch.float64)
    assert r <= tol * max(1.0, float(res.x.norm()))
    # Banach: ||x - x*|| <= ||fn(x) - x|| / (1 - rho).
    assert float((res.x - xs).norm()) <= r / (1 - rho) * (1 + 1e-9)
    # Error contracts by rho per step from ||x0 - x*||: iterations bounded accordingly.
    bound = math.log(tol * (1 - rho) / float(xs.norm())) / math.log(rho) + 3
    assert res.iterations <= bound
    assert res.n_fun == res.iterations + 1 and res.n_grad == 0 and res.value is None


def test_damping_makes_a_rotation_converge() -> None:
    # fn = rotation by 90 degrees about p: non-expansive, plain iteration cycles with period 4,
    # the averaged (Krasnosel'skii-Mann) iteration converges to p.
    p = torch.tensor([1.0, -2.0], dtype=torch.float64)
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)

    def fn(x):
        return rot @ (x - p) + p

    x0 = torch.zeros(2, dtype=torch.float64)
    plain = FixedPointIteration(maxiter=40)(fn, x0)
    assert plain.status is Status.MAX_ITERATIONS and plain.iterations == 40
    assert torch.allclose(plain.x, x0, atol=1e-12)  # 40 = 10 full turns
    damped = FixedPointIteration(maxiter=500, relaxation=0.5)(fn, x0)
    assert damped.status is Status.SUCCESS
    assert torch.allclose(damped.x, p, atol=1e-10)


def test_nonfinite_map_reports_nonfinite_and_keeps_last_good_iterate() -> None:
    # fn(x) = x + 1 below 5, NaN from 5 on: iterates 0, 1, 2, 3, 4 have finite images; the
    # next one (5) does not, so the solve stops at x = 4 after 4 iterations, residual 1.
    def fn(x):
        return torch.where(x < 5, x + 1.0, torch.nan)

    res = FixedPointIteration(maxiter=100)(fn, torch.zeros(1, dtype=torch.float64))
    assert res.status is Status.NONFINITE and not res.success
    assert res.iterations == 4 and float(res.x) == 4.0 and float(res.grad_norm) == 1.0
    assert res.n_fun == 6


def test_divergence_reports_nonfinite() -> None:
    res = FixedPointIteration(maxiter=100)(lambda x: x * x + 1.0, torch.ones(1, dtype=torch.float64))
    assert res.status is Status.NONFINITE and not res.success
    assert torch.isfinite(res.x).all() and torch.isfinite(res.grad_norm)


def test_tree_and_float32() -> None:
    m, c, xs = _contraction(0.5, seed=1, d=4)
    m, c, xs = m.float(), c.float(), xs.float()

    def fn(t):
        x = torch.cat([t["a"], t["b"].reshape(-1)])
        y = m @ x + c
        return {"a": y[:2], "b": y[2:].reshape(1, 2)}

    x0 = {"a": torch.zeros(2), "b": torch.zeros(1, 2)}
    res = FixedPointIteration()(fn, x0)
    assert res.status is Status.SUCCESS
    assert res.x["b"].shape == (1, 2) and res.x["a"].dtype == torch.float32
    x = torch.cat([res.x["a"], res.x["b"].reshape(-1)])
    assert torch.allclose(x, xs, atol=1e-5)


def test_wrong_output_structure_rejected() -> None:
    with pytest.raises(ValueError, match="shaped like x0"):
        FixedPointIteration()(lambda t: t[0], (torch.zeros(2), torch.zeros(2)))


def test_batched_nonfinite_per_task() -> None:
    x0 = torch.tensor([[0.5], [1.0]], dtype=torch.float64)
    # task 0: x -> x/2 (converges to 0); task 1: x -> x^2 + 1 (diverges).
    res = FixedPointIteration(maxiter=200)(
        lambda x: torch.cat([x[:1] / 2, x[1:] ** 2 + 1.0]), x0, batched=True
    )
    assert res.task_status == (Status.SUCCESS, Status.NONFINITE)
    assert res.status is Status.NONFINITE
    assert torch.isfinite(res.x).all()


@pytest.mark.parametrize("solver", solvers("inner", tags={"fixed_point"}))
def test_a_wrongly_shaped_fn_output_names_both_shapes(solver) -> None:
    b = torch.randn(3, 1)  # a column by mistake: fn broadcasts (3,) to (3, 3)
    with pytest.raises(BilevelValueError, match=r"fn must return a tree shaped like x0 \(a tensor of shape \(3,\)\), "
                                                r"got a tensor of shape \(3, 3\)"):
        solver(lambda z, b: torch.tanh(z + b), torch.zeros(3), b)


@pytest.mark.parametrize("solver", solvers("inner", tags={"fixed_point"}))
def test_the_iterate_keeps_x0_s_dtype_when_fn_promotes(solver) -> None:
    """A float64 argument (or autocast) changes fn's output dtype; every solver iterates in
    x0's, as the layer returns x* in it."""
    res = solver(lambda x, a: 0.5 * x + a, torch.zeros(2), torch.ones(2, dtype=torch.float64))
    assert res.x.dtype == torch.float32 and res.success
    torch.testing.assert_close(res.x, torch.full((2,), 2.0), rtol=1e-5, atol=0)


@pytest.mark.parametrize("solver", solvers("inner", tags={"fixed_point"}))
def test_residual_history_starts_at_x0_and_ends_at_the_result(solver) -> None:
    m, c, _ = _contraction(0.8, seed=3)
    x0 = torch.zeros(5, dtype=torch.float64)
    res = solver(_affine, x0, m, c)
    h = res.residual_history
    assert res.status is Status.SUCCESS
    assert h.shape == (res.iterations + 1,) and h.dtype == torch.float64
    # Entry 0 is ||fn(x0) - x0||, computed here independently; the last is the result's.
    assert float(h[0]) == pytest.approx(float(torch.linalg.vector_norm(_affine(x0, m, c) - x0)), rel=1e-12)
    assert float(h[-1]) == pytest.approx(float(res.grad_norm), rel=1e-12)
    # The history is that of the returned iterate: its last entry is the residual of res.x.
    assert float(h[-1]) == pytest.approx(float(torch.linalg.vector_norm(_affine(res.x, m, c) - res.x)), rel=1e-6, abs=1e-13)
    assert float(h[-1]) < 1e-6 * float(h[0])


@pytest.mark.parametrize("solver", solvers("inner", tags={"fixed_point"}))
def test_batched_residual_history_is_each_task_s_own(solver) -> None:
    """Column b of the batched history is task b's unbatched history, then its last value
    repeated while the other tasks still iterate."""
    tasks = [_contraction(rho, seed=s) for rho, s in ((0.3, 1), (0.9, 2))]
    m = torch.stack([t[0] for t in tasks])
    c = torch.stack([t[1] for t in tasks])
    x0 = torch.zeros(2, 5, dtype=torch.float64)
    batched = solver(torch.vmap(_affine), x0, m, c, batched=True)
    h = batched.residual_history
    assert h.shape == (batched.iterations + 1, 2)
    for b in range(2):
        own = solver(_affine, x0[b], m[b], c[b]).residual_history
        n = int(batched.task_iterations[b])
        assert own.shape == (n + 1,)
        torch.testing.assert_close(h[: n + 1, b], own, rtol=1e-9, atol=1e-14)
        assert torch.equal(h[n:, b], h[n, b].expand(h.shape[0] - n))


@pytest.mark.parametrize("solver", solvers("inner", tags={"fixed_point"}))
def test_residual_history_of_a_non_finite_map_holds_the_last_finite_residuals(solver) -> None:
    def jumps(x: torch.Tensor) -> torch.Tensor:  # NaN once the iterate passes 3
        return torch.where(x > 3, torch.full_like(x, float("nan")), x + 1.0)

    res = solver(jumps, torch.zeros(2, dtype=torch.float64))
    assert res.status is Status.NONFINITE
    assert res.residual_history.shape == (res.iterations + 1,)
    assert torch.isfinite(res.residual_history).all()
    assert float(res.residual_history[-1]) == float(res.grad_norm)


def test_broyden_root_history_is_the_norm_of_f() -> None:
    from bilevel.solvers import Broyden

    res = Broyden(initial_jacobian=12.0, rtol=1e-12).root(lambda x: x**3 - 2.0, torch.ones(2, dtype=torch.float64))
    h = res.residual_history
    assert res.status is Status.SUCCESS and h.shape == (res.iterations + 1,)
    assert float(h[0]) == pytest.approx(math.sqrt(2.0), rel=1e-12)  # ||1 - 2|| over two entries
    assert float(h[-1]) == pytest.approx(float(res.grad_norm), rel=1e-12) and float(h[-1]) < 1e-10


def test_the_other_solvers_have_no_residual_history() -> None:
    from bilevel.solvers import GradientDescent

    res = GradientDescent(lr=0.1, steps=3)(lambda x: (x**2).sum(), torch.ones(2, dtype=torch.float64))
    assert res.residual_history is None
