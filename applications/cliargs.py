"""What every command line of ``applications/`` shares: argparse types that refuse bad
numbers with one line, and an output folder that is created or refused with one line.

A user who types ``--threads 0`` or ``--out results.csv`` gets ``prog: error: ...`` and exit
status 2, never a traceback from deep inside torch or pathlib.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import NoReturn

__all__ = ["OneLineParser", "nonneg_int", "output_dir", "positive_float", "positive_int", "refuse_file_out"]


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``prog: error: ...``, exit status 2),
    without the usage block: the line says which option and why."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(s: str, lo: int, what: str) -> int:
    """``s`` as an integer >= ``lo`` (``1e9``, an integer in scientific notation, is accepted)."""
    try:
        v = int(s)
    except ValueError:
        try:
            f = float(s)
        except ValueError:
            f = math.nan
        if not (math.isfinite(f) and f == int(f)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {s}") from None
        v = int(f)
    if v < lo:
        raise argparse.ArgumentTypeError(f"must be {what}, got {s}")
    return v


def positive_int(s: str) -> int:
    """An integer >= 1."""
    return _int_at_least(s, 1, "a positive integer")


def nonneg_int(s: str) -> int:
    """An integer >= 0 (seeds, counts that may be zero)."""
    return _int_at_least(s, 0, "an integer >= 0")


def positive_float(s: str) -> float:
    """A finite number > 0."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s}")
    return v


def refuse_file_out(out: str | Path, option: str = "--out") -> Path:
    """``out`` as a path; ``NotADirectoryError`` (an ``OSError``, which the programs print as
    one line) when it names an existing file."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{option} {str(path)!r} is a file, not a folder: choose a folder for the run")
    return path


def output_dir(parser: argparse.ArgumentParser, path: str | Path, option: str = "--out") -> Path:
    """``path`` created as a folder (with its parents), or the parser's one-line error and
    exit status 2 when it cannot be: a file of that name, no permission, a read-only place."""

    def fail(why: str) -> NoReturn:
        parser.exit(2, f"{parser.prog}: error: {option} {path}: {why}\n")

    try:
        out = refuse_file_out(path, option)
    except NotADirectoryError:
        fail("is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot be created ({e.strerror or e})")
    return out
