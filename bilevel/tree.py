"""Tensor trees: the helpers the library uses on parameters, public for programs built on it.

A tree is a Tensor, a tuple or list of trees, or a dict ``str -> tree`` -- e.g.
``dict(model.named_parameters())``.  With ``batched=True`` every leaf carries a leading
task dimension ``B`` and the reductions (:func:`tree_vdot`, :func:`tree_norm`,
:func:`tree_relative_error`, :func:`tree_cosine`) return one value per task, shape ``(B,)``.

Examples:
    >>> import torch
    >>> from bilevel.tree import tree_norm, tree_relative_error
    >>> g = {"w": torch.ones(4, 3), "b": torch.ones(4)}     # 4 tasks
    >>> tree_norm(g, batched=True)
    tensor([2., 2., 2., 2.])
    >>> float(tree_relative_error({"w": torch.ones(3)}, {"w": torch.full((3,), 2.0)}))
    0.5
"""

from __future__ import annotations

from ._tree import (
    Tree,
    TreeDef,
    batch_size,
    is_tree,
    tree_axpy,
    tree_cosine,
    tree_detach,
    tree_flatten,
    tree_map,
    tree_norm,
    tree_ravel,
    tree_relative_error,
    tree_scale,
    tree_size,
    tree_sub,
    tree_unflatten,
    tree_unravel,
    tree_vdot,
    tree_where,
    tree_zeros_like,
)

__all__ = [
    "Tree",
    "TreeDef",
    "batch_size",
    "is_tree",
    "tree_axpy",
    "tree_cosine",
    "tree_detach",
    "tree_flatten",
    "tree_map",
    "tree_norm",
    "tree_ravel",
    "tree_relative_error",
    "tree_scale",
    "tree_size",
    "tree_sub",
    "tree_unflatten",
    "tree_unravel",
    "tree_vdot",
    "tree_where",
    "tree_zeros_like",
]
