"""The precision policies: of the inner solve (``solve_dtype``) and of the backward
(``backward_dtype``), each decided once per call (docs/design.md §3).

The inner solve: when the unknowns or the arguments hold float16/bfloat16 tensors, the
half-precision tensors are lifted to float32 (a float64 one stays float64: nothing is
lowered) and x* returned in the unknowns' dtypes -- a master copy, as in mixed-precision training
(:func:`master_casts`) -- because a solver whose tolerance follows bfloat16's epsilon
stops far from x*.

The backward: the adjoint system is a sum of many Jacobian products: in half precision it loses the
meta-gradient even when the inner solver may run in half precision.  So the backward
(the operator products, the linear solve and its reductions, the argument VJP) runs in
``backward_dtype`` -- ``"auto"``: the float16/bfloat16 tensors lifted to float32 when the
solution or an argument is in half precision -- and never under autocast, even when
``backward()`` is called inside an autocast region; each gradient is returned in its input's dtype.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._errors import BilevelTypeError, BilevelValueError
from ._guards import solution_of
from ._tree import tree_flatten, tree_unflatten

_HALF = (torch.float16, torch.bfloat16)


def check_dtype_policy(name: str, policy: Any) -> Any:
    """``policy`` if it is ``"auto"``, ``None`` or a floating dtype; else a clear error."""
    if not (policy in ("auto", None) or (isinstance(policy, torch.dtype) and policy.is_floating_point)):
        raise BilevelValueError(f"{name} must be 'auto', None or a floating torch.dtype, got {policy!r}")
    return policy


class Work(NamedTuple):
    """The precision a computation runs in: ``dtype``, and whether only narrower floating
    tensors are lifted to it (``"auto"``: half precision becomes float32, a float64 tensor
    beside it stays float64 -- nothing is lowered, and nothing becomes slower than float32)
    or every floating tensor is cast (a dtype given by the user)."""

    dtype: torch.dtype
    lift_only: bool


def work_dtype(policy: Any, tensors: Sequence[Tensor]) -> Work | None:
    """The precision a computation on ``tensors`` runs in, if not the inputs' own (``None``).

    ``"auto"``: float32 for the float16/bfloat16 tensors when there is one.  A dtype: that
    one for every floating tensor.  ``None``: the inputs' own."""
    if policy is None:
        return None
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    if policy == "auto":
        return Work(torch.float32, True) if any(d in _HALF for d in floats) else None
    return Work(policy, False) if any(d != policy for d in floats) else None


def _to(t: Tensor, work: Work) -> Tensor:
    if not t.is_floating_point() or (work.lift_only and t.dtype.itemsize >= work.dtype.itemsize):
        return t
    return t.to(work.dtype)


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


def cast(tensors: Sequence[Any], work: Work | None) -> list[Any]:
    """The floating tensors in ``work``'s precision (everything else, ``None`` included,
    unchanged; all unchanged when ``work`` is ``None``)."""
    if work is None:
        return list(tensors)
    return [_to(t, work) if isinstance(t, Tensor) else t for t in tensors]


def tensor_leaves(tree: Any) -> list[Tensor]:
    """The tensors of a tree, or of a tuple of arguments some of which are static (not trees)."""
    try:
        return tree_flatten(tree)[0]
    except TypeError:
        return [t for a in tree for t in tensor_leaves(a)] if isinstance(tree, tuple) else []


def master_casts(master: Work | None, dtypes: list[torch.dtype]) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """``(lift, lower)``: floating tensors of any tree to ``master``'s precision, and the
    unknowns back to their own ``dtypes`` (identities when there is no master precision)."""
    if master is None:
        return (lambda t: t), (lambda t: t)

    def lift(tree: Any) -> Any:
        try:
            leaves, d = tree_flatten(tree)
        except TypeError:  # a static (non-tensor) argument, or a tuple of arguments holding one
            return tuple(lift(a) for a in tree) if isinstance(tree, tuple) else tree
        return tree_unflatten(d, [_to(t, master) for t in leaves])

    def lower(tree: Any) -> Any:
        leaves, d = tree_flatten(tree)
        return tree_unflatten(d, [t.to(dt) for t, dt in zip(leaves, dtypes)])

    return lift, lower


def _floating_names(msg: str) -> set[str]:
    """The floating dtypes a torch error message names (``Float``, ``c10::BFloat16``,
    ``torch.float16``...), normalised."""
    alias = {"half": "float16", "float": "float32", "double": "float64"}
    words = re.findall(r"\b(bfloat16|float16|float32|float64|half|float|double)\b", msg.lower())
    return {alias.get(w, w) for w in words}


@contextlib.contextmanager
def explain_dtype_errors(name: str, what: str, option: str, work: Work | None) -> Iterator[None]:
    """Re-raise torch's error about two floating dtypes that do not mix, from a computation
    whose inputs a precision policy cast to ``work``, with what is the usual cause: a tensor
    in another precision that the user's function closes over, which the policy cannot
    see (a no-op when nothing was cast; any other error passes through)."""
    if work is None:
        yield
        return
    try:
        yield
    except RuntimeError as e:
        msg = str(e)
        if ("dtype" not in msg and "scalar type" not in msg) or len(_floating_names(msg)) < 2:
            raise
        short = str(work.dtype).replace("torch.", "")
        raise BilevelTypeError(
            f"{name}: the {what} ran in {short} (the layer's {option}) and failed on a dtype "
            f"mismatch ({msg.splitlines()[0]}): a tensor in another precision that the function closes over stays as "
            "it is. "
            f"Pass it as an argument of the layer (it is then lifted too), or set {option}=None to run in the "
            "inputs' precision"
        ) from e


def solve_precision(layer: Any, x0: Any, args: tuple) -> tuple[Work | None, Callable[[Any], Any], Callable[[Any], Any]]:
    """The precision policy of ``layer``'s inner solve for one call (``layer.solve_dtype``):
    ``(master, lift, lower)``, recorded in its diagnostics.  Half-precision unknowns and
    arguments are lifted to float32 and the solution comes back in the unknowns' dtypes (a
    master copy, as in mixed-precision training): a bfloat16 solve would stop at
    bfloat16's tolerance, far from x*."""
    x_leaves = tree_flatten(x0)[0]
    master = work_dtype(layer.solve_dtype, [*x_leaves, *tensor_leaves(args)])
    layer.diagnostics.solve_dtype = None if master is None else master.dtype
    lift, lower = master_casts(master, [t.dtype for t in x_leaves])
    return master, lift, lower


def in_master_precision(name: str, master: Work | None, lift: Callable[[Any], Any], lower: Callable[[Any], Any],
                        call: Callable[..., Any]) -> Callable[..., Any]:
    """``call(x0, *args)`` (an inner solve) run on lifted inputs, its solution lowered back
    into the solver's result (a dataclass, an object with ``.x``, or the tree itself)."""

    def solve(x0_: Any, *a: Any) -> Any:
        x0_, a = lift(x0_), lift(a)
        with explain_dtype_errors(name, "inner solve", "solve_dtype", master):
            res = call(x0_, *a)
        if master is None:
            return res
        x = lower(solution_of(res, name))
        if dataclasses.is_dataclass(res) and not isinstance(res, type):
            return dataclasses.replace(res, x=x)
        if hasattr(res, "x") and not isinstance(res, Tensor):
            out = copy.copy(res)
            out.x = x
            return out
        return x

    return solve

