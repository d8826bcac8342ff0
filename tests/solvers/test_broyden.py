"""Limited-memory Broyden (``bilevel.solvers.Broyden``) against closed forms, against plain
iteration, in batched and tree form, on problems without a solution, and as the inner
solver and the linear solver of a ``FixedPoint`` layer."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import bilevel
from bilevel import BilevelValueError, FixedPoint, Status, custom_root
from bilevel._tree import default_tol
from bilevel.linsolve import GMRES
from bilevel.linsolve import Broyden as LinearBroyden
from bilevel.solvers import Broyden, FixedPointIteration, Solver

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]
VARIANTS = ["good", "bad"]
DOTTIE = 0.7390851332151607  # the root of x = cos(x)


def _err_tol(dtype: torch.dtype) -> float:
    """Accuracy of a solution to the default tolerance (eps**0.75), with room for the
    conditioning of the test problems (at most ~10)."""
    return 100 * default_tol(dtype)


def _contraction(rho: float, d: int = 20, seed: int = 0, skew: float = 0.0, dtype: torch.dtype = torch.float64):
    """``M = Q diag(lam) Q^T (+ skew K)`` with ``lam`` spread over ``[-0.5, rho]``: the plain
    iteration contracts its slowest mode by about ``rho`` per step.  Returns ``M``, ``c``
    and the fixed point ``x* = (I - M)^-1 c`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    m = q @ torch.diag(torch.linspace(-0.5, rho, d, dtype=torch.float64)) @ q.T
    if skew:
        k = torch.randn(d, d, generator=g, dtype=torch.float64)
        k = k - k.T
        m = m + skew * k / torch.linalg.matrix_norm(k, ord=2)
    c = torch.randn(d, generator=g, dtype=torch.float64)
    xs = torch.linalg.solve(torch.eye(d, dtype=torch.float64) - m, c)
    return m.to(dtype), c.to(dtype), xs


def _affine(x, m, c):
    return m @ x + c


# -- the configuration ---------------------------------------------------------------------
def test_defaults_and_immutability() -> None:
    s = Broyden()
    assert (s.memory, s.variant, s.initial_jacobian, s.rtol, s.atol, s.maxiter) == (20, "good", -1.0, None, 0.0, 500)
    assert isinstance(s, Solver) and Broyden.supports_batched
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.memory = 3  # type: ignore[misc]
    assert Broyden(memory=1, variant="bad", initial_jacobian=2, rtol=1e-3, atol=1e-9, maxiter=0).maxiter == 0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(memory=0), "memory"),
        (dict(memory=2.5), "memory"),
        (dict(memory=True), "memory"),
        (dict(variant="ugly"), "variant"),
        (dict(variant=None), "variant"),
        (dict(initial_jacobian=0.0), "initial_jacobian"),
        (dict(initial_jacobian=float("nan")), "initial_jacobian"),
        (dict(initial_jacobian=float("inf")), "initial_jacobian"),
        (dict(initial_jacobian="1"), "initial_jacobian"),
        (dict(initial_jacobian=True), "initial_jacobian"),
        (dict(rtol=0.0), "rtol"),
        (dict(rtol=1.0), "rtol"),
        (dict(atol=-1.0), "atol"),
        (dict(maxiter=-1), "maxiter"),
        (dict(maxiter=1.5), "maxiter"),
    ],
)
@pytest.mark.parametrize("cls", [Broyden, LinearBroyden], ids=["inner", "linear"])
def test_invalid_configuration_names_the_parameter(cls, kwargs, name) -> None:
    if cls is LinearBroyden and name == "maxiter" and kwargs["maxiter"] == -1:
        kwargs = dict(maxiter=0)  # the linear solvers' cap is >= 1
    with pytest.raises(BilevelValueError, match=rf"Broyden: {name}"):
        cls(**kwargs)


def test_bad_calls_are_refused() -> None:
    with pytest.raises(BilevelValueError, match="shaped like x0"):
        Broyden()(lambda t: t[0], (torch.zeros(2), torch.zeros(2)))
    with pytest.raises(BilevelValueError, match="shaped like x0"):
        Broyden()(lambda x: x[:1], torch.zeros(2))
    with pytest.raises(TypeError, match="floating-point"):
        Broyden()(lambda x: x, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="task dimension"):
        Broyden()(lambda x: x, {"a": torch.zeros(2, 1), "b": torch.zeros(3, 1)}, batched=True)


# -- closed forms -------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fixed_point_of_cos(dtype, variant) -> None:
    res = Broyden(variant=variant)(torch.cos, torch.zeros(3, dtype=dtype))
    assert res.status is Status.SUCCESS and res.x.dtype == dtype
    torch.testing.assert_close(res.x, torch.full((3,), DOTTIE, dtype=dtype), rtol=0, atol=_err_tol(dtype))
    # grad_norm is the residual of the returned x, and meets the stopping rule.
    r = float((torch.cos(res.x) - res.x).norm())
    assert float(res.grad_norm) == pytest.approx(r, rel=1e-3, abs=10 * torch.finfo(dtype).eps)
    assert float(res.grad_norm) <= default_tol(dtype) * max(1.0, float(res.x.norm()))
    assert res.n_fun == res.iterations + 1 and res.n_grad == 0 and res.value is None
    assert res.iterations < 15  # superlinear: the plain iteration needs ~70 in float64


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_root_matches_torch_linalg_solve(dtype, variant) -> None:
    """F(x) = A x - b with a non-symmetric A whose eigenvalues lie near 3: initial_jacobian=3."""
    g = torch.Generator().manual_seed(1)
    n = 12
    a64 = 3.0 * torch.eye(n, dtype=torch.float64) + 0.4 * torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    b64 = torch.randn(n, generator=g, dtype=torch.float64)
    x_ref = torch.linalg.solve(a64, b64)
    a, b = a64.to(dtype), b64.to(dtype)
    res = Broyden(variant=variant, initial_jacobian=3.0).root(lambda x, a, b: a @ x - b, torch.zeros(n, dtype=dtype), a, b)
    assert res.status is Status.SUCCESS
    assert float((res.x.double() - x_ref).norm() / x_ref.norm()) <= _err_tol(dtype)
    # Full memory on an n-dimensional affine root: at most 2n steps (Gay 1979), with rounding.
    assert res.iterations <= 2 * n


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cube_roots_elementwise(dtype, variant) -> None:
    a = torch.tensor([1.0, 8.0, 27.0, 0.5], dtype=dtype)
    res = Broyden(variant=variant, initial_jacobian=10.0).root(lambda x, a: x**3 - a, torch.full((4,), 1.5, dtype=dtype), a)
    assert res.status is Status.SUCCESS
    torch.testing.assert_close(res.x, a ** (1 / 3), rtol=_err_tol(dtype), atol=0)


def test_good_and_bad_agree_on_a_linear_contraction() -> None:
    m, c, xs = _contraction(0.9, d=15, skew=0.3)
    results = {v: Broyden(variant=v, rtol=1e-12)(_affine, torch.zeros(15, dtype=torch.float64), m, c) for v in VARIANTS}
    for res in results.values():
        assert res.status is Status.SUCCESS
        torch.testing.assert_close(res.x, xs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(results["good"].x, results["bad"].x, rtol=1e-10, atol=1e-10)
    assert results["good"].x is not results["bad"].x


def test_initial_step_is_the_plain_iteration() -> None:
    """H0 = -I: one Broyden step from x0 is fn(x0)."""
    m, c, _ = _contraction(0.9, d=6)
    x0 = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    one = Broyden(maxiter=1)(_affine, x0, m, c)
    assert one.status is Status.MAX_ITERATIONS and one.iterations == 1
    torch.testing.assert_close(one.x, _affine(x0, m, c), rtol=1e-15, atol=1e-15)


def test_start_at_the_solution_and_a_zero_cap() -> None:
    m, c, xs = _contraction(0.5, d=5)
    res = Broyden()(_affine, xs, m, c)
    assert res.status is Status.SUCCESS and res.iterations == 0 and res.n_fun == 1
    assert torch.equal(res.x, xs)
    res = Broyden(maxiter=0)(_affine, torch.zeros(5, dtype=torch.float64), m, c)
    assert res.status is Status.MAX_ITERATIONS and res.iterations == 0
    assert torch.equal(res.x, torch.zeros(5, dtype=torch.float64))


def test_atol_stops_early() -> None:
    m, c, _ = _contraction(0.9, d=10)
    tight = Broyden(rtol=1e-12)(_affine, torch.zeros(10, dtype=torch.float64), m, c)
    loose = Broyden(rtol=1e-12, atol=1e-3)(_affine, torch.zeros(10, dtype=torch.float64), m, c)
    assert loose.status is Status.SUCCESS and float(loose.grad_norm) <= 1e-3
    assert loose.iterations < tight.iterations


@pytest.mark.parametrize("memory", [1, 2, 5])
def test_a_short_memory_restarts_and_still_converges(memory: int) -> None:
    m, c, xs = _contraction(0.9, d=20)
    res = Broyden(memory=memory, rtol=1e-12)(_affine, torch.zeros(20, dtype=torch.float64), m, c)
    assert res.status is Status.SUCCESS and res.iterations > 2 * memory  # it did restart
    torch.testing.assert_close(res.x, xs, rtol=1e-9, atol=1e-9)


# -- against the plain iteration ------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_fewer_iterations_than_plain_iteration_on_a_slow_contraction(variant) -> None:
    m, c, xs = _contraction(0.99, d=20)
    x0 = torch.zeros(20, dtype=torch.float64)
    plain = FixedPointIteration(rtol=1e-10, maxiter=10_000)(_affine, x0, m, c)
    broyden = Broyden(variant=variant, rtol=1e-10)(_affine, x0, m, c)
    assert plain.status is Status.SUCCESS and broyden.status is Status.SUCCESS
    torch.testing.assert_close(broyden.x, xs, rtol=1e-7, atol=1e-7)
    # Measured: plain ~1800 iterations, Broyden ~40 (same evaluations of fn, plus one).
    assert 3 * broyden.iterations <= plain.iterations, (broyden.iterations, plain.iterations)
    assert broyden.n_fun == broyden.iterations + 1


# -- batches and trees -------------------------------------------------------------------------
def _compare(res_b, singles, atol: float) -> None:
    assert res_b.task_status == tuple(r.status for r in singles)
    assert res_b.task_iterations.tolist() == [r.iterations for r in singles]
    assert res_b.iterations == max(r.iterations for r in singles)
    for i, r in enumerate(singles):
        torch.testing.assert_close(res_b.x[i], r.x, rtol=0, atol=atol)
        torch.testing.assert_close(res_b.grad_norm[i], r.grad_norm, rtol=1e-6, atol=atol)


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_equals_per_task_solves(variant) -> None:
    ms, cs, xs = zip(*(_contraction(rho, d=8, seed=i, skew=0.2) for i, rho in enumerate((0.2, 0.7, 0.97))))
    ms, cs, xs = torch.stack(ms), torch.stack(cs), torch.stack(xs)

    def fn(x, ms, cs):
        return torch.einsum("...ij,...j->...i", ms, x) + cs

    solver = Broyden(variant=variant, rtol=1e-11, memory=6)
    x0 = torch.zeros(3, 8, dtype=torch.float64)
    res = solver(fn, x0, ms, cs, batched=True)
    singles = [solver(fn, x0[i], ms[i], cs[i]) for i in range(3)]
    _compare(res, singles, atol=1e-12)
    assert res.status is Status.SUCCESS and len(set(res.task_iterations.tolist())) > 1
    torch.testing.assert_close(res.x, xs, rtol=1e-9, atol=1e-9)
    assert res.grad_norm.shape == (3,)


def test_batched_failure_is_per_task() -> None:
    """Task 0 converges; task 1 (x -> x^2 + 1) has no real fixed point and overflows."""
    x0 = torch.tensor([[0.5], [1.0]], dtype=torch.float64)
    res = Broyden(maxiter=300)(lambda x: torch.cat([x[:1] / 2, x[1:] ** 2 + 1.0]), x0, batched=True)
    assert res.task_status[0] is Status.SUCCESS
    assert res.task_status[1] in (Status.NONFINITE, Status.MAX_ITERATIONS)
    assert not res.success and torch.isfinite(res.x).all()
    assert abs(float(res.x[0])) <= 1e-10


@pytest.mark.parametrize("dtype", DTYPES)
def test_tree_unknowns(dtype) -> None:
    m, c, xs = _contraction(0.9, d=7, seed=2, dtype=dtype)

    def fn(t, m, c):
        x = torch.cat([t["a"].reshape(-1), t["b"][0], t["b"][1].reshape(1)])
        y = m @ x + c
        return {"a": y[:4].reshape(2, 2), "b": (y[4:6], y[6])}

    x0 = {"a": torch.zeros(2, 2, dtype=dtype), "b": (torch.zeros(2, dtype=dtype), torch.zeros((), dtype=dtype))}
    res = Broyden()(fn, x0, m, c)
    assert res.status is Status.SUCCESS
    assert res.x["a"].shape == (2, 2) and res.x["b"][1].shape == () and res.x["a"].dtype == dtype
    x = torch.cat([res.x["a"].reshape(-1), res.x["b"][0], res.x["b"][1].reshape(1)])
    assert float((x.double() - xs).norm() / xs.norm()) <= _err_tol(dtype)


def test_batched_tree_unknowns() -> None:
    ms, cs, xs = zip(*(_contraction(rho, d=5, seed=i) for i, rho in enumerate((0.3, 0.95))))
    ms, cs, xs = torch.stack(ms), torch.stack(cs), torch.stack(xs)

    def fn(t, ms, cs):
        x = torch.cat([t[0], t[1]], dim=-1)
        y = torch.einsum("bij,bj->bi", ms, x) + cs
        return (y[:, :2], y[:, 2:])

    x0 = (torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64))
    res = Broyden(rtol=1e-11)(fn, x0, ms, cs, batched=True)
    assert res.task_status == (Status.SUCCESS, Status.SUCCESS)
    torch.testing.assert_close(torch.cat(res.x, dim=-1), xs, rtol=1e-9, atol=1e-9)


# -- honest failures ------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_map_without_a_fixed_point_is_never_a_success(variant) -> None:
    """x -> x + 1: g = 1 everywhere, y = 0, every update is skipped (a zero denominator)."""
    res = Broyden(variant=variant, maxiter=50)(lambda x: x + 1.0, torch.zeros(3, dtype=torch.float64))
    assert res.status is Status.MAX_ITERATIONS and not res.success and res.iterations == 50
    assert torch.isfinite(res.x).all() and float(res.grad_norm) == pytest.approx(3**0.5)


@pytest.mark.parametrize("initial_jacobian", [-1.0, 1.0, 2.0])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_root_that_does_not_exist_is_never_a_success(dtype, variant, initial_jacobian) -> None:
    """x² + 1 has no real root: whatever happens, never SUCCESS, and the residual is honest."""
    res = Broyden(variant=variant, initial_jacobian=initial_jacobian, maxiter=200).root(
        lambda x: x**2 + 1.0, torch.linspace(-1.0, 2.0, 3, dtype=dtype)
    )
    assert res.status in (Status.MAX_ITERATIONS, Status.NONFINITE) and not res.success
    assert torch.isfinite(res.x).all()
    assert float(res.grad_norm) == pytest.approx(float((res.x**2 + 1).norm()), rel=1e-4)
    assert float(res.grad_norm) >= 3**0.5 * (1 - 1e-6)  # |x² + 1| >= 1 per entry


def test_nonfinite_map_keeps_the_last_finite_iterate() -> None:
    def fn(x):  # NaN beyond 5: the plain first step goes to 10
        return torch.where(x < 5, 0.5 * x + 10.0, torch.nan)

    res = Broyden(maxiter=100)(fn, torch.zeros(1, dtype=torch.float64))
    assert res.status is Status.NONFINITE and not res.success
    assert float(res.x) == 0.0 and res.iterations == 0 and float(res.grad_norm) == 10.0


# -- inside the layers --------------------------------------------------------------------------
N_FP = 4


def _fp_problem():
    g = torch.Generator().manual_seed(5)
    W0 = torch.randn(N_FP, N_FP, generator=g, dtype=torch.float64)
    W = 0.8 * W0 / torch.linalg.matrix_norm(W0, 2)
    U = torch.randn(N_FP, 2, generator=g, dtype=torch.float64)
    a = torch.randn(2, generator=g, dtype=torch.float64)
    w = torch.linspace(-1.0, 2.0, N_FP, dtype=torch.float64)
    return W, U, a, w


def _fp_fn(x, W, U, a):
    return torch.tanh(W @ x + U @ a)


def _closed_form_grad(W, U, a, w):
    """d(w . x*)/da = U^T D (I - D W)^-T w with D = diag(1 - tanh²) at x* (float64)."""
    x = torch.zeros(N_FP, dtype=torch.float64)
    for _ in range(2000):
        x = _fp_fn(x, W, U, a)
    d = 1 - torch.tanh(W @ x + U @ a) ** 2
    jac = torch.linalg.solve(torch.eye(N_FP, dtype=torch.float64) - d[:, None] * W, d[:, None] * U)  # dx*/da
    return jac.T @ w


LAYERS = {
    "Broyden+GMRES": (Broyden(rtol=1e-13), GMRES(rtol=1e-13)),
    "FixedPointIteration+Broyden": (FixedPointIteration(rtol=1e-13, maxiter=2000), LinearBroyden(rtol=1e-13)),
    "Broyden+Broyden": (Broyden(rtol=1e-13), LinearBroyden(rtol=1e-13)),
    "Broyden(bad)+Broyden(bad)": (Broyden(variant="bad", rtol=1e-13), LinearBroyden(variant="bad", rtol=1e-13)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_fixed_point_layer_gradient_is_the_implicit_one(name: str) -> None:
    W, U, a, w = _fp_problem()
    solver, linsolve = LAYERS[name]
    ref_layer = FixedPoint(_fp_fn, FixedPointIteration(rtol=1e-13, maxiter=2000), GMRES(rtol=1e-13), on_failure="raise")
    layer = FixedPoint(_fp_fn, solver, linsolve, on_failure="raise")
    grads = []
    for lay in (layer, ref_layer):
        args = [t.clone().requires_grad_(True) for t in (W, U, a)]
        x = lay(torch.zeros(N_FP, dtype=torch.float64), *args)
        grads.append(torch.autograd.grad((w * x).sum(), args))
    torch.testing.assert_close(grads[0][2], _closed_form_grad(W, U, a, w), rtol=1e-9, atol=1e-11)
    for mine, gmres in zip(*grads):  # W, U and a: equal to GMRES's
        torch.testing.assert_close(mine, gmres, rtol=1e-9, atol=1e-11)
    assert layer.diagnostics.forward.success and layer.diagnostics.backward.success


def test_fixed_point_layer_batched_with_broyden() -> None:
    W, U, _, w = _fp_problem()
    a = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(9), requires_grad=True)
    layer = FixedPoint(_fp_fn, Broyden(rtol=1e-13), LinearBroyden(rtol=1e-13), on_failure="raise")
    x = layer(torch.zeros(3, N_FP, dtype=torch.float64), W, U, a, batched=True, in_dims=(None, None, 0))
    (g,) = torch.autograd.grad((x * w).sum(), a)
    for i in range(3):
        torch.testing.assert_close(g[i], _closed_form_grad(W, U, a[i].detach(), w), rtol=1e-9, atol=1e-11)


def test_root_inside_custom_root() -> None:
    """Broyden.root as the solve function of a custom root: d(a^(1/3))/da = a^(-2/3) / 3."""

    def cube(x, a):
        return x**3 - a

    @custom_root(cube, on_failure="raise")
    def cube_root(x0, a):
        return Broyden(initial_jacobian=10.0, rtol=1e-13).root(cube, x0, a).x

    a = torch.tensor([1.0, 8.0, 27.0], dtype=torch.float64, requires_grad=True)
    x = cube_root(torch.full((3,), 1.5, dtype=torch.float64), a)
    (g,) = torch.autograd.grad(x.sum(), a)
    torch.testing.assert_close(x.detach(), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(g, a.detach() ** (-2 / 3) / 3, rtol=1e-10, atol=0)
    assert isinstance(bilevel.solvers.Broyden(), Solver)
