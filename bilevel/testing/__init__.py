"""Test utilities for implicit layers: random well-posed problems and gradient checks.

* :func:`check_implicit_grad` — like :func:`torch.autograd.gradcheck`, for functions that
  contain implicit layers: compares the autograd gradient with central finite
  differences along random directions (re-solving the inner problem) and, optionally,
  with an unrolled gradient; returns a :class:`GradCheckReport` (or raises
  :class:`GradCheckError`).  Needs only torch.
* Hypothesis strategies of :class:`BilevelProblem` — :func:`quadratic_problems` (chosen condition
  number), :func:`ridge_problems`, :func:`logistic_problems`, :func:`softmax_problems`,
  :func:`mlp_proximal_problems` and :func:`problems` (any of them); parameters as a
  Tensor, a tuple or a dict, in float32 or float64.  They need ``hypothesis`` (the
  ``test`` extra); the deterministic builders ``make_*`` do not.

See docs/testing.md ("Testing your own implicit layer") for a walk-through.

Examples:
    Check the meta-gradient of a layer of your own against finite differences:

    >>> import torch, bilevel
    >>> from bilevel.testing import check_implicit_grad
    >>> layer = bilevel.Proximal(lambda phi, x: ((phi - x) ** 2).sum() + (phi ** 4).sum(), lam=2.0)
    >>> x = torch.tensor([0.5, -1.0], dtype=torch.float64)
    >>> theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    >>> check_implicit_grad(lambda t: layer(t, x).pow(2).sum(), (theta,)).ok
    True
"""

from __future__ import annotations

import warnings
from typing import Any

from ._builders import make_logistic, make_mlp, make_quadratic, make_ridge, make_softmax
from ._gradcheck import (
    GradCheckEntry,
    GradCheckError,
    GradCheckReport,
    check_implicit_grad,
    default_tolerances,
)
from ._problem import DTYPES, PARAM_KINDS, BilevelProblem, Layout
from ._strategies import (
    PROBLEM_NAMES,
    logistic_problems,
    mlp_proximal_problems,
    problems,
    quadratic_problems,
    ridge_problems,
    softmax_problems,
)

__all__ = [
    "DTYPES",
    "PARAM_KINDS",
    "PROBLEM_NAMES",
    "BilevelProblem",
    "GradCheckEntry",
    "GradCheckError",
    "GradCheckReport",
    "Layout",
    "check_implicit_grad",
    "default_tolerances",
    "logistic_problems",
    "make_logistic",
    "make_mlp",
    "make_quadratic",
    "make_ridge",
    "make_softmax",
    "mlp_proximal_problems",
    "problems",
    "quadratic_problems",
    "ridge_problems",
    "softmax_problems",
]


def __getattr__(name: str) -> Any:
    # ``Problem`` was renamed ``BilevelProblem`` (the library has other problem classes);
    # the old name works, with a warning, for one release.
    if name == "Problem":
        msg = "bilevel.testing.Problem is deprecated: use bilevel.testing.BilevelProblem"
        warnings.warn(msg, DeprecationWarning, stacklevel=2)
        return BilevelProblem
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
