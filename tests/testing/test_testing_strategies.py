"""The hypothesis strategies of bilevel.testing draw well-posed problems, as documented.

Invariants checked on drawn examples: dtype and tree structure as asked; sizes within the
bounds; both objectives (proximal and argmin) strongly convex at their solutions with
Hessian eigenvalues within the documented bounds; exact condition numbers for the
quadratics; closed forms agree with a solver; reproducible from the seed.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bilevel._tree import tree_flatten, tree_unflatten
from bilevel.solvers import NewtonCG
from bilevel.testing import (
    DTYPES,
    PARAM_KINDS,
    BilevelProblem,
    logistic_problems,
    make_logistic,
    make_mlp,
    make_quadratic,
    make_ridge,
    make_softmax,
    mlp_proximal_problems,
    problems,
    quadratic_problems,
    ridge_problems,
    softmax_problems,
)

DT = torch.float64

# When a hypothesis test fails, hypothesis's report imports mypy_extensions, whose
# DeprecationWarning (an error under filterwarnings=error) would turn the readable
# falsifying example into a pytest INTERNALERROR.
pytestmark = pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")



def _cast(tree: Any, dtype: torch.dtype) -> Any:
    leaves, d = tree_flatten(tree)
    return tree_unflatten(d, [t.detach().to(dtype) for t in leaves])


def _data64(p: BilevelProblem) -> tuple:
    return tuple(d.to(DT) if d.dtype.is_floating_point else d for d in p.data)


def _hessian_eigs(p: BilevelProblem, objective: Any, x: Any, *args: Any) -> torch.Tensor:
    """Eigenvalues of the Hessian of ``objective`` in the flat coordinates, in float64."""
    z = p.layout.flat(x)

    def f(zz: torch.Tensor) -> torch.Tensor:
        return objective(p.layout.tree(zz), *args)

    return torch.linalg.eigvalsh(torch.func.hessian(f)(z))


def _check_structure(p: BilevelProblem) -> None:
    leaves, _ = tree_flatten(p.theta)
    assert all(t.dtype == p.dtype and not t.requires_grad and bool(torch.isfinite(t).all()) for t in leaves)
    if p.param_kind == "tensor":
        assert isinstance(p.theta, torch.Tensor) and p.theta.dim() == 1
    elif p.param_kind == "tuple":
        assert isinstance(p.theta, tuple) and len(p.theta) >= 2
    else:
        assert isinstance(p.theta, dict) and len(p.theta) >= 2
    assert sum(t.numel() for t in leaves) == p.dim
    assert tree_flatten(p.x0)[1] == tree_flatten(p.theta)[1]
    v = p.inner(p.theta, *p.data)
    assert v.dim() == 0 and v.dtype == p.dtype
    o = p.outer(p.theta)
    assert o.dim() == 0 and o.dtype == p.dtype
    assert p.lam > 0 and p.L >= p.mu
    assert repr(p).startswith(f"BilevelProblem({p.name}") and f"seed={p.seed}" in repr(p)


def _check_well_posed(p: BilevelProblem) -> None:
    """Both objectives strongly convex at their (float64) solutions, within the bounds."""
    theta, x0, data = _cast(p.theta, DT), _cast(p.x0, DT), _data64(p)
    solver = NewtonCG(rtol=1e-10, maxiter=100)
    lam = p.lam
    cases = (
        (lambda x, th, *d: p.proximal_objective(x, th, *d), theta, p.proximal_curvature),
        (p.argmin_objective, x0, p.argmin_curvature),
    )
    for objective, start, (lo, hi) in cases:
        res = solver(objective, start, theta, *data)
        assert res.status.ok, (p, res.status)
        e = _hessian_eigs(p, objective, res.x, theta, *data)
        # The bounds are exact for the float64 numbers; float32 problems are those rounded.
        slack = (1e-8 if p.dtype == DT else 1e-5) * hi
        assert float(e.min()) > 0, (p, e)
        assert float(e.min()) >= lo - slack and float(e.max()) <= hi + slack, (p, e, lo, hi)
    if p.name != "mlp":
        # Convex inner loss: mu is a lower bound of its Hessian everywhere (checked at θ).
        e = _hessian_eigs(p, p.inner, theta, *data)
        rel = 1e-8 if p.dtype == DT else 1e-5
        assert float(e.min()) >= p.mu - rel * p.L and float(e.max()) <= p.L * (1 + rel)
    else:
        # The proximal weight must dominate the non-convexity found.
        assert lam >= 4 * max(0.0, -p.mu) and lam >= 1


@given(problem=problems())
def test_any_problem_is_well_posed(problem: BilevelProblem) -> None:
    _check_structure(problem)
    _check_well_posed(problem)


@given(problem=mlp_proximal_problems(dtype=DT))
def test_mlp_problems_are_convex_at_their_solutions(problem: BilevelProblem) -> None:
    _check_structure(problem)
    _check_well_posed(problem)


@given(problem=softmax_problems(dtype=torch.float32))
def test_softmax_problems_structure(problem: BilevelProblem) -> None:
    _check_structure(problem)
    y = problem.data[1]
    assert y.dtype == torch.float32 and bool(((y == 0) | (y == 1)).all()) and bool((y.sum(1) == 1).all())


@given(problem=quadratic_problems(condition=(3.0, 1e4), dtype=DT))
def test_quadratic_condition_number_in_range(problem: BilevelProblem) -> None:
    A, _ = problem.quadratic  # type: ignore[misc]
    e = torch.linalg.eigvalsh(A)
    kappa = float(e.max() / e.min())
    assert 3.0 * (1 - 1e-9) <= kappa <= 1e4 * (1 + 1e-9)
    assert problem.mu == pytest.approx(float(e.min()), rel=1e-10)
    assert problem.L == pytest.approx(float(e.max()), rel=1e-10)


@pytest.mark.parametrize("kappa", [1.0, 10.0, 1000.0])
def test_quadratic_chosen_condition(kappa: float) -> None:
    p = make_quadratic(6, kappa, DT, "tensor", 0)
    e = torch.linalg.eigvalsh(p.quadratic[0])  # type: ignore[index]
    assert float(e.max() / e.min()) == pytest.approx(kappa, rel=1e-9)


@given(
    problem=st.one_of(
        quadratic_problems(dim=3, dtype=torch.float32, param_kind="dict"),
        ridge_problems(dim=3, dtype=torch.float32, param_kind="dict"),
        logistic_problems(dim=3, dtype=torch.float32, param_kind="dict"),
    )
)
def test_dtype_kind_and_dim_are_honoured(problem: BilevelProblem) -> None:
    assert problem.dtype == torch.float32 and problem.param_kind == "dict" and problem.dim == 3
    assert set(problem.theta) == {"w", "b"} and problem.theta["b"].shape == ()


@pytest.mark.parametrize("kind", PARAM_KINDS)
def test_mlp_tree_layout(kind: str) -> None:
    p = make_mlp(2, 3, DT, kind, 0)
    assert p.dim == 3 * 2 + 3 + 3 + 1
    if kind == "dict":
        assert {k: tuple(v.shape) for k, v in p.theta.items()} == {"w1": (3, 2), "b1": (3,), "w2": (3,), "b2": ()}
    if kind == "tuple":
        assert [tuple(t.shape) for t in p.theta] == [(3, 2), (3,), (3,), ()]


@pytest.mark.parametrize("maker", [make_ridge, make_quadratic])
def test_closed_forms_match_the_solver(maker: Any) -> None:
    p = maker(5, 30.0, DT, "tuple", 3) if maker is make_quadratic else maker(5, DT, "tuple", 3)
    phi = p.proximal_layer()(p.theta, *p.data)
    x = p.argmin_layer()(p.x0, p.theta, *p.data)
    for a, b in zip(tree_flatten(phi)[0], tree_flatten(p.exact_proximal(p.theta))[0]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    for a, b in zip(tree_flatten(x)[0], tree_flatten(p.exact_argmin(p.theta))[0]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="no closed form"):
        make_softmax(1, 2, DT, "tensor", 0).exact_proximal(p.theta)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reproducible_from_the_seed(dtype: torch.dtype) -> None:
    a, b, c = (make_logistic(4, dtype, "tensor", s) for s in (7, 7, 8))
    for x, y in zip(tree_flatten((a.theta, a.data, a.x0))[0], tree_flatten((b.theta, b.data, b.x0))[0]):
        assert torch.equal(x, y)
    assert a.lam == b.lam and a.mu == b.mu and a.L == b.L
    assert not torch.equal(a.theta, c.theta)
    # float32 problems are the float64 ones rounded: same seed, same problem.
    d = make_logistic(4, torch.float64, "tensor", 7)
    torch.testing.assert_close(a.theta.double(), d.theta, rtol=1e-6, atol=1e-7)


@given(problem=problems(max_dim=5, dtype=DT, param_kind="tensor"))
def test_problems_max_dim(problem: BilevelProblem) -> None:
    assert problem.dim <= 5 and problem.dtype == DT and isinstance(problem.theta, torch.Tensor)


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="param_kind"):
        quadratic_problems(param_kind="list")
    with pytest.raises(ValueError, match="dtype"):
        ridge_problems(dtype=torch.float16)
    with pytest.raises(ValueError, match="dim"):
        logistic_problems(dim=(5, 2))
    with pytest.raises(ValueError, match="dim"):
        quadratic_problems(dim=1)
    with pytest.raises(ValueError, match="condition"):
        quadratic_problems(condition=0.5)
    with pytest.raises(ValueError, match="names"):
        problems(names=("quadratic", "lasso"))
    with pytest.raises(ValueError, match="max_dim"):
        problems(max_dim=3)
    with pytest.raises(ValueError, match="condition"):
        make_quadratic(3, 0.9, DT, "tensor", 0)
    with pytest.raises(ValueError, match="param_kind"):
        make_ridge(3, DT, "set", 0)


def test_hypothesis_profile_follows_the_environment() -> None:
    """tests/conftest.py: "ci" (default, bounded) or "thorough", by BILEVEL_HYPOTHESIS_PROFILE."""
    name = os.environ.get("BILEVEL_HYPOTHESIS_PROFILE", "ci")
    assert settings.default.max_examples == settings.get_profile(name).max_examples
    ci, thorough = settings.get_profile("ci"), settings.get_profile("thorough")
    assert ci.max_examples < thorough.max_examples
    assert ci.deadline is None and thorough.deadline is None  # each example solves problems


def test_problem_is_a_deprecated_alias_of_bilevel_problem() -> None:
    import bilevel.testing

    with pytest.warns(DeprecationWarning, match="use bilevel.testing.BilevelProblem"):
        assert bilevel.testing.Problem is BilevelProblem
    with pytest.raises(AttributeError, match="NoSuchName"):
        bilevel.testing.NoSuchName  # noqa: B018
