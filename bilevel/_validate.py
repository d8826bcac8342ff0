"""Validation of solver configurations (one helper for every immutable solver dataclass)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Protocol

from ._errors import BilevelValueError


def is_real(v: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_real(
    owner: str, name: str, v: Any, lo: float, hi: float = math.inf, lo_open: bool = True, hi_open: bool = True
) -> None:
    """Raise :class:`~bilevel.BilevelValueError` unless ``v`` is a finite real number in the interval."""
    ok = is_real(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise BilevelValueError(f"{owner}: {name} must be a real number in {lb}{lo}, {hi}{rb}, got {v!r}")


def check_int(owner: str, name: str, v: Any, lo: int) -> None:
    """Raise :class:`~bilevel.BilevelValueError` unless ``v`` is an int ``>= lo`` (not a bool)."""
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= lo):
        raise BilevelValueError(f"{owner}: {name} must be an int >= {lo}, got {v!r}")


def check_bool(owner: str, name: str, v: Any) -> None:
    """Raise :class:`~bilevel.BilevelValueError` unless ``v`` is a bool."""
    if not isinstance(v, bool):
        raise BilevelValueError(f"{owner}: {name} must be a bool, got {v!r}")


def check_tol(owner: str, tol: Any, name: str = "rtol") -> None:
    """``None`` (a default from the dtype) or a real number in (0, 1)."""
    if tol is not None:
        check_real(owner, name, tol, 0.0, 1.0)


def warn_renamed(owner: str, old: str, new: str, stacklevel: int = 4) -> None:
    """The one deprecation message of a renamed option (kept working for one release)."""
    warnings.warn(
        f"{owner}: {old} is deprecated and will be removed in bilevel 0.3; use {new} (docs/design.md §4)",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


class Budgeted(Protocol):
    """A solver configuration with a fixed budget or a tolerance (GradientDescent, Adam)."""

    @property
    def rtol(self) -> float | None: ...
    @property
    def atol(self) -> float: ...
    @property
    def steps(self) -> int | None: ...
    @property
    def maxiter(self) -> int | None: ...


def normalise_budget(solver: Budgeted, default_steps: int | None) -> None:
    """Settle ``steps`` / ``maxiter`` of a first-order inner solver (frozen dataclass) in place.

    The vocabulary (docs/design.md §4): ``steps`` is a fixed budget (no tolerance, status
    ``COMPLETED``); ``maxiter`` caps a solve to a tolerance (``rtol``/``atol``).  The old
    form ``steps=K`` together with ``rtol`` (a cap) still works, with a DeprecationWarning.
    """
    owner = type(solver).__name__
    check_tol(owner, solver.rtol)
    check_real(owner, "atol", solver.atol, 0.0, lo_open=False)
    tolerance = solver.rtol is not None or solver.atol > 0
    steps, maxiter = solver.steps, solver.maxiter
    if tolerance:
        if steps is not None and maxiter is not None:
            raise BilevelValueError(f"{owner}: with a tolerance the cap is maxiter; steps (a fixed budget) does not apply")
        if steps is not None:
            warn_renamed(owner, "steps=K together with rtol/atol (a cap)", "maxiter=K", stacklevel=5)
            steps, maxiter = None, steps
        if maxiter is None:
            if default_steps is None:
                raise BilevelValueError(f"{owner}: a solve to a tolerance needs its cap, maxiter=")
            maxiter = default_steps
        check_int(owner, "maxiter", maxiter, 0)
    else:
        if maxiter is not None:
            raise BilevelValueError(
                f"{owner}: maxiter caps a solve to a tolerance (rtol/atol); a fixed budget is steps="
            )
        if steps is None:
            if default_steps is None:
                raise BilevelValueError(f"{owner}: give steps= (a fixed budget) or rtol/atol with maxiter= (a cap)")
            steps = default_steps
        check_int(owner, "steps", steps, 0)
    object.__setattr__(solver, "steps", steps)
    object.__setattr__(solver, "maxiter", maxiter)
