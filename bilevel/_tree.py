"""Tensor trees: a Tensor, a tuple/list of Tensors, or a dict ``str -> Tensor``.

Parameters of a network (``dict(model.named_parameters())``), a pair of weights, or a
single tensor are all handled by the same small set of helpers.  Nesting is allowed
(a dict of tuples, ...); leaves are tensors.  ``autograd.Function`` cannot take trees,
so the core flattens at its boundary with :func:`tree_flatten` and rebuilds with
:func:`tree_unflatten`.

Batched mode: when ``batched`` is true, every leaf carries a leading task dimension
``B`` and reductions (:func:`tree_vdot`, :func:`tree_norm`) return one value per task,
shape ``(B,)``.  Scalars ``alpha`` passed to the axpy helpers may then be ``(B,)``
tensors, broadcast against the leading dimension.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import torch
from torch import Tensor

from ._errors import BilevelTypeError, BilevelValueError

Tree = Union[Tensor, tuple, list, dict]
"""A tensor tree (a Tensor, a tuple/list of trees, or a dict of trees)."""


class TreeDef:
    """The structure of a tree, without its leaves (hashable, comparable)."""

    __slots__ = ("children", "kind", "meta")

    def __init__(self, kind: str, meta: Any = None, children: tuple = ()) -> None:
        self.kind = kind  # "leaf", "tuple", "list", "dict", "none"
        self.meta = meta  # dict keys (sorted order is *not* imposed: insertion order kept)
        self.children = children

    @property
    def num_leaves(self) -> int:
        if self.kind == "leaf":
            return 1
        return sum(c.num_leaves for c in self.children)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, TreeDef)
            and self.kind == other.kind
            and self.meta == other.meta
            and self.children == other.children
        )

    def __hash__(self) -> int:
        return hash((self.kind, self.meta, self.children))

    def __repr__(self) -> str:
        if self.kind == "leaf":
            return "*"
        if self.kind == "dict":
            inner = ", ".join(f"{k!r}: {c!r}" for k, c in zip(self.meta, self.children))
            return "{" + inner + "}"
        inner = ", ".join(repr(c) for c in self.children)
        return f"({inner},)" if self.kind == "tuple" else f"[{inner}]"


_LEAF = TreeDef("leaf")


def tree_flatten(tree: Any) -> tuple[list[Tensor], TreeDef]:
    """Flatten ``tree`` into its list of tensor leaves and its structure.

    Raises:
        TypeError: if a leaf is not a tensor (e.g. a float or None), naming where.
    """
    leaves: list[Tensor] = []

    def rec(t: Any, path: str) -> TreeDef:
        if isinstance(t, Tensor):
            leaves.append(t)
            return _LEAF
        if isinstance(t, dict):
            keys = tuple(t.keys())
            return TreeDef("dict", keys, tuple(rec(t[k], f"{path}[{k!r}]") for k in keys))
        if isinstance(t, (tuple, list)) and not hasattr(t, "_fields"):
            kind = "tuple" if isinstance(t, tuple) else "list"
            return TreeDef(kind, None, tuple(rec(c, f"{path}[{i}]") for i, c in enumerate(t)))
        raise BilevelTypeError(
            f"expected a tensor tree (Tensor, tuple/list or dict of Tensors), "
            f"found {type(t).__name__} at {path or 'the root'}"
        )

    treedef = rec(tree, "")
    return leaves, treedef


def tree_unflatten(treedef: TreeDef, leaves: list[Tensor] | tuple[Tensor, ...]) -> Any:
    """Inverse of :func:`tree_flatten`."""
    it = iter(leaves)

    def rec(d: TreeDef) -> Any:
        if d.kind == "leaf":
            return next(it)
        if d.kind == "dict":
            return {k: rec(c) for k, c in zip(d.meta, d.children)}
        children = [rec(c) for c in d.children]
        return tuple(children) if d.kind == "tuple" else children

    out = rec(treedef)
    rest = list(it)
    if rest:
        raise BilevelValueError(f"{len(rest)} leaves left over when rebuilding {treedef!r}")
    return out


def is_tree(obj: Any) -> bool:
    """True if ``obj`` is a (non-empty or empty) tensor tree."""
    try:
        tree_flatten(obj)
    except TypeError:
        return False
    return True


def tree_map(fn: Callable[..., Tensor], tree: Any, *rest: Any) -> Any:
    """Apply ``fn`` leaf-wise to ``tree`` and trees of the same structure in ``rest``.

    Raises:
        ValueError: if the structures differ.
    """
    leaves, treedef = tree_flatten(tree)
    others = []
    for r in rest:
        rl, rd = tree_flatten(r)
        if rd != treedef:
            raise BilevelValueError(f"tree structures differ: {treedef!r} vs {rd!r}")
        others.append(rl)
    return tree_unflatten(treedef, [fn(*xs) for xs in zip(leaves, *others)])


def _bcast(alpha: Any, leaf: Tensor, batched: bool) -> Any:
    """Reshape a per-task ``(B,)`` coefficient so it broadcasts against ``leaf``."""
    if batched and isinstance(alpha, Tensor) and alpha.dim() == 1:
        return alpha.reshape((-1,) + (1,) * (leaf.dim() - 1))
    return alpha


def tree_sub(a: Any, b: Any) -> Any:
    """``a − b`` leaf-wise (two trees of the same structure)."""
    return tree_map(torch.sub, a, b)


def tree_scale(alpha: Any, a: Any, batched: bool = False) -> Any:
    """``alpha * a``; ``alpha`` may be a float, a 0-d tensor or (batched) a ``(B,)`` tensor."""
    return tree_map(lambda x: _bcast(alpha, x, batched) * x, a)


def tree_axpy(alpha: Any, x: Any, y: Any, batched: bool = False) -> Any:
    """``alpha * x + y`` leaf-wise."""
    return tree_map(lambda xi, yi: _bcast(alpha, xi, batched) * xi + yi, x, y)


def tree_where(mask: Tensor, a: Any, b: Any) -> Any:
    """Per-task select (batched): leaves of ``a`` where ``mask[b]`` else leaves of ``b``."""
    return tree_map(lambda x, y: torch.where(_bcast(mask, x, True), x, y), a, b)


def tree_zeros_like(a: Any) -> Any:
    """A tree of zeros shaped like ``a``."""
    return tree_map(torch.zeros_like, a)


def tree_detach(a: Any) -> Any:
    """``a`` with every leaf detached from the autograd graph."""
    return tree_map(torch.Tensor.detach, a)


def tree_vdot(a: Any, b: Any, batched: bool = False) -> Tensor:
    """Sum over leaves of ``<a_i, b_i>``; a 0-d tensor, or ``(B,)`` when batched."""
    la, da = tree_flatten(a)
    lb, db = tree_flatten(b)
    if da != db:
        raise BilevelValueError(f"tree structures differ: {da!r} vs {db!r}")
    if not la:
        raise BilevelValueError("empty tree")
    if batched:
        return sum(  # type: ignore[return-value]
            (x.reshape(x.shape[0], -1) * y.reshape(y.shape[0], -1)).sum(1) for x, y in zip(la, lb)
        )
    return sum((x.reshape(-1) * y.reshape(-1)).sum() for x, y in zip(la, lb))  # type: ignore[return-value]


def tree_norm(a: Any, batched: bool = False) -> Tensor:
    """Euclidean norm of the concatenated leaves (per task when batched)."""
    return tree_vdot(a, a, batched).clamp_min(0).sqrt()


def tree_relative_error(a: Any, ref: Any, batched: bool = False) -> Tensor:
    """``‖a − ref‖ / ‖ref‖`` over the concatenated leaves (per task when batched); NaN where
    ``ref`` is zero (a relative error against nothing is undefined, not 0 or inf)."""
    den = tree_norm(ref, batched)
    num = tree_norm(tree_sub(a, ref), batched)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(den, float("nan")))


def tree_cosine(a: Any, b: Any, batched: bool = False) -> Tensor:
    """Cosine similarity of two trees as flat vectors (per task when batched); NaN where one is zero."""
    den = tree_norm(a, batched) * tree_norm(b, batched)
    dot = tree_vdot(a, b, batched)
    return torch.where(den > 0, dot / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(den, float("nan")))


def tree_ravel(a: Any, batched: bool = False) -> Tensor:
    """Concatenate the leaves into one vector (``(B, n)`` when batched)."""
    leaves, _ = tree_flatten(a)
    if batched:
        return torch.cat([x.reshape(x.shape[0], -1) for x in leaves], dim=1)
    return torch.cat([x.reshape(-1) for x in leaves])


def tree_unravel(like: Any, flat: Tensor, batched: bool = False) -> Any:
    """Inverse of :func:`tree_ravel`, taking shapes, dtypes and devices from ``like``."""
    leaves, treedef = tree_flatten(like)
    out = []
    i = 0
    for x in leaves:
        n = x[0].numel() if batched else x.numel()
        chunk = flat[:, i : i + n] if batched else flat[i : i + n]
        out.append(chunk.reshape(x.shape).to(dtype=x.dtype, device=x.device))
        i += n
    if i != (flat.shape[1] if batched else flat.numel()):
        raise BilevelValueError("flat vector length does not match the tree")
    return tree_unflatten(treedef, out)


def tree_size(a: Any, batched: bool = False) -> int:
    """Number of scalar unknowns (per task when batched)."""
    leaves, _ = tree_flatten(a)
    return sum((x[0].numel() if batched else x.numel()) for x in leaves)


def tree_dtype(a: Any) -> torch.dtype:
    """The common floating dtype of the leaves (the widest one)."""
    leaves, _ = tree_flatten(a)
    if not leaves:
        raise BilevelValueError("empty tree")
    dt = leaves[0].dtype
    for x in leaves[1:]:
        dt = torch.promote_types(dt, x.dtype)
    return dt


def default_tol(dtype: torch.dtype) -> float:
    """Default relative tolerance of iterative solvers for ``dtype``.

    About ``eps**0.75``: tight enough for gradients used in training, loose enough to be
    reachable in finite precision (float32: ~6e-6; float64: ~2e-12).
    """
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    return float(eps**0.75)


def batch_size(a: Any) -> int:
    """Leading dimension shared by all leaves (batched mode); raises if inconsistent."""
    leaves, _ = tree_flatten(a)
    sizes = {x.shape[0] if x.dim() > 0 else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise BilevelValueError(
            f"batched mode needs every leaf to have the same leading task dimension; got {sorted(map(str, sizes))}"
        )
    n: int = sizes.pop()  # type: ignore[assignment]
    if n == 0:
        raise BilevelValueError("batched mode got a batch of 0 tasks (the leading task dimension is empty)")
    return n
