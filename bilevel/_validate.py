"""Validation of solver configurations (one helper for every immutable solver dataclass)."""

from __future__ import annotations

import math
from typing import Any

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
