"""Anderson acceleration against closed-form fixed points, and against plain iteration."""

from __future__ import annotations

import dataclasses
import importlib
import math

import pytest
import torch

import bilevel
from bilevel import BilevelValueError, Status
from bilevel._tree import default_tol
from bilevel.solvers import Anderson, FixedPointIteration, Solver

DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]
DOTTIE = 0.7390851332151607  # the root of x = cos(x)


def _slack(dtype: torch.dtype) -> float:
    """Rounding allowance of a recomputed residual, relative to the size of the terms."""
    return 50 * torch.finfo(dtype).eps


def _symmetric_contraction(rho: float, d: int = 30, seed: int = 0, dtype: torch.dtype = torch.float64):
    """``M = Q diag(lam) Q^T`` with ``lam`` evenly spread over ``[0, rho]``: plain iteration
    contracts the slowest mode by exactly ``rho`` per step; ``||(I - M)^-1|| = 1 / (1 - rho)``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    m = q @ torch.diag(torch.linspace(0.0, rho, d, dtype=torch.float64)) @ q.T
    c = torch.randn(d, generator=g, dtype=torch.float64)
    xs = torch.linalg.solve(torch.eye(d, dtype=torch.float64) - m, c)
    return m.to(dtype), c.to(dtype), xs


def _affine(x, m, c):
    return m @ x + c


# -- closed forms ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_contraction_reaches_the_closed_form(dtype) -> None:
    rho = 0.9
    m, c, xs = _symmetric_contraction(rho, dtype=dtype)
    res = Anderson()(_affine, torch.zeros(30, dtype=dtype), m, c)
    assert res.status is Status.SUCCESS and res.success
    assert res.x.dtype == dtype and res.x.shape == (30,)
    r = float((_affine(res.x, m, c) - res.x).norm())
    assert float(res.grad_norm) == pytest.approx(r, rel=1e-6)
    assert r <= default_tol(dtype) * max(1.0, float(res.x.norm()))
    # ||x - x*|| <= ||(I - M)^-1|| ||r_true||, r_true = the computed r up to rounding.
    r_true = r + _slack(dtype) * (float(res.x.norm()) + float(c.norm()))
    assert float((res.x.double() - xs).norm()) <= r_true / (1 - rho)
    assert res.n_fun == res.iterations + 1 and res.n_grad == 0 and res.value is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_cos_reaches_the_dottie_number(dtype) -> None:
    x0 = torch.linspace(-3.0, 3.0, 7, dtype=dtype)
    res = Anderson()(torch.cos, x0)
    assert res.status is Status.SUCCESS
    r = float((torch.cos(res.x) - res.x).norm())
    assert r <= default_tol(dtype) * max(1.0, float(res.x.norm()))
    # |x - x*| <= |cos x - x| / (1 - L), L = sin(x*) + a margin: |cos' | <= 0.68 near x*.
    err = (res.x.double() - DOTTIE).abs().max()
    assert float(err) <= (r + _slack(dtype)) / (1 - 0.68)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fewer_iterations_than_plain_iteration_on_a_slow_contraction(dtype) -> None:
    # Contraction factor 0.95: plain iteration needs ~log(tol) / log(0.95) steps; Anderson
    # on an affine map is a (truncated) GMRES, whose rate on a spectrum in [0, 0.95] is
    # that of a Chebyshev polynomial, ~(1 - sqrt(0.05)) / (1 + sqrt(0.05)) per step for
    # a long enough memory.
    m, c, xs = _symmetric_contraction(0.95, d=50, dtype=dtype)
    x0 = torch.zeros(50, dtype=dtype)
    plain = FixedPointIteration(maxiter=5000)(_affine, x0, m, c)
    fast = Anderson()(_affine, x0, m, c)
    assert plain.status is Status.SUCCESS and fast.status is Status.SUCCESS
    assert fast.iterations <= plain.iterations / 3, (fast.iterations, plain.iterations)
    tol = 10 * default_tol(dtype) / (1 - 0.95) * float(xs.norm())
    assert float((fast.x.double() - xs).norm()) <= tol


def test_memory_one_is_relaxed_fixed_point_iteration() -> None:
    m, c, _ = _symmetric_contraction(0.8, d=10)
    x0 = torch.zeros(10, dtype=torch.float64)
    for t in (1.0, 0.6):
        a = Anderson(m=1, relaxation=t)(_affine, x0, m, c)
        p = FixedPointIteration(relaxation=t)(_affine, x0, m, c)
        assert (a.status, a.iterations, a.n_fun) == (p.status, p.iterations, p.n_fun)
        torch.testing.assert_close(a.x, p.x, rtol=1e-14, atol=1e-14)


# -- batches and trees ---------------------------------------------------------------------
def _batched_affine(x, m, c):
    return torch.einsum("bij,bj->bi", m, x) + c


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_equals_one_task_solves(dtype) -> None:
    systems = [_symmetric_contraction(rho, d=12, seed=i, dtype=dtype) for i, rho in enumerate((0.3, 0.8, 0.95))]
    m = torch.stack([s[0] for s in systems])
    c = torch.stack([s[1] for s in systems])
    x0 = torch.zeros(3, 12, dtype=dtype)
    solver = Anderson(m=3)
    res = solver(_batched_affine, x0, m, c, batched=True)
    singles = [solver(_affine, x0[i], m[i], c[i]) for i in range(3)]
    assert res.task_status == (Status.SUCCESS,) * 3 and res.status is Status.SUCCESS
    iters = res.task_iterations.tolist()
    assert len(set(iters)) == 3, iters  # each task stops when it converges
    assert res.iterations == max(iters) and res.n_fun == max(iters) + 1
    assert res.grad_norm.shape == (3,)
    for i, single in enumerate(singles):
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(res.x[i], single.x, rtol=tol, atol=tol)
        if dtype == torch.float64:  # float32 rounding may move a task's stop by a step
            assert iters[i] == single.iterations
        assert float(res.grad_norm[i]) <= default_tol(dtype) * max(1.0, float(res.x[i].norm()))


def test_a_converged_task_does_not_move() -> None:
    m, c, xs = _symmetric_contraction(0.5, d=4)
    ms, cs = torch.stack([m, m]), torch.stack([c, c])
    x0 = torch.stack([xs, torch.zeros(4, dtype=torch.float64)])
    res = Anderson()(_batched_affine, x0, ms, cs, batched=True)
    assert res.task_status == (Status.SUCCESS, Status.SUCCESS)
    assert res.task_iterations.tolist()[0] == 0 and res.task_iterations.tolist()[1] > 0
    assert torch.equal(res.x[0], xs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_tree_inputs(dtype, kind) -> None:
    m, c, xs = _symmetric_contraction(0.7, d=5, seed=3, dtype=dtype)

    def pack(v):
        a, b = v[..., :2], v[..., 2:].reshape(*v.shape[:-1], 1, 3)
        return (a, b) if kind == "tuple" else {"a": a, "b": b}

    def unpack(t):
        a, b = (t[0], t[1]) if kind == "tuple" else (t["a"], t["b"])
        return torch.cat([a, b.reshape(*b.shape[:-2], 3)], dim=-1)

    def fn(t):
        return pack(unpack(t) @ m.T + c)

    res = Anderson()(fn, pack(torch.zeros(5, dtype=dtype)))
    assert res.status is Status.SUCCESS
    assert type(res.x) is (tuple if kind == "tuple" else dict)
    leaves = res.x if kind == "tuple" else tuple(res.x.values())
    assert [tuple(t.shape) for t in leaves] == [(2,), (1, 3)] and all(t.dtype == dtype for t in leaves)
    tol = 10 * default_tol(dtype) / (1 - 0.7) * float(xs.norm())
    assert float((unpack(res.x).double() - xs).norm()) <= tol
    # The same tree with a task dimension: 2 tasks.
    batched = Anderson()(fn, pack(torch.zeros(2, 5, dtype=dtype)), batched=True)
    assert batched.task_status == (Status.SUCCESS, Status.SUCCESS)
    torch.testing.assert_close(unpack(batched.x), unpack(res.x).expand(2, 5), rtol=tol, atol=tol)


# -- honest failures -----------------------------------------------------------------------
def test_a_map_without_fixed_point_is_never_success() -> None:
    # x -> x^2 + 1 has no real fixed point (x^2 - x + 1 > 0): diverges or stalls.
    res = Anderson(maxiter=200)(lambda x: x * x + 1.0, torch.ones(1, dtype=torch.float64))
    assert res.status in (Status.NONFINITE, Status.MAX_ITERATIONS) and not res.success
    assert torch.isfinite(res.x).all() and torch.isfinite(res.grad_norm)
    # A translation: every residual is 1 (a singular Gram matrix, kept invertible by the
    # regularisation).
    res = Anderson(maxiter=50)(lambda x: x + 1.0, torch.zeros(3, dtype=torch.float64))
    assert res.status is Status.MAX_ITERATIONS and res.iterations == 50
    assert float(res.grad_norm) == pytest.approx(math.sqrt(3.0))
    assert torch.isfinite(res.x).all()


def test_nonfinite_map_keeps_the_last_finite_iterate() -> None:
    def fn(x):
        return torch.where(x < 5, x + 1.0, torch.nan)

    res = Anderson(maxiter=1000)(fn, torch.zeros(1, dtype=torch.float64))
    assert res.status is Status.NONFINITE and not res.success
    assert float(res.x) < 5 and float(res.grad_norm) == 1.0
    assert res.n_fun == res.iterations + 2  # x0, the iterates, and the rejected point


def test_batched_failure_is_per_task() -> None:
    x0 = torch.tensor([[0.5], [1.0]], dtype=torch.float64)
    res = Anderson(maxiter=200)(lambda x: torch.cat([x[:1] / 2 + 1.0, x[1:] ** 2 + 1.0]), x0, batched=True)
    assert res.task_status[0] is Status.SUCCESS
    assert res.task_status[1] in (Status.NONFINITE, Status.MAX_ITERATIONS)
    assert res.status is res.task_status[1]
    assert float(res.x[0]) == pytest.approx(2.0, abs=1e-10) and torch.isfinite(res.x).all()


def test_maxiter_zero_returns_x0() -> None:
    x0 = torch.ones(3, dtype=torch.float64)
    res = Anderson(maxiter=0)(lambda x: 0.5 * x, x0)
    assert res.status is Status.MAX_ITERATIONS and res.iterations == 0 and res.n_fun == 1
    assert torch.equal(res.x, x0) and float(res.grad_norm) == pytest.approx(0.5 * math.sqrt(3.0))
    res = Anderson(maxiter=0)(lambda x: 0.5 * x, torch.zeros(3, dtype=torch.float64))
    assert res.status is Status.SUCCESS and res.iterations == 0


# -- configuration and protocol ------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"m": 0}, "m"),
        ({"m": 2.0}, "m"),
        ({"m": True}, "m"),
        ({"relaxation": 0.0}, "relaxation"),
        ({"relaxation": 1.5}, "relaxation"),
        ({"regularization": -1e-3}, "regularization"),
        ({"regularization": math.nan}, "regularization"),
        ({"rtol": 1.0}, "rtol"),
        ({"rtol": 0.0}, "rtol"),
        ({"atol": -1.0}, "atol"),
        ({"maxiter": -1}, "maxiter"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, name) -> None:
    with pytest.raises(BilevelValueError, match=rf"Anderson: {name} must be"):
        Anderson(**kwargs)


def test_immutable_hashable_solver() -> None:
    s = Anderson(m=3)
    assert isinstance(s, Solver) and s == Anderson(m=3) and Anderson.supports_batched
    hash(s)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.m = 4  # type: ignore[misc]


def test_wrong_output_structure_rejected() -> None:
    with pytest.raises(BilevelValueError, match="shaped like x0"):
        Anderson()(lambda t: t[0], (torch.zeros(2), torch.zeros(2)))
    with pytest.raises(BilevelValueError, match="shaped like x0"):
        Anderson()(lambda x: x[:2], torch.zeros(3))


def test_runs_on_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = importlib.import_module("bilevel.solvers._anderson")
    calls: list[int] = []
    real = mod.iterate

    def wrapper(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(mod, "iterate", wrapper)
    res = Anderson()(lambda x: 0.5 * torch.cos(x), torch.zeros(3, dtype=torch.float64))
    assert calls == [1] and res.status is Status.SUCCESS


def test_one_host_read_per_iteration(monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver's stopping test is the only host read inside the loop (Python-level reads
    of a tensor: bool, item, tolist, int, float, index), as for FixedPointIteration."""
    counts: dict[str, int] = {}
    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    m, c, _ = _symmetric_contraction(0.9, d=20)
    x0 = torch.zeros(20, dtype=torch.float64)
    res = Anderson()(_affine, x0, m, c)
    assert res.status is Status.SUCCESS and res.iterations > 5
    reads = dict(counts)
    counts.clear()
    plain = FixedPointIteration()(_affine, x0, m, c)
    assert plain.status is Status.SUCCESS
    # A test per step and one that finds nothing active; the rest is the result's.
    assert reads.pop("__bool__") == res.iterations + 1 and counts.pop("__bool__") == plain.iterations + 1
    assert reads == counts


