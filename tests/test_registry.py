"""The solver registry (tests/registry.py): it covers every exported solver, and its tags say
what the solvers do.

The operator tags (``symmetric``, ``indefinite``, ``nonsymmetric``, ``contraction``) are
exercised by tests/linsolve/test_linsolve_accuracy.py, which solves every family that
``registry.families`` derives from them; ``driver`` by tests/core/test_iterate.py;
``fixed_budget`` and ``device_loop`` by tests/linsolve/test_linsolve_fixed_budget.py.
"""

from __future__ import annotations

import pytest
import torch

import bilevel.linsolve
import bilevel.solvers
from bilevel import UnsupportedError
from bilevel.linsolve import LinearSolver
from bilevel.solvers import Solver
from tests import registry
from tests.problems import SYSTEM_FAMILIES, Systems

DT = torch.float64

# The names of bilevel.solvers.__all__ and bilevel.linsolve.__all__ that are not solvers,
# and why.  Every other name there must have an entry in the registry.
NOT_SOLVERS = {
    "Solver": "the base class of the inner solvers",
    "LinearSolver": "the base class of the linear solvers",
    "MatVec": "the type of a matvec callable",
    "BacktrackingArmijo": "a line search: a component of LBFGS and NewtonCG (tests/solvers/test_solvers_linesearch.py)",
    "StrongWolfe": "a line search: a component of LBFGS and NewtonCG (tests/solvers/test_solvers_linesearch.py)",
    "LineSearchResult": "the result of a line search",
    "SCIPY_METHODS": "a constant: the scipy.optimize methods that ScipyMinimize accepts",
}


def test_the_registry_covers_every_exported_solver() -> None:
    registered = {type(e.solver) for e in registry.entries()}
    missing = [
        f"{mod.__name__}.{name}"
        for mod in (bilevel.solvers, bilevel.linsolve)
        for name in mod.__all__
        if name not in NOT_SOLVERS and getattr(mod, name) not in registered
    ]
    assert not missing, f"{missing}: add entries to tests/registry.py (or to NOT_SOLVERS, with the reason)"
    exported = set(bilevel.solvers.__all__) | set(bilevel.linsolve.__all__)
    assert set(NOT_SOLVERS) <= exported, f"stale exclusions: {sorted(set(NOT_SOLVERS) - exported)}"


def test_entries_are_of_their_kind_and_every_linear_solver_has_its_defaults() -> None:
    for e in registry.entries():
        assert isinstance(e.solver, LinearSolver if e.kind == registry.LINEAR else Solver), e.id
        assert type(e.solver) in registry.CAPABILITIES, e.id
    # The sites that select the "default" entries then run every linear solver class.
    linear = {type(e.solver) for e in registry.entries(registry.LINEAR)}
    assert linear == {type(e.solver) for e in registry.entries(registry.LINEAR, tags={"default"})}


def test_every_tag_is_documented_and_used() -> None:
    used = set().union(*(e.tags for e in registry.entries()))
    assert used == set(registry.TAGS)
    with pytest.raises(KeyError, match="unknown tags"):
        registry.entries(tags={"no-such-tag"})


def test_the_family_of_every_linear_solver_is_a_test_system() -> None:
    systems = Systems(seed=0)
    for family in SYSTEM_FAMILIES:
        assert systems.system(family).shape == (systems.n, systems.n)
    for e in registry.entries(registry.LINEAR):
        assert set(registry.families(e.solver)) <= set(SYSTEM_FAMILIES), e.id
    with pytest.raises(ValueError, match="does not solve"):
        registry.cases(("CG", "nonsymmetric"))


@pytest.mark.parametrize("solver", registry.solvers("linear"))
def test_the_operator_tags_agree_with_the_solver_class(solver) -> None:
    caps = registry.capabilities(solver)
    assert ("symmetric" in caps) == type(solver).requires_symmetric
    assert ("positive_definite" in caps) == type(solver).requires_positive_definite
    assert ("device_loop" in caps) == type(solver).vmap_tolerance


def _transforms_params() -> list:
    return [pytest.param(e, id=e.id) for e in registry.entries(registry.LINEAR)]


@pytest.mark.parametrize("entry", _transforms_params())
def test_transforms_tag_says_whether_a_linear_solver_runs_under_vmap(entry: registry.Entry) -> None:
    solver = entry.solver
    a = Systems(seed=1).system(registry.families(solver)[0])
    b = torch.randn(3, a.shape[0], dtype=DT, generator=torch.Generator().manual_seed(2))

    def solve(rhs: torch.Tensor) -> torch.Tensor:
        return solver(lambda v: a @ v, rhs).x

    if "transforms" in entry.tags:
        out = torch.func.vmap(solve)(b)
        assert out.shape == b.shape
        if "fixed_budget" in entry.tags:  # the same iterations as one solve per column
            torch.testing.assert_close(out, torch.stack([solve(col) for col in b]), rtol=1e-10, atol=1e-12)
    else:
        with pytest.raises(UnsupportedError, match="vmap"):
            torch.func.vmap(solve)(b)


@pytest.mark.parametrize("solver", registry.solvers("inner"))
def test_batched_tag_says_whether_an_inner_solver_takes_tasks(solver) -> None:
    scale = torch.tensor([1.0, 2.0], dtype=DT)
    x0 = torch.zeros(2, 3, dtype=DT)
    if "fixed_point" in registry.capabilities(solver):
        fn = lambda x, c: 0.5 * torch.cos(x) * c[:, None]  # noqa: E731  (a contraction per task)
    else:
        fn = lambda x, c: (0.5 * c[:, None] * (x - 1.0) ** 2).sum(-1)  # noqa: E731  (per-task values)
    if "batched" in registry.capabilities(solver):
        res = solver(fn, x0, scale, batched=True)
        assert res.x.shape == x0.shape and len(res.task_status) == 2
    else:
        with pytest.raises(UnsupportedError, match="batched"):
            solver(fn, x0, scale, batched=True)
