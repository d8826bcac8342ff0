"""Choosing between equivalent computations by timing them: the rule behind
``batched="auto"``, public as :func:`time_alternatives` so that programs built on the
library (the few-shot application's query pass) choose by the same rule."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ._errors import BilevelValueError

__all__ = ["CLOSE", "probe_clock", "time_alternatives"]

#: A second timed round is run only when the first round's fastest and slowest times are
#: within this ratio: a clear winner is not measured twice.
CLOSE = 1.3


def probe_clock(fn: Callable[[], Any], device: torch.device | None) -> float:
    """Seconds one call of ``fn`` takes, a CUDA device synchronised at both ends (the one
    place :func:`time_alternatives` reads a clock; tests replace it)."""
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def time_alternatives(
    runs: Mapping[str, Callable[[], Any]],
    device: torch.device | None = None,
    *,
    warmups: Mapping[str, Callable[[], Any]] | None = None,
    close: float = CLOSE,
) -> dict[str, float]:
    """Seconds per alternative, measured so that a one-off choice between equivalent
    computations (vmap or a loop over tasks, say) is cheap and not fooled by a cold start.

    Each alternative is called once untimed (``warmups[name]`` if given, e.g. a cheaper
    part of it: the first ``torch.func`` transform of a process imports modules and the
    allocator warms up), then timed once; a second round, interleaved, runs only when the
    slowest time is within ``close`` of the fastest. The faster round of each counts. A
    CUDA device is synchronised around every timed call.

    Args:
        runs: name → a function of no arguments doing the work once.
        device: where the work runs (``None``: the CPU, no synchronisation).
        warmups: name → the untimed first call (default, and for names it lacks: ``runs``).
        close: the ratio below which a second round is timed (> 1).

    Raises:
        BilevelValueError: no alternatives, or ``close <= 1``.

    Returns:
        name → seconds (the smaller of the timed rounds).

    Example:
        >>> import torch, bilevel
        >>> x = torch.randn(8, 64, 64)
        >>> s = bilevel.time_alternatives({"bmm": lambda: x @ x,
        ...                                "loop": lambda: [m @ m for m in x]})
        >>> sorted(s)
        ['bmm', 'loop']
        >>> best = min(s, key=s.__getitem__)
    """
    if not runs:
        raise BilevelValueError("time_alternatives: no alternatives to time")
    if not close > 1:
        raise BilevelValueError(f"time_alternatives: close must be > 1, got {close!r}")
    for name, fn in runs.items():
        (warmups or {}).get(name, fn)()
    seconds: dict[str, float] = {}
    for _ in range(2):
        for name, fn in runs.items():
            t = probe_clock(fn, device)
            seconds[name] = min(t, seconds.get(name, t))
        if max(seconds.values()) > close * min(seconds.values()):
            break
    return seconds
