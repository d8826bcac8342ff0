"""The examples in the docstrings of the public names this release added or changed run and
print what they say (doctest): ``bilevel.tree``, ``bilevel.hessian_extremes``, the inner
solvers' examples in the new vocabulary, and the result base class."""

from __future__ import annotations

import doctest

import pytest

import bilevel
from bilevel import tree
from bilevel.solvers import (
    LBFGS,
    Adam,
    BacktrackingArmijo,
    FixedPointIteration,
    GradientDescent,
    NewtonCG,
    StrongWolfe,
)

OBJECTS = {
    "bilevel.tree": tree,
    "bilevel.hessian_extremes": bilevel.hessian_extremes,
    "GradientDescent": GradientDescent,
    "Adam": Adam,
    "LBFGS": LBFGS,
    "NewtonCG": NewtonCG,
    "FixedPointIteration": FixedPointIteration,
    "SolveResult": bilevel.SolveResult,
    "Status": bilevel.Status,
    "BacktrackingArmijo": BacktrackingArmijo,
    "StrongWolfe": StrongWolfe,
    "Proximal.strategy_state": bilevel.Proximal.strategy_state,
}


@pytest.mark.parametrize("name", list(OBJECTS))
def test_docstring_example_runs_and_prints_what_it_says(name: str) -> None:
    finder = doctest.DocTestFinder(recurse=False)
    tests = [t for t in finder.find(OBJECTS[name], name) if t.examples]
    assert tests, f"{name} has no example in its docstring"
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for t in tests:
        runner.run(t)
    assert runner.failures == 0, f"{name}: {runner.failures} failing example(s)"
