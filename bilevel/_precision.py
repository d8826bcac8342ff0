"""The precision policies: of the inner solve (``solve_dtype``) and of the backward
(``backward_dtype``), each decided once per call (docs/design.md §3).

The inner solve: when the unknowns or the arguments hold float16/bfloat16 tensors, the
problem is solved in float32 (or float64, when an input is float64: nothing is lowered) and
x* returned in the unknowns' dtypes -- a master copy, as in mixed-precision training
(:func:`master_casts`) -- because a solver whose tolerance follows bfloat16's epsilon
stops far from x*.

The backward: the adjoint system is a sum of many Jacobian products: in half precision it loses the
meta-gradient even when the inner solver may run in half precision.  So the backward
(the operator products, the linear solve and its reductions, the argument VJP) runs in
``backward_dtype`` -- ``"auto"``: float32 (float64 beside a float64 input) when the
solution or an argument is float16/bfloat16 -- and never under autocast, even when ``backward()`` is called inside
an autocast region; each gradient is returned in its input's dtype.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ._errors import BilevelTypeError, BilevelValueError
from ._tree import tree_flatten, tree_unflatten

_HALF = (torch.float16, torch.bfloat16)


def check_dtype_policy(name: str, policy: Any) -> Any:
    """``policy`` if it is ``"auto"``, ``None`` or a floating dtype; else a clear error."""
    if not (policy in ("auto", None) or (isinstance(policy, torch.dtype) and policy.is_floating_point)):
        raise BilevelValueError(f"{name} must be 'auto', None or a floating torch.dtype, got {policy!r}")
    return policy


def work_dtype(policy: Any, tensors: Sequence[Tensor]) -> torch.dtype | None:
    """The dtype a computation on ``tensors`` runs in, if not the inputs' own (``None``).

    ``"auto"``: when any tensor is float16/bfloat16, the widest of float32 and the tensors'
    dtypes -- half precision is lifted, and a float64 tensor beside a bfloat16 one is never
    lowered.  A dtype: that one.  ``None``: the inputs' own."""
    if policy is None:
        return None
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    if policy == "auto":
        if not any(d in _HALF for d in floats):
            return None
        return functools.reduce(torch.promote_types, floats, torch.float32)
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


def tensor_leaves(tree: Any) -> list[Tensor]:
    """The tensors of a tree, or of a tuple of arguments some of which are static (not trees)."""
    try:
        return tree_flatten(tree)[0]
    except TypeError:
        return [t for a in tree for t in tensor_leaves(a)] if isinstance(tree, tuple) else []


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


@contextlib.contextmanager
def explain_dtype_errors(name: str, what: str, option: str, dtype: torch.dtype | None) -> Iterator[None]:
    """Re-raise torch's dtype-mismatch error from a computation that a precision policy lifted
    to ``dtype`` with what is the usual cause: a half-precision tensor that the user's
    function closes over, which the policy cannot see (a no-op when nothing was lifted)."""
    if dtype is None:
        yield
        return
    try:
        yield
    except RuntimeError as e:
        msg = str(e)
        if "dtype" not in msg and "scalar type" not in msg:
            raise
        short = str(dtype).replace("torch.", "")
        raise BilevelTypeError(
            f"{name}: the {what} ran in {short} (the layer's {option}) and failed on a dtype "
            f"mismatch ({msg.splitlines()[0]}): a half-precision tensor the function closes over stays as it is. "
            f"Pass it as an argument of the layer (it is then lifted too), or set {option}=None to run in the "
            "inputs' precision"
        ) from e