# -- inside the FixedPoint layer -------------------------------------------------------------
def test_fixed_point_layer_gradient_is_the_closed_form() -> None:
    # x* = (I - M)^-1 c; for L = w . x*: dL/dc = u = (I - M)^-T w, dL/dM = u x*^T.
    m0, c0, xs = _symmetric_contraction(0.9, d=8, seed=2)
    m0 = m0 + 0.05 * torch.triu(torch.ones(8, 8, dtype=torch.float64), 1)  # not symmetric
    xs = torch.linalg.solve(torch.eye(8, dtype=torch.float64) - m0, c0)
    w = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64)
    m, c = m0.clone().requires_grad_(True), c0.clone().requires_grad_(True)
    layer = bilevel.FixedPoint(_affine, solver=Anderson(rtol=1e-13), on_failure="raise")
    x = layer(torch.zeros(8, dtype=torch.float64), m, c)
    torch.testing.assert_close(x, xs, rtol=1e-10, atol=1e-10)
    gm, gc = torch.autograd.grad((w * x).sum(), (m, c))
    u = torch.linalg.solve((torch.eye(8, dtype=torch.float64) - m0).T, w)
    torch.testing.assert_close(gc, u, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gm, torch.outer(u, xs), rtol=1e-8, atol=1e-10)


