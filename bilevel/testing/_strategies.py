"""Hypothesis strategies of :class:`~bilevel.testing.BilevelProblem`: they draw the sizes,
dtype, parameter layout and seed, and call the builders of :mod:`bilevel.testing._builders`
(hypothesis then shrinks the sizes and the seed)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._errors import BilevelValueError
from ._builders import make_logistic, make_mlp, make_quadratic, make_ridge, make_softmax
from ._problem import DTYPES, PARAM_KINDS, BilevelProblem

# --------------------------------------------------------------------------------------
# hypothesis strategies
# --------------------------------------------------------------------------------------
IntSpec = int | tuple[int, int]
FloatSpec = float | tuple[float, float]
DtypeSpec = torch.dtype | Sequence[torch.dtype]
KindSpec = str | Sequence[str]


def _st() -> Any:
    try:
        from hypothesis import strategies as st
    except ImportError as e:  # pragma: no cover - hypothesis is a test dependency
        raise ImportError("bilevel.testing strategies need hypothesis: pip install 'bilevel[test]'") from e
    return st


def _ints(spec: IntSpec, name: str, lo: int) -> Any:
    st = _st()
    a, b = (spec, spec) if isinstance(spec, int) else spec
    if not (isinstance(a, int) and isinstance(b, int) and lo <= a <= b):
        raise BilevelValueError(f"{name} must be an int >= {lo} or a range (lo, hi) with {lo} <= lo <= hi, got {spec!r}")
    return st.integers(a, b)


def _choice(spec: Any, name: str, allowed: Sequence[Any]) -> Any:
    st = _st()
    vals = [spec] if isinstance(spec, (str, torch.dtype)) else list(spec)
    if not vals or any(v not in allowed for v in vals):
        raise BilevelValueError(f"{name} must be one of {tuple(allowed)} or a sequence of them, got {spec!r}")
    return st.sampled_from(vals)


def _seeds() -> Any:
    return _st().integers(0, 2**31 - 1)


def _builds(make: Callable[..., BilevelProblem], dtype: DtypeSpec, param_kind: KindSpec, **sizes: Any) -> Any:
    """Strategy of ``make(**sizes, dtype=..., param_kind=..., seed=...)`` over drawn arguments.

    ``sizes`` are strategies (e.g. from :func:`_ints`); ``dtype`` and ``param_kind`` are
    validated and drawn with :func:`_choice`, and a seed is drawn last.
    """
    return _st().builds(
        make,
        **sizes,
        dtype=_choice(dtype, "dtype", DTYPES),
        param_kind=_choice(param_kind, "param_kind", PARAM_KINDS),
        seed=_seeds(),
    )


def quadratic_problems(
    *,
    dim: IntSpec = (2, 8),
    condition: FloatSpec = (1.0, 100.0),
    dtype: DtypeSpec = DTYPES,
    param_kind: KindSpec = PARAM_KINDS,
) -> Any:
    """Strongly convex quadratics with a chosen condition number (see :func:`make_quadratic`).

    Args:
        dim: number of unknowns, or a range ``(lo, hi)``.
        condition: condition number of the inner Hessian ``A``, or a range (drawn
            log-uniformly).
        dtype: a dtype or a sequence of dtypes to draw from.
        param_kind: ``"tensor"``, ``"tuple"``, ``"dict"`` or a sequence of them.

    Returns:
        a hypothesis strategy of :class:`BilevelProblem`.

    Examples:
        A property test: the implicit layer's solution matches the closed form.

        >>> import torch
        >>> from bilevel.testing import quadratic_problems
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=3, deadline=None, database=None)
        ... @given(quadratic_problems(dim=(2, 4), condition=(1.0, 10.0), dtype=torch.float64))
        ... def test_closed_form(problem):
        ...     theta = problem.theta_leaf()
        ...     phi = problem.proximal_layer()(theta, *problem.data)
        ...     exact = problem.exact_proximal(theta)
        ...     assert torch.allclose(problem.layout.flat(phi), problem.layout.flat(exact))
        >>> test_closed_form()
    """
    st = _st()
    if isinstance(condition, (int, float)):
        cond = st.just(float(condition))
        lo = hi = float(condition)
    else:
        lo, hi = (float(c) for c in condition)
        # Drawn in log space so that condition numbers spread over the decades.
        cond = st.floats(math.log(lo), math.log(hi)).map(math.exp) if hi > lo else st.just(lo)
    if not 1.0 <= lo <= hi:
        raise BilevelValueError(f"condition must be >= 1 (or a range 1 <= lo <= hi), got {condition!r}")
    return _builds(make_quadratic, dtype, param_kind, dim=_ints(dim, "dim", 2), condition=cond)


def ridge_problems(*, dim: IntSpec = (2, 8), dtype: DtypeSpec = DTYPES, param_kind: KindSpec = PARAM_KINDS) -> Any:
    """Ridge regression problems (see :func:`make_ridge`).

    The arguments are those of :func:`quadratic_problems` (here ``dim >= 2``); the result is a
    hypothesis strategy of :class:`BilevelProblem`.

    Examples:
        >>> from bilevel.testing import ridge_problems
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=3, deadline=None, database=None)
        ... @given(ridge_problems(dim=3, param_kind="dict"))
        ... def test_ridge(problem):
        ...     assert problem.name == "ridge" and problem.dim == 3 and set(problem.theta) == {"w", "b"}
        >>> test_ridge()
    """
    return _builds(make_ridge, dtype, param_kind, dim=_ints(dim, "dim", 2))


def logistic_problems(*, dim: IntSpec = (2, 8), dtype: DtypeSpec = DTYPES, param_kind: KindSpec = PARAM_KINDS) -> Any:
    """L2-regularised logistic regression problems (see :func:`make_logistic`).

    The arguments are those of :func:`quadratic_problems` (here ``dim >= 2``); the result is a
    hypothesis strategy of :class:`BilevelProblem`.

    Examples:
        >>> from bilevel.testing import logistic_problems
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=3, deadline=None, database=None)
        ... @given(logistic_problems(dim=(2, 4)))
        ... def test_logistic(problem):
        ...     assert 0 < problem.mu <= problem.L and 2 <= problem.dim <= 4
        >>> test_logistic()
    """
    return _builds(make_logistic, dtype, param_kind, dim=_ints(dim, "dim", 2))


def softmax_problems(
    *,
    features: IntSpec = (1, 2),
    classes: IntSpec = (2, 3),
    dtype: DtypeSpec = DTYPES,
    param_kind: KindSpec = PARAM_KINDS,
) -> Any:
    """Softmax regression problems, ``features * classes + classes`` unknowns (see :func:`make_softmax`).

    Args:
        features: number of input features (>= 1), or a range ``(lo, hi)``.
        classes: number of classes (>= 2), or a range ``(lo, hi)``.
        dtype: a dtype or a sequence of dtypes to draw from.
        param_kind: ``"tensor"``, ``"tuple"``, ``"dict"`` or a sequence of them.

    Returns:
        a hypothesis strategy of :class:`BilevelProblem`.

    Examples:
        >>> from bilevel.testing import softmax_problems
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=3, deadline=None, database=None)
        ... @given(softmax_problems(features=1, classes=(2, 3)))
        ... def test_softmax(problem):
        ...     assert problem.dim in (1 * 2 + 2, 1 * 3 + 3)
        >>> test_softmax()
    """
    return _builds(
        make_softmax, dtype, param_kind, features=_ints(features, "features", 1), classes=_ints(classes, "classes", 2)
    )


def mlp_proximal_problems(
    *,
    inputs: IntSpec = (1, 2),
    hidden: IntSpec = (2, 3),
    dtype: DtypeSpec = DTYPES,
    param_kind: KindSpec = PARAM_KINDS,
) -> Any:
    """Small tanh-MLP problems with a proximal weight strong enough for convexity (see :func:`make_mlp`).

    Args:
        inputs: number of inputs (>= 1), or a range ``(lo, hi)``.
        hidden: number of hidden units (>= 1), or a range ``(lo, hi)``.
        dtype: a dtype or a sequence of dtypes to draw from.
        param_kind: ``"tensor"``, ``"tuple"``, ``"dict"`` or a sequence of them.

    Returns:
        a hypothesis strategy of :class:`BilevelProblem`.

    Examples:
        >>> import torch
        >>> from bilevel.testing import mlp_proximal_problems
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=3, deadline=None, database=None)
        ... @given(mlp_proximal_problems(inputs=1, hidden=2, dtype=torch.float64))
        ... def test_mlp(problem):
        ...     assert problem.proximal_curvature[0] > 0     # strongly convex with the proximal term
        >>> test_mlp()
    """
    return _builds(make_mlp, dtype, param_kind, inputs=_ints(inputs, "inputs", 1), hidden=_ints(hidden, "hidden", 1))


PROBLEM_NAMES: tuple[str, ...] = ("quadratic", "ridge", "logistic", "softmax", "mlp")
"""The problem families :func:`problems` draws from (its ``names`` argument).

