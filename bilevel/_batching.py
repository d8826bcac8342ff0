"""How a batch of tasks runs through a layer: the strategies and the "auto" choice between them.

``batched=True`` (``"auto"``), ``"vmap"`` (one vmapped computation over the tasks) or
``"loop"`` (one task at a time).  Which is faster depends on the net, the task size and
the device, so ``"auto"`` measures both once per shape (:func:`measure_strategies`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._autodiff import hvp, value_and_grad
from ._errors import BilevelValueError
from ._guards import suspended_saved_tensor_hooks
from ._problem import task_slice
from ._timing import time_alternatives
from ._tree import batch_size, is_tree, tree_flatten, tree_map

InDims = int | None | Sequence[int | None]
STRATEGIES = ("auto", "vmap", "loop")


def strategy_of(batched: Any, x: Any, name: str) -> str | None:
    """How a batch of tasks runs: None (not batched), "auto", "vmap" or "loop"."""
    if batched is False:
        return None
    if batched is True:
        return "auto"
    if isinstance(batched, str) and batched in STRATEGIES:
        return batched
    raise BilevelValueError(f"{name}: batched must be False, True or one of {STRATEGIES}, got {batched!r}")


def shape_key(x0: Any, args: tuple, dims: Sequence[int | None]) -> tuple:
    """What the ``"auto"`` choice depends on: the device, dtypes and shapes of the unknowns
    and of the arguments (and which of them carry the task dimension)."""
    leaves = tree_flatten(x0)[0]
    key: list[Any] = [str(leaves[0].device)] + [(tuple(t.shape), t.dtype) for t in leaves]
    for a, d in zip(args, dims):
        if is_tree(a):
            key.append((d, tuple((tuple(t.shape), t.dtype) for t in tree_flatten(a)[0])))
    return tuple(key)


def measure_strategies(one: Callable[..., Tensor], x0: Any, args: tuple, dims: tuple) -> dict[str, float]:
    """Seconds per strategy of what a batched solve is made of: one gradient and one
    Hessian-vector product of the objective for every task -- vmapped over the tasks, or one
    task at a time.  The inner solver's steps and the Krylov iterations of the backward are
    repetitions of exactly these, so their ratio is the solve's.

    Cost, once per shape: a warm-up gradient each way (the first ``torch.func`` transform of
    a process imports modules; the allocator warms up), then one timed round each; a second
    round, interleaved, only if the two are within 1.3× of each other (the faster round of
    each counts: :func:`~bilevel.time_alternatives`).  That is about two to four meta-steps'
    worth of gradients of one inner step -- a fraction of one meta-step of a 16-step inner
    loop."""
    x = tree_map(lambda t: t.detach(), x0)
    a = tuple(tree_map(lambda t: t.detach(), v) if is_tree(v) else v for v in args)
    v = tree_map(torch.ones_like, x)
    batched_obj = torch.func.vmap(one, in_dims=(0, *dims))
    n = batch_size(x)

    def vmapped(with_hvp: bool = True) -> None:
        value_and_grad(batched_obj, x, a, batched=True)
        if with_hvp:
            hvp(batched_obj, x, v, a, batched=True)

    def looped(with_hvp: bool = True) -> None:
        for b in range(n):
            xb, vb = tree_map(lambda t, b=b: t[b], x), tree_map(lambda t, b=b: t[b], v)
            ab = task_slice(a, dims, b)
            value_and_grad(one, xb, ab)
            if with_hvp:
                hvp(one, xb, vb, ab)

    device = tree_flatten(x)[0][0].device
    with suspended_saved_tensor_hooks():
        return time_alternatives({"vmap": vmapped, "loop": looped}, device,
                                 warmups={"vmap": lambda: vmapped(False), "loop": lambda: looped(False)})


def arg_dims(args: tuple, in_dims: InDims) -> tuple[int | None, ...]:
    """Per-argument vmap dims: ``in_dims`` for tensor trees, ``None`` for static objects."""
    if in_dims is None or isinstance(in_dims, int):
        return tuple(in_dims if is_tree(a) else None for a in args)
    dims = tuple(in_dims)
    if len(dims) != len(args):
        raise BilevelValueError(f"in_dims has {len(dims)} entries for {len(args)} arguments")
    for a, d in zip(args, dims):
        if d is not None and not is_tree(a):
            raise BilevelValueError(f"in_dims gives dimension {d} to a non-tensor argument of type {type(a).__name__}")
    return dims


def task_count(args: tuple, dims: tuple[int | None, ...]) -> int:
    sizes = set()
    for a, d in zip(args, dims):
        if d is not None:
            for leaf in tree_flatten(a)[0]:
                sizes.add(leaf.shape[d])
    if len(sizes) != 1:
        raise BilevelValueError(
            "batched mode needs task data with one common leading (task) dimension; "
            f"found sizes {sorted(sizes) if sizes else 'none (no batched argument)'}"
        )
    n = sizes.pop()
    if n == 0:
        raise BilevelValueError("batched mode got a batch of 0 tasks (the task dimension of the data is empty)")
    return n
