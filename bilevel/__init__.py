"""bilevel: differentiable solutions of inner optimisation problems for PyTorch."""

from __future__ import annotations

from ._result import (
    ConvergenceError,
    ConvergenceWarning,
    LinearSolveResult,
    NonFiniteError,
    SolverResult,
    Status,
)

__version__ = "0.1.0"
