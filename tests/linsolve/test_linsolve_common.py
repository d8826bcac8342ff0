"""Behaviour every linear solver shares: caps, trivial systems, x0, n = 1, validation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from bilevel import LinearSolveResult, Status
from bilevel.linsolve import CG, GMRES, MINRES, BiCGSTAB, Dense, LinearSolver, Neumann
from tests import registry

# Every linear solver at its defaults, and GMRES restarted below n.
ALL = registry.solvers("linear", tags={"default"}) + registry.solvers(ids=["GMRES-restart2"])
ITERATIVE = [p for p in ALL if "direct" not in registry.capabilities(p.values[0])]


def _system_for(systems, solver: LinearSolver, **kw) -> torch.Tensor:
    """A system the solver is valid for (its registry families): a contraction for the
    Neumann series, SPD for the symmetric solvers, else non-symmetric."""
    families = registry.families(solver)
    if "neumann-nonsymmetric" in families:
        return systems.neumann(radius=kw.get("radius", 0.7))
    if "nonsymmetric" not in families:
        return systems.spd(cond=kw.get("cond", 100.0))
    return systems.nonsymmetric(cond=kw.get("cond", 100.0))


class CountingMatVec:
    def __init__(self, a: torch.Tensor) -> None:
        self.a = a
        self.calls = 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return (self.a @ v.unsqueeze(-1)).squeeze(-1)


def test_exports():
    import bilevel.linsolve as ls

    assert set(ls.__all__) >= {"LinearSolver", "MatVec", "CG", "MINRES", "GMRES", "BiCGSTAB", "Neumann", "Dense"}
    for name in ("CG", "MINRES", "GMRES", "BiCGSTAB", "Neumann", "Dense"):
        cls = getattr(ls, name)
        assert issubclass(cls, LinearSolver)
        assert dataclasses.is_dataclass(cls)
    assert MINRES.requires_symmetric and not MINRES.requires_positive_definite
    assert not GMRES.requires_symmetric and not BiCGSTAB.requires_symmetric


@pytest.mark.parametrize("solver", ALL)
def test_frozen(solver):
    with pytest.raises(dataclasses.FrozenInstanceError):
        solver.rtol = 1e-3  # type: ignore[misc]


@pytest.mark.parametrize("solver", ITERATIVE)
@pytest.mark.parametrize("batched", [False, True])
def test_maxiter_reached(systems, solver, batched):
    """Too few iterations: MAX_ITERATIONS, exactly maxiter iterations, honest residual."""
    maxiter = 3
    a = _system_for(systems, solver)
    if batched:
        a = torch.stack([a, a.T.contiguous() if "symmetric" not in registry.capabilities(solver) else a])
        b = systems.randn(2, systems.n)
    else:
        b = systems.randn(systems.n)
    mv = CountingMatVec(a)
    capped = dataclasses.replace(solver, maxiter=maxiter)
    res = capped(mv, b, batched=batched)

    assert res.status is Status.MAX_ITERATIONS, res.summary()
    assert not res.success
    assert res.iterations == maxiter
    true_res = (b - mv(res.x)).norm(dim=-1)
    assert torch.allclose(res.residual_norm, true_res, rtol=1e-8)
    assert (res.residual_norm > 1e-6 * b.norm(dim=-1)).all()
    if batched:
        assert res.task_status == (Status.MAX_ITERATIONS,) * 2
        assert res.task_iterations.tolist() == [maxiter] * 2
    # Neither the solution nor the residual is garbage: the iterate improved on x0 = 0.
    assert (true_res < b.norm(dim=-1)).all()


@pytest.mark.parametrize("solver", ALL)
@pytest.mark.parametrize("kind", ["tensor", "dict"])
@pytest.mark.parametrize("batched", [False, True])
def test_zero_rhs(systems, trees, solver, kind, batched):
    a = systems.spd()
    shape = (2, systems.n) if batched else (systems.n,)
    calls = []

    def mv(v):
        calls.append(1)
        return trees.matvec(a, kind, batched)(v)

    b = trees.to_tree(torch.zeros(shape, dtype=torch.float64), kind, batched)
    res = solver(mv, b, batched=batched)
    assert res.status is Status.SUCCESS
    assert res.iterations == 0
    assert not calls  # nothing to do: no matvec at all
    x = trees.from_tree(res.x, kind, batched)
    assert torch.equal(x, torch.zeros(shape, dtype=torch.float64))
    assert (res.residual_norm == 0).all()
    if batched:
        assert res.task_iterations.tolist() == [0, 0]


@pytest.mark.parametrize("solver", ITERATIVE)
@pytest.mark.parametrize("kind", ["tensor", "dict"])
def test_x0_at_the_solution_converges_immediately(systems, trees, solver, kind):
    a = _system_for(systems, solver, cond=10.0, radius=0.4)
    b = systems.randn(systems.n)
    x_star = torch.linalg.solve(a, b)
    x0 = trees.to_tree(x_star, kind)
    x0_copy = trees.to_tree(x_star, kind)
    mv = trees.matvec(a, kind)
    res = solver(mv, trees.to_tree(b, kind), x0)
    assert res.status is Status.SUCCESS, res.summary()
    assert res.iterations == 0
    assert torch.equal(trees.from_tree(res.x, kind), x_star)
    # x0 is not modified in place.
    assert torch.equal(trees.from_tree(x0, kind), trees.from_tree(x0_copy, kind))


@pytest.mark.parametrize("solver", ITERATIVE)
def test_x0_is_used(systems, solver):
    """The solve starts from x0: with one iteration allowed, a start next to the solution
    ends far closer to it than a start from 0 (and the residual is measured from x0)."""
    a = _system_for(systems, solver, cond=10.0, radius=0.4)
    b = systems.randn(systems.n)
    x_star = torch.linalg.solve(a, b)
    x0 = x_star + 1e-6 * systems.randn(systems.n)
    one = dataclasses.replace(solver, maxiter=1)
    near = one(lambda v: a @ v, b, x0)
    far = one(lambda v: a @ v, b)
    assert (near.x - x_star).norm() < 1e-4 * (far.x - x_star).norm()
    assert near.residual_norm < 1e-4 * far.residual_norm
    full = solver(lambda v: a @ v, b, x0)
    assert full.status is Status.SUCCESS
    assert (full.x - x_star).norm() <= 1e-8 * x_star.norm()


@pytest.mark.parametrize("solver", ALL)
@pytest.mark.parametrize("shape", [(1,), ()], ids=["n1", "0d"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_scalar_problem(solver, shape, dtype):
    """n = 1 (a 1-vector or a 0-d tensor): the default maxiter must not compute to 0."""
    a = 3.0 if not isinstance(solver, Neumann) else 0.75  # Neumann: |1 - a| = 0.25 < 1
    b = torch.full(shape, 6.0, dtype=dtype)
    res = solver(lambda v: a * v, b)
    assert res.status is Status.SUCCESS, res.summary()
    assert res.x.shape == shape and res.x.dtype == dtype
    assert torch.allclose(res.x, b / a, rtol=10 * torch.finfo(dtype).eps ** 0.75)
    if not isinstance(solver, Dense):
        assert res.iterations >= 1


@pytest.mark.parametrize("solver", ALL)
def test_scalar_problems_batched(solver):
    """B scalar tasks (leaves of shape (B,)): per-task a_i x_i = b_i."""
    a = torch.tensor([3.0, 0.5, 1.25], dtype=torch.float64)
    if isinstance(solver, Neumann):
        a = torch.tensor([0.75, 0.5, 1.25], dtype=torch.float64)
    b = torch.tensor([6.0, -1.0, 0.0], dtype=torch.float64)
    res = solver(lambda v: a * v, b, batched=True)
    assert res.task_status == (Status.SUCCESS,) * 3
    assert torch.allclose(res.x, b / a, rtol=1e-10)
    assert res.x[2] == 0 and res.task_iterations[2] == 0


@pytest.mark.parametrize("solver", ALL)
@pytest.mark.parametrize("batched", [False, True])
def test_nonfinite_operator(systems, solver, batched):
    """A NaN from the operator is reported as NONFINITE, never as success; in batched mode
    the other tasks are not affected."""
    a = _system_for(systems, solver, cond=10.0, radius=0.4)
    if batched:
        a = torch.stack([a, a.clone(), a.clone()])
        a[1, 3, 5] = float("nan")
        b = systems.randn(3, systems.n)
    else:
        a = a.clone()
        a[3, 5] = float("nan")
        b = systems.randn(systems.n)
    res = solver(lambda v: (a @ v.unsqueeze(-1)).squeeze(-1), b, batched=batched)
    assert res.status is Status.NONFINITE, res.summary()
    if batched:
        assert res.task_status == (Status.SUCCESS, Status.NONFINITE, Status.SUCCESS)
        x_ref = torch.linalg.solve(a[0], b[0])
        assert (res.x[0] - x_ref).norm() <= 1e-8 * x_ref.norm()
        bad_x = res.x[1]
    else:
        bad_x = res.x
    # The failed task keeps its last finite iterate (CG is the pre-existing solver and
    # makes no such promise).
    if not isinstance(solver, CG):
        assert torch.isfinite(bad_x).all()


def test_bad_rhs():
    with pytest.raises(TypeError):
        GMRES()(lambda v: v, torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError):
        MINRES()(lambda v: v, {})
    with pytest.raises(ValueError):
        BiCGSTAB()(lambda v: v, torch.tensor(1.0), batched=True)


BAD = [
    (lambda: MINRES(rtol=0.0), ValueError),
    (lambda: MINRES(rtol=1.0), ValueError),
    (lambda: GMRES(rtol=-1e-3), ValueError),
    (lambda: BiCGSTAB(rtol="1e-6"), ValueError),
    (lambda: Neumann(atol=-1.0), ValueError),
    (lambda: MINRES(maxiter=0), ValueError),
    (lambda: GMRES(maxiter=2.5), ValueError),
    (lambda: BiCGSTAB(maxiter=-3), ValueError),
    (lambda: Neumann(maxiter=0), ValueError),
    (lambda: GMRES(restart=0), ValueError),
    (lambda: GMRES(restart=-2), ValueError),
    (lambda: GMRES(restart=2.5), ValueError),
    (lambda: GMRES(restart=True), ValueError),
    (lambda: GMRES(restart="20"), ValueError),
    (lambda: Neumann(alpha=0.0), ValueError),
    (lambda: Neumann(alpha=-0.5), ValueError),
    (lambda: Neumann(alpha=math.inf), ValueError),
    (lambda: Neumann(alpha=math.nan), ValueError),
    (lambda: Neumann(alpha="1"), ValueError),
    (lambda: Neumann(alpha=True), ValueError),
    (lambda: Dense(rtol=1e-6), TypeError),
    (lambda: Dense(atol=1e-6), TypeError),
    (lambda: Dense(maxiter=10), TypeError),
    (lambda: CG(preconditioner=3), TypeError),
    (lambda: CG(rtol=2.0), ValueError),
]


@pytest.mark.parametrize("make, exc", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_construction(make, exc):
    with pytest.raises(exc):
        make()


def test_good_construction():
    assert GMRES(restart=1, maxiter=5, rtol=1e-3, atol=1e-9).restart == 1
    assert Neumann(alpha=2).alpha == 2
    assert Neumann(alpha=0.1, maxiter=200).maxiter == 200
    assert repr(Dense()) == "Dense()"
    assert Dense() == Dense()
    assert isinstance(MINRES(rtol=1e-4)(lambda v: v, torch.ones(2)), LinearSolveResult)


@pytest.mark.parametrize(
    "solver, system",
    [(MINRES, "spd"), (MINRES, "indefinite"), (GMRES, "nonsymmetric"), (BiCGSTAB, "spd"), (BiCGSTAB, "nonsymmetric")],
    ids=lambda p: p if isinstance(p, str) else p.__name__,
)
@pytest.mark.parametrize("tol", [1e-6, 3e-7])
def test_success_only_when_the_true_residual_meets_the_tolerance(systems, solver, system, tol):
    """In float32 with a tolerance near the attainable accuracy, the recurrence residual
    runs ahead of the true one; the solvers that verify must then either reach the
    tolerance on the true residual or say MAX_ITERATIONS -- and always report the true
    residual of the returned x."""
    a = systems.system(system, cond=100.0).float()
    b = systems.randn(systems.n).float()
    mv = CountingMatVec(a)
    res = solver(rtol=tol, maxiter=100)(mv, b)
    true_res = (b - a @ res.x).norm()
    assert torch.allclose(res.residual_norm, true_res, rtol=1e-3)
    if res.status is Status.SUCCESS:
        assert true_res <= tol * b.norm() * (1 + 1e-3)
    else:
        assert res.status is Status.MAX_ITERATIONS
        assert res.iterations == 100
        assert true_res > tol * b.norm() * (1 - 1e-3)
    if solver is not GMRES and tol < 5 * torch.finfo(torch.float32).eps:
        # A tolerance of a few eps is below what the recurrences can be trusted to: the
        # check must have run (and restarted) at least once before the final report.
        per_iteration = 2 if solver is BiCGSTAB else 1
        assert mv.calls >= per_iteration * res.iterations + 2


@pytest.mark.parametrize("solver", [p for p in ALL if not isinstance(p.values[0], CG)])
@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
def test_nonfinite_rhs(solver, bad):
    """An infinite b makes the threshold tol * ||b|| infinite too: it must still not pass
    for convergence.  (CG, the pre-existing solver, is not covered by this test.)"""
    b = torch.tensor([1.0, bad, 2.0], dtype=torch.float64)
    res = solver(lambda v: 2.0 * v, b)
    assert res.status is Status.NONFINITE, res.summary()


@pytest.mark.parametrize("solver", [GMRES(), Dense()], ids=["GMRES", "Dense"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_systems_solve_on_the_cpu(solver: LinearSolver, dtype: torch.dtype) -> None:
    """Their small dense steps (GMRES's triangular solve, Dense's SVD and LU) have no
    half-precision CPU kernels: they run in float32 and the solution comes back in ``dtype``."""
    A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=dtype)
    b = torch.ones(2, dtype=dtype)
    res = solver(lambda v: A @ v, b)
    want = torch.linalg.solve(A.double(), b.double())
    assert res.x.dtype == dtype and res.success
    torch.testing.assert_close(res.x.double(), want, rtol=2e-2, atol=0)
