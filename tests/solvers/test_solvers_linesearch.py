"""Line searches satisfy the conditions they promise, on random problems (hypothesis)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bilevel._autodiff import value_and_grad
from bilevel._tree import tree_axpy, tree_vdot
from bilevel.solvers import BacktrackingArmijo, StrongWolfe
from tests.problems import logistic_problem, logistic_torch, quadratic, spd_matrix

# Hypothesis's failure reporting touches a deprecated mypy_extensions API; with warnings as
# errors that would turn a failing example into a pytest INTERNALERROR instead of a report.
pytestmark = pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None)


def _random_problem(seed: int, kind: str, cond: float):
    """A random objective (quadratic or logistic), a point, and a descent direction
    ``d = -M g`` with ``M`` random SPD (so ``g.d < 0`` but ``d`` is not ``-g``)."""
    rng = np.random.default_rng(seed)
    if kind == "quadratic":
        d = 6
        h = spd_matrix(d, cond, seed)
        b = torch.tensor(rng.normal(size=d))
        fn, args = quadratic, (h, b)
        x = torch.tensor(rng.normal(size=d) * 3)
    else:
        a, y = logistic_problem(seed=seed % 7)
        d = 5
        fn, args = logistic_torch, (a, y)
        x = torch.tensor(rng.normal(size=d) * 2)
    m = spd_matrix(d, cond, seed + 1)
    f0, g0 = value_and_grad(fn, x, args)
    direction = -(m @ g0) * float(rng.uniform(0.05, 20.0))  # random scale: steps of all sizes
    return fn, args, x, direction, f0, g0


problems = st.tuples(
    st.integers(0, 2**31 - 1),
    st.sampled_from(["quadratic", "logistic"]),
    st.sampled_from([1.0, 10.0, 1e3]),
)


def _phi(fn, args, x, d, a):
    return float(fn(x + a * d, *args))


@SETTINGS
@given(problems, st.sampled_from([1e-4, 0.3, 0.45]), st.sampled_from([0.5, 0.1]))
def test_armijo_sufficient_decrease_and_maximal_step(problem, c1: float, shrink: float) -> None:
    seed, kind, cond = problem
    fn, args, x, d, f0, g0 = _random_problem(seed, kind, cond)
    slope = float(tree_vdot(g0, d))
    assert slope < 0
    ls = BacktrackingArmijo(c1=c1, shrink=shrink, maxiter=60, noise=0.0)  # the exact textbook test
    res = ls(fn, x, d, args, f0=f0, g0=g0)
    assert bool(res.success)
    a = float(res.step)
    assert a > 0
    f_new = _phi(fn, args, x, d, a)
    assert float(res.value) == f_new
    assert torch.allclose(res.x, x + a * d, rtol=1e-15, atol=0)
    assert f_new <= float(f0) + ls.c1 * a * slope
    # Backtracking returns the *first* acceptable step: the previous trial was not.
    if a < ls.initial_step:
        prev = a / ls.shrink
        f_prev = _phi(fn, args, x, d, prev)
        assert not f_prev <= float(f0) + ls.c1 * prev * slope
    assert res.n_fun == 1 + round(math.log(ls.initial_step / a, 1 / ls.shrink))


@pytest.mark.parametrize("c1", [1e-4, 0.25, 0.49])
@pytest.mark.parametrize("h", [0.3, 1.0, 7.0, 1e3])
def test_armijo_closed_form_step_on_1d_quadratic(c1: float, h: float) -> None:
    # phi(a) = f(1 - a h) for f(x) = h x^2 / 2: Armijo holds iff a <= 2 (1 - c1) / h, so
    # backtracking from 1 by halving returns the largest 2^-k below that bound.
    def fn(x):
        return 0.5 * h * (x * x).sum()

    x = torch.ones(1, dtype=torch.float64)
    f0, g0 = value_and_grad(fn, x, ())
    res = BacktrackingArmijo(c1=c1, noise=0.0)(fn, x, -g0, f0=f0, g0=g0)
    bound = 2 * (1 - c1) / h
    k = max(0, math.ceil(math.log2(1 / bound) - 1e-12))
    assert float(res.step) == 2.0**-k
    assert res.n_fun == k + 1


@SETTINGS
@given(problems)
def test_armijo_default_noise_allowance_is_bounded(problem) -> None:
    seed, kind, cond = problem
    fn, args, x, d, f0, g0 = _random_problem(seed, kind, cond)
    ls = BacktrackingArmijo()
    res = ls(fn, x, d, args, f0=f0, g0=g0)
    assert bool(res.success)
    a = float(res.step)
    eps_f = ls.noise * torch.finfo(torch.float64).eps * abs(float(f0))
    assert _phi(fn, args, x, d, a) <= float(f0) + ls.c1 * a * float(tree_vdot(g0, d)) + eps_f


@SETTINGS
@given(problems, st.sampled_from([(1e-4, 0.9), (1e-4, 0.1), (0.3, 0.5), (0.45, 0.9)]))
def test_strong_wolfe_conditions(problem, constants) -> None:
    seed, kind, cond = problem
    c1, c2 = constants
    fn, args, x, d, f0, g0 = _random_problem(seed, kind, cond)
    slope = float(tree_vdot(g0, d))
    ls = StrongWolfe(c1=c1, c2=c2, noise=0.0)
    res = ls(fn, x, d, args, f0=f0, g0=g0)
    assert bool(res.success)
    a = float(res.step)
    assert a > 0
    # Recompute value and gradient at the accepted step independently (plain autograd).
    xa = (x + a * d).requires_grad_(True)
    fa = fn(xa, *args)
    (ga,) = torch.autograd.grad(fa, xa)
    fa = fa.detach()
    assert float(fa) <= float(f0) + ls.c1 * a * slope  # sufficient decrease
    assert abs(float(ga @ d)) <= c2 * abs(slope)  # strong curvature
    assert float(res.value) == float(fa)
    assert torch.allclose(res.grad, ga, rtol=1e-12, atol=1e-14)
    assert res.n_fun == res.n_grad <= ls.maxiter


@SETTINGS
@given(problems)
def test_strong_wolfe_default_noise_conditions(problem) -> None:
    seed, kind, cond = problem
    fn, args, x, d, f0, g0 = _random_problem(seed, kind, cond)
    slope = float(tree_vdot(g0, d))
    ls = StrongWolfe()
    res = ls(fn, x, d, args, f0=f0, g0=g0)
    assert bool(res.success)
    a = float(res.step)
    fa = _phi(fn, args, x, d, a)
    da = float(tree_vdot(res.grad, d))
    eps_f = ls.noise * torch.finfo(torch.float64).eps * abs(float(f0))
    assert abs(da) <= ls.c2 * abs(slope)
    exact = fa <= float(f0) + ls.c1 * a * slope
    approximate = fa <= float(f0) + eps_f and da <= (2 * ls.c1 - 1) * slope
    assert exact or approximate


@pytest.mark.parametrize("c1, c2", [(0.45, 0.9), (1e-4, 0.1), (0.2, 0.3)])
@pytest.mark.parametrize("h", [0.5, 1.5, 1.8, 10.0, 1e3])
def test_strong_wolfe_closed_form_interval_on_1d_quadratic(c1: float, c2: float, h: float) -> None:
    # phi(a) = f(1 - a h), f(x) = h x^2 / 2: phi'(a) = -h^2 (1 - a h), so strong Wolfe holds
    # exactly for a in [(1 - c2) / h, min((1 + c2) / h, 2 (1 - c1) / h)].
    def fn(x):
        return 0.5 * h * (x * x).sum()

    x = torch.ones(1, dtype=torch.float64)
    f0, g0 = value_and_grad(fn, x, ())
    res = StrongWolfe(c1=c1, c2=c2, noise=0.0)(fn, x, -g0, f0=f0, g0=g0)
    assert bool(res.success)
    lo, hi = (1 - c2) / h, min((1 + c2) / h, 2 * (1 - c1) / h)
    assert lo * (1 - 1e-12) <= float(res.step) <= hi * (1 + 1e-12)


def test_strong_wolfe_on_a_tree_matches_closed_form_quadratic_step() -> None:
    # phi(a) = f(x + a d) on a separable quadratic over a dict tree; the exact minimiser
    # along d is a* = -g.d / d.H.d, where phi'(a*) = 0: a search with c2 small must land
    # close to it (|phi'(a)| <= c2 |phi'(0)| means |a - a*| <= c2 |phi'(0)| / d.H.d).
    h = {"u": torch.tensor([1.0, 10.0], dtype=torch.float64), "v": torch.tensor([[100.0]], dtype=torch.float64)}

    def fn(p):
        return 0.5 * sum((h[k] * p[k] ** 2).sum() for k in p)

    x = {"u": torch.tensor([1.0, -1.0], dtype=torch.float64), "v": torch.tensor([[0.5]], dtype=torch.float64)}
    f0, g0 = value_and_grad(fn, x, ())
    d = {k: -v for k, v in g0.items()}
    slope = float(tree_vdot(g0, d))
    dhd = float(sum((h[k] * d[k] ** 2).sum() for k in d))
    a_star = -slope / dhd
    c2 = 0.01
    res = StrongWolfe(c2=c2)(fn, x, d, f0=f0, g0=g0)
    assert bool(res.success)
    assert abs(float(res.step) - a_star) <= c2 * abs(slope) / dhd * (1 + 1e-9)
    assert isinstance(res.x, dict) and res.x["v"].shape == (1, 1)
    expected = tree_axpy(float(res.step), d, x)
    for k in x:
        assert torch.allclose(res.x[k], expected[k], rtol=1e-15, atol=0)


def test_batched_armijo_matches_per_task_searches() -> None:
    # Three tasks with different conditioning: each backtracks on its own, the ones that
    # accepted keep their step while the others shrink.
    hs = torch.stack([spd_matrix(4, c, 3 + i) for i, c in enumerate([1.0, 30.0, 1e3])])
    bs = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    f0, g0 = value_and_grad(quadratic, x, (hs, bs), batched=True)
    d = -g0
    ls = BacktrackingArmijo()
    res = ls(quadratic, x, d, (hs, bs), f0=f0, g0=g0, batched=True)
    assert res.success.shape == (3,) and bool(res.success.all())
    steps = []
    for i in range(3):
        fi, gi = value_and_grad(quadratic, x[i], (hs[i], bs[i]))
        ri = ls(quadratic, x[i], -gi, (hs[i], bs[i]), f0=fi, g0=gi)
        steps.append(float(ri.step))
        assert torch.allclose(res.x[i], ri.x, rtol=1e-14, atol=1e-14)
        assert torch.allclose(res.value[i], ri.value, rtol=1e-14, atol=0)
    assert res.step.tolist() == steps
    assert len(set(steps)) > 1  # the tasks really did need different steps
    # inactive tasks do not move and count as successful
    active = torch.tensor([True, False, True])
    res2 = ls(quadratic, x, d, (hs, bs), f0=f0, g0=g0, batched=True, active=active)
    assert torch.equal(res2.x[1], x[1]) and float(res2.step[1]) == 0.0 and bool(res2.success[1])


# -- failures are reported, not raised -----------------------------------------------------
def _bowl(x):
    return 0.5 * (x * x).sum()


@pytest.mark.parametrize("ls", [BacktrackingArmijo(), StrongWolfe()], ids=["armijo", "wolfe"])
def test_uphill_direction_fails_without_evaluations(ls) -> None:
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    f0, g0 = value_and_grad(_bowl, x, ())
    res = ls(_bowl, x, g0, f0=f0, g0=g0)  # d = +g: uphill
    assert not bool(res.success)
    assert res.n_fun == 0 and float(res.step) == 0.0 and torch.equal(res.x, x)


@pytest.mark.parametrize("ls", [BacktrackingArmijo(), StrongWolfe()], ids=["armijo", "wolfe"])
def test_nan_along_direction_fails(ls) -> None:
    x0 = torch.tensor([1.0, 2.0], dtype=torch.float64)

    def fn(x):  # finite only at x0 itself
        return torch.where((x - x0).abs().sum() > 0, torch.nan, _bowl(x))

    f0, g0 = value_and_grad(fn, x0, ())
    assert torch.isfinite(f0) and torch.isfinite(g0).all()
    res = ls(fn, x0, -g0, f0=f0, g0=g0)
    assert not bool(res.success)
    assert res.n_fun == ls.maxiter
    assert torch.equal(res.x, x0) and float(res.value) == float(f0)


def test_strong_wolfe_fails_on_linear_function() -> None:
    # phi'(a) = phi'(0) for all a: the curvature condition never holds (no minimiser).
    def fn(x):
        return x.sum()

    x = torch.zeros(3, dtype=torch.float64)
    f0, g0 = value_and_grad(fn, x, ())
    res = StrongWolfe(maxiter=10)(fn, x, -g0, f0=f0, g0=g0)
    assert not bool(res.success) and res.n_fun == 10


def test_strong_wolfe_rejects_batched() -> None:
    x = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(NotImplementedError):
        StrongWolfe()(_bowl, x, x, f0=torch.zeros(2), g0=x, batched=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda: BacktrackingArmijo(c1=0.0),
        lambda: BacktrackingArmijo(c1=1.0),
        lambda: BacktrackingArmijo(shrink=1.0),
        lambda: BacktrackingArmijo(shrink=0),
        lambda: BacktrackingArmijo(maxiter=0),
        lambda: BacktrackingArmijo(maxiter=2.5),
        lambda: BacktrackingArmijo(initial_step=-1.0),
        lambda: BacktrackingArmijo(noise=-1.0),
        lambda: StrongWolfe(c1=0.5, c2=0.4),
        lambda: StrongWolfe(c2=1.0),
        lambda: StrongWolfe(c1=float("nan")),
        lambda: StrongWolfe(maxiter=0),
    ],
)
def test_line_search_bad_arguments(make) -> None:
    with pytest.raises(ValueError):
        make()
