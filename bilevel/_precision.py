"""The precision of the backward pass, decided once per backward (docs/design.md §3).

The adjoint system is a sum of many Jacobian products: in half precision it loses the
meta-gradient even when the inner solver may run in half precision.  So the backward
(the operator products, the linear solve and its reductions, the argument VJP) runs in
``backward_dtype`` -- ``"auto"``: float32 when the solution or an argument is
float16/bfloat16 -- and never under autocast, even when ``backward()`` is called inside
an autocast region; each gradient is returned in its input's dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

_HALF = (torch.float16, torch.bfloat16)


def work_dtype(policy: Any, tensors: Sequence[Tensor]) -> torch.dtype | None:
    """The dtype the backward runs in, if not the inputs' own (``None``)."""
    if policy is None:
        return None
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    if policy == "auto":
        return torch.float32 if any(d in _HALF for d in floats) else None
    return policy if any(d != policy for d in floats) else None


def _autocast_on(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: per-device query functions
        return bool(torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled())


@contextlib.contextmanager
def autocast_off(device_type: str) -> Iterator[None]:
    """Autocast disabled for ``device_type`` (a no-op when it is not enabled)."""
    if _autocast_on(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:
        yield


def cast(tensors: Sequence[Any], dtype: torch.dtype | None) -> list[Any]:
    """The floating tensors in ``dtype`` (everything else, ``None`` included, unchanged;
    all unchanged when ``dtype`` is ``None``)."""
    if dtype is None:
        return list(tensors)
    return [t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in tensors]
