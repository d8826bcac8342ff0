"""Every linear solver against ``torch.linalg.solve``, on the systems it is valid for."""

from __future__ import annotations

import pytest
import torch

from bilevel import Status
from bilevel._tree import default_tol
from bilevel.linsolve import Dense
from tests import registry

# (solver, system) pairs where the solver applies (registry.families): CG needs SPD, MINRES
# symmetric, GMRES / BiCGSTAB / Dense anything non-singular, Neumann a contraction I - A;
# and GMRES restarted below n on a non-symmetric system.
CASES = registry.all_cases("linear", tags={"default"}) + registry.cases(("GMRES-restart5", "nonsymmetric"))


def _matrix(systems, system: str) -> torch.Tensor:
    return systems.system(system, cond=10.0, radius=0.4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["tensor", "dict"])
@pytest.mark.parametrize("solver, system", CASES)
def test_matches_torch_linalg_solve(systems, trees, solver, system, kind, dtype):
    a64 = _matrix(systems, system)
    b64 = systems.randn(systems.n)
    x_ref = torch.linalg.solve(a64, b64)

    a = a64.to(dtype)
    b = trees.to_tree(b64.to(dtype), kind)
    res = solver(trees.matvec(a, kind), b)

    assert res.status is Status.SUCCESS, res.summary()
    assert res.success
    # The solution has the structure, shapes and dtype of the right-hand side.
    if kind == "dict":
        assert list(res.x) == ["w", "b"]
        assert res.x["w"].shape == (3, 4) and res.x["b"].shape == (4,)
        assert all(v.dtype == dtype for v in res.x.values())
    else:
        assert res.x.shape == b.shape and res.x.dtype == dtype
    x = trees.from_tree(res.x, kind).double()
    rel = (x - x_ref).norm() / x_ref.norm()
    assert rel <= systems.rtol[dtype], f"relative error {rel:.3g}"

    # The reported residual is that of the returned x, and it meets the stopping rule
    # ||r|| <= tol * ||b|| (default tol from the dtype, atol = 0).
    true_res = (b64 - a64 @ x).norm()
    eps = torch.finfo(dtype).eps
    rounding = 10 * systems.n * eps * (torch.linalg.matrix_norm(a64, ord=2) * x.norm() + b64.norm())
    assert abs(res.residual_norm.double() - true_res) <= rounding
    assert res.residual_norm.shape == ()
    if not isinstance(solver, Dense):  # Dense has no tolerance: it only promises a backward-stable solve
        assert res.residual_norm <= default_tol(dtype) * b64.to(dtype).norm()
        assert res.iterations >= 1
    assert res.task_status is None and res.task_iterations is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_iterative_solvers_agree_with_each_other_on_spd(systems, dtype):
    """All solvers that apply to an SPD system return the same solution (mutual check)."""
    a = systems.spd(cond=50.0).to(dtype)
    b = systems.randn(systems.n).to(dtype)
    iterative = [e.solver for e in registry.entries("linear", tags={"default", "driver"}) if "spd" in registry.families(e.solver)]
    xs = [s(lambda v: a @ v, b) for s in (*iterative, Dense())]  # Dense last: the reference
    assert all(r.status is Status.SUCCESS for r in xs)
    ref = xs[-1].x.double()
    for r in xs[:-1]:
        assert (r.x.double() - ref).norm() <= 50 * 10 * default_tol(dtype) * ref.norm()
