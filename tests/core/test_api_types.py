"""The API's vocabulary: one error hierarchy, one warning hierarchy, protocols every solver meets."""

from __future__ import annotations

import warnings

import pytest
import torch

import bilevel
from bilevel import linsolve, solvers


def test_every_library_exception_derives_from_bilevel_error_and_its_builtin() -> None:
    pairs = [
        (bilevel.BilevelValueError, ValueError),
        (bilevel.BilevelTypeError, TypeError),
        (bilevel.UnsupportedError, NotImplementedError),
        (bilevel.ConvergenceError, RuntimeError),
        (bilevel.NonFiniteError, FloatingPointError),
    ]
    for cls, builtin in pairs:
        assert issubclass(cls, bilevel.BilevelError) and issubclass(cls, builtin)
    for w in (bilevel.ConvergenceWarning, bilevel.ClosedOverTensorWarning):
        assert issubclass(w, bilevel.BilevelWarning) and issubclass(w, UserWarning)
    from bilevel.testing import GradCheckError

    assert issubclass(GradCheckError, bilevel.BilevelError) and issubclass(GradCheckError, AssertionError)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: bilevel.Proximal(lambda p, x: (p * x).sum(), lam=-1.0), bilevel.BilevelValueError),
        (lambda: bilevel.Argmin(3), bilevel.BilevelTypeError),
        (lambda: linsolve.CG(rtol=2.0), bilevel.BilevelValueError),
        (lambda: solvers.GradientDescent(lr=0.0, steps=1), bilevel.BilevelValueError),
        (lambda: solvers.LBFGS()(lambda x: (x * x).sum(), torch.zeros(2, 3), batched=True), bilevel.UnsupportedError),
    ],
)
def test_bad_input_raises_a_bilevel_error(make, expected) -> None:
    with pytest.raises(bilevel.BilevelError) as info:
        make()
    assert isinstance(info.value, expected)


def test_warnings_can_be_escalated_by_their_base_class() -> None:
    layer = bilevel.Proximal(lambda p, x: ((p - x) ** 2).sum(), lam=1.0,
                             solver=solvers.GradientDescent(lr=0.1, maxiter=1, rtol=1e-12))
    with warnings.catch_warnings():
        warnings.simplefilter("error", bilevel.BilevelWarning)
        with pytest.raises(bilevel.ConvergenceWarning):
            layer(torch.zeros(3, requires_grad=True), torch.ones(3))


def test_every_solver_meets_its_protocol() -> None:
    inner = [solvers.GradientDescent(lr=0.1, steps=1), solvers.Adam(), solvers.LBFGS(), solvers.NewtonCG(),
             solvers.ScipyMinimize(), solvers.FixedPointIteration()]
    for s in inner:
        assert isinstance(s, bilevel.InnerSolver)
    for ls in (linsolve.CG(), linsolve.MINRES(), linsolve.GMRES(), linsolve.BiCGSTAB(), linsolve.Neumann(), linsolve.Dense()):
        assert isinstance(ls, bilevel.LinearSolverLike)
