"""Where a computation runs relative to ``torch.func`` transforms (one place for the checks).

The layers and solvers pick their code path from these: plain autograd outside any
transform (faster in eager mode), ``torch.func`` primitives inside one, and no host reads
when a ``vmap`` batches the values.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._tree import tree_flatten


def leaves_of(*objs: Any) -> list[Tensor]:
    """The tensor leaves of the tensor trees among ``objs`` (static objects are skipped)."""
    out: list[Tensor] = []
    for a in objs:
        try:
            out.extend(tree_flatten(a)[0])
        except (TypeError, ValueError):
            continue
    return out


def any_wrapped(tensors: Iterable[Tensor]) -> bool:
    """Whether a ``torch.func`` transform (grad, vjp, jvp, vmap, ...) wraps any of ``tensors``."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(wrapped(t) for t in tensors)


def any_dual(tensors: Iterable[Tensor]) -> bool:
    """Whether any of ``tensors`` carries a forward-mode tangent (``torch.autograd.forward_ad``)."""
    from torch.autograd import forward_ad

    return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def is_vmapped(t: Tensor) -> bool:
    """Whether ``t`` is batched by a ``vmap`` at any level of its ``torch.func`` wrappers."""
    ft = torch._C._functorch
    for _ in range(64):  # the wrapper depth is the number of nested transforms
        if ft.is_batchedtensor(t):
            return True
        if not ft.is_functorch_wrapped_tensor(t):
            return False
        t = ft.get_unwrapped(t)
    return False