Examples:
    >>> from bilevel.testing import PROBLEM_NAMES
    >>> PROBLEM_NAMES
    ('quadratic', 'ridge', 'logistic', 'softmax', 'mlp')
"""


def problems(
    *,
    names: Sequence[str] = PROBLEM_NAMES,
    max_dim: int = 8,
    dtype: DtypeSpec = DTYPES,
    param_kind: KindSpec = PARAM_KINDS,
) -> Any:
    """Any of the problem families (``one_of``), each with at most ``max_dim`` unknowns.

    Args:
        names: which families to draw from (a subset of :data:`PROBLEM_NAMES`).
        max_dim: upper bound on the number of unknowns (>= 4: the smallest softmax
            problem has 4; the smallest MLP 4).
        dtype: a dtype or a sequence of dtypes to draw from.
        param_kind: ``"tensor"``, ``"tuple"``, ``"dict"`` or a sequence of them.

    Returns:
        a hypothesis strategy of :class:`BilevelProblem`.

    Examples:
        >>> from bilevel.testing import problems
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=3, deadline=None, database=None)
        ... @given(problems(names=("quadratic", "logistic"), max_dim=5))
        ... def test_any(problem):
        ...     assert problem.name in ("quadratic", "logistic") and problem.dim <= 5
        >>> test_any()
    """
    st = _st()
    if not names or any(n not in PROBLEM_NAMES for n in names):
        raise BilevelValueError(f"names must be a non-empty subset of {PROBLEM_NAMES}, got {names!r}")
    if not (isinstance(max_dim, int) and max_dim >= 4):
        raise BilevelValueError(f"max_dim must be an int >= 4, got {max_dim!r}")
    kw: dict[str, Any] = {"dtype": dtype, "param_kind": param_kind}
    d = (2, max_dim)
    out = []
    for name in names:
        if name == "quadratic":
            out.append(quadratic_problems(dim=d, **kw))
        elif name == "ridge":
            out.append(ridge_problems(dim=d, **kw))
        elif name == "logistic":
            out.append(logistic_problems(dim=d, **kw))
        elif name == "softmax":
            # features * classes + classes <= max_dim with classes = 2: features <= max_dim/2 - 1
            out.append(softmax_problems(features=(1, max(1, min(2, max_dim // 2 - 1))), classes=(2, 2 if max_dim < 9 else 3), **kw))
        else:
            # hidden * (inputs + 2) + 1 <= max_dim: two inputs only when 2 hidden units fit.
            i_hi = 2 if max_dim >= 9 else 1
            h_hi = max(1, min(3, (max_dim - 1) // (i_hi + 2)))
            out.append(mlp_proximal_problems(inputs=(1, i_hi), hidden=(1, h_hi), **kw))
    return st.one_of(*out)
