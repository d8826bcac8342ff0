"""Inner solvers: immutable configurations called as ``solver(objective, x0, *args)``.

See :mod:`bilevel.solvers._base` for the protocol (tensor trees, batched mode, results).
"""

from __future__ import annotations

from ._base import Solver

__all__ = ["Solver"]