def test_fixed_point_layer_batched_nonlinear_gradient() -> None:
    # x* = a cos(x*) per task: dx*/da = cos(x*) / (1 + a sin(x*)).
    a = torch.tensor([0.3, 0.7, 1.0], dtype=torch.float64, requires_grad=True)
    layer = bilevel.FixedPoint(lambda x, a: a * torch.cos(x), solver=Anderson(rtol=1e-13), on_failure="raise")
    x = layer(torch.zeros(3, 1, dtype=torch.float64), a[:, None], batched=True)[:, 0]
    torch.testing.assert_close(x, a * torch.cos(x), rtol=0, atol=1e-12)
    (g,) = torch.autograd.grad(x.sum(), a)
    x = x.detach()
    torch.testing.assert_close(g, torch.cos(x) / (1 + a.detach() * torch.sin(x)), rtol=1e-9, atol=1e-12)


def test_fixed_point_layer_under_vmap_equals_batched() -> None:
    g = torch.Generator().manual_seed(4)
    m = 0.3 * torch.randn(4, 4, generator=g, dtype=torch.float64)
    layer = bilevel.FixedPoint(lambda z, c: 0.5 * torch.tanh(m @ z) + c, solver=Anderson(rtol=1e-13), on_failure="raise")
    c = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    out_v = torch.func.vmap(layer)(torch.zeros(3, 4, dtype=torch.float64), c)
    out_b = layer(torch.zeros(3, 4, dtype=torch.float64), c, batched=True)
    torch.testing.assert_close(out_v, out_b, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(torch.autograd.grad(out_v.sum(), c)[0], torch.autograd.grad(out_b.sum(), c)[0])
