"""Averaging meta-gradients across a ``torch.distributed`` process group.

Data-parallel meta-training splits a meta-batch of tasks across processes; each computes
the implicit meta-gradient of its share, and the mean over processes is the meta-gradient
of the whole meta-batch when the shares are equal (the mean of equal-sized means).  These
helpers do that averaging with PyTorch's own collectives (gloo on CPUs, NCCL on GPUs): the
tensors are packed into flat buckets of one dtype and device, and each bucket takes one
``all_reduce`` -- a handful of collectives per meta-step instead of one per tensor.

Without an initialised process group (or with one process) they do nothing, so the same
training code runs with and without ``torchrun``.  A meta-step under ``torchrun`` (each
process with its own share of the tasks)::

    meta_loss(theta, my_tasks).backward()                 # the implicit meta-gradient
    bilevel.distributed.average_gradients([theta])        # mean over the processes
    outer_optimizer.step()

Examples:
    In a single process (no process group) the same code runs unchanged:

    >>> import torch
    >>> from bilevel import distributed
    >>> theta = torch.zeros(3, requires_grad=True)
    >>> (2.0 * theta).sum().backward()
    >>> distributed.world_size()
    1
    >>> distributed.average_gradients([theta])            # the mean over one process
    >>> theta.grad
    tensor([2., 2., 2.])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._errors import BilevelValueError
from ._tree import tree_flatten, tree_unflatten

__all__ = ["all_reduce_mean", "average_gradients", "world_size"]


def world_size(group: Any = None) -> int:
    """Processes in ``group`` (1 without an initialised process group).

    Args:
        group: the process group (default: the world).

    Examples:
        >>> from bilevel.distributed import world_size
        >>> world_size()                    # no torch.distributed process group here
        1
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _buckets(tensors: list[Tensor], bucket_bytes: int) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (dtype, device), each group cut at ``bucket_bytes``."""
    by_kind: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        by_kind.setdefault((t.dtype, t.device), []).append(i)
    out: list[list[int]] = []
    for idx in by_kind.values():
        cur: list[int] = []
        size = 0
        for i in idx:
            nbytes = tensors[i].numel() * tensors[i].element_size()
            if cur and size + nbytes > bucket_bytes:
                out.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += nbytes
        if cur:
            out.append(cur)
    return out


def _mean_in_place(tensors: list[Tensor], group: Any, bucket_mb: float) -> None:
    n = world_size(group)
    if n == 1 or not tensors:
        return
    for bucket in _buckets(tensors, int(bucket_mb * 2**20)):
        flat = torch.cat([tensors[i].reshape(-1) for i in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(n)
        offset = 0
        for i in bucket:
            k = tensors[i].numel()
            tensors[i].copy_(flat[offset : offset + k].view_as(tensors[i]))
            offset += k


def all_reduce_mean(tree: Any, group: Any = None, *, bucket_mb: float = 25.0) -> Any:
    """The mean over the process group of a tensor tree (e.g. a meta-gradient), as a new tree.

    Every process must call it with trees of the same structure, shapes and dtypes.

    Args:
        tree: a tensor, or a dict/list/tuple tree of tensors.
        group: the process group (default: the world).
        bucket_mb: the size of the flat buffers reduced at once.

    Returns:
        A new tree (detached copies); the input is left unchanged.

    Raises:
        BilevelValueError: if ``bucket_mb <= 0``.

    Examples:
        Without a process group (or with one process) the mean is a copy:

        >>> import torch
        >>> from bilevel.distributed import all_reduce_mean
        >>> g = {"w": torch.ones(2, 2), "b": torch.tensor([0.5])}
        >>> mean = all_reduce_mean(g)
        >>> mean
        {'w': tensor([[1., 1.],
                [1., 1.]]), 'b': tensor([0.5000])}
        >>> mean["w"] is g["w"]
        False
    """
    if not bucket_mb > 0:
        raise BilevelValueError(f"bucket_mb must be > 0, got {bucket_mb!r}")
    leaves, treedef = tree_flatten(tree)
    copies = [t.detach().clone() for t in leaves]
    _mean_in_place(copies, group, bucket_mb)
    return tree_unflatten(treedef, copies)


def average_gradients(parameters: Iterable[Tensor], group: Any = None, *, bucket_mb: float = 25.0) -> None:
    """Replace each parameter's ``.grad`` by its mean over the process group, in place.

    Call it after the meta-gradient's ``backward()`` and before the outer optimiser's
    ``step()``.  A parameter without a gradient on this process gets zeros before the
    reduction, so that every process takes part in the same collectives.

    Args:
        parameters: the parameters whose ``.grad`` to average (those that do not require
            grad are skipped), e.g. ``model.parameters()``.
        group: the process group (default: the world).
        bucket_mb: the size of the flat buffers reduced at once.

    Raises:
        BilevelValueError: if ``bucket_mb <= 0``.

    Examples:
        >>> import torch
        >>> from bilevel.distributed import average_gradients
        >>> model = torch.nn.Linear(2, 1)
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> before = [p.grad.clone() for p in model.parameters()]
        >>> average_gradients(model.parameters())     # one process: unchanged
        >>> all(torch.equal(b, p.grad) for b, p in zip(before, model.parameters()))
        True
    """
    if not bucket_mb > 0:
        raise BilevelValueError(f"bucket_mb must be > 0, got {bucket_mb!r}")
    params = [p for p in parameters if p.requires_grad]
    if world_size(group) == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    _mean_in_place([p.grad for p in params if p.grad is not None], group, bucket_mb)
