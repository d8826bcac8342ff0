"""The precision policies: of the inner solve (``solve_dtype``) and of the backward
(``backward_dtype``), each decided once per call (docs/design.md §3).

The inner solve: float16/bfloat16 unknowns are solved as a float32 problem (a master copy,
as in mixed-precision training; :func:`master_casts`), because a solver whose tolerance
follows bfloat16's epsilon stops far from x*.

The backward: the adjoint system is a sum of many Jacobian products: in half precision it loses the
meta-gradient even when the inner solver may run in half precision.  So the backward
(the operator products, the linear solve and its reductions, the argument VJP) runs in
``backward_dtype`` -- ``"auto"``: float32 when the solution or an argument is
float16/bfloat16 -- and never under autocast, even when ``backward()`` is called inside
an autocast region; each gradient is returned in its input's dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ._errors import BilevelValueError
from ._tree import tree_flatten, tree_unflatten

_HALF = (torch.float16, torch.bfloat16)


def check_dtype_policy(name: str, policy: Any) -> Any:
    """``policy`` if it is ``"auto"``, ``None`` or a floating dtype; else a clear error."""
    if not (policy in ("auto", None) or (isinstance(policy, torch.dtype) and policy.is_floating_point)):
        raise BilevelValueError(f"{name} must be 'auto', None or a floating torch.dtype, got {policy!r}")
    return policy


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


def master_casts(master: torch.dtype | None, dtypes: list[torch.dtype]) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """``(lift, lower)``: floating tensors of any tree to ``master``, and the unknowns back
    to their own ``dtypes`` (identities when there is no master precision)."""
    if master is None:
        return (lambda t: t), (lambda t: t)

    def lift(tree: Any) -> Any:
        try:
            leaves, d = tree_flatten(tree)
        except TypeError:  # a static (non-tensor) argument, or a tuple of arguments holding one
            return tuple(lift(a) for a in tree) if isinstance(tree, tuple) else tree
        return tree_unflatten(d, [t.to(master) if t.is_floating_point() else t for t in leaves])

    def lower(tree: Any) -> Any:
        leaves, d = tree_flatten(tree)
        return tree_unflatten(d, [t.to(dt) for t, dt in zip(leaves, dtypes)])

    return lift, lower
