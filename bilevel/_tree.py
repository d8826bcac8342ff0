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
from typing import Any

import torch
from torch import Tensor

from ._errors import BilevelTypeError, BilevelValueError

Tree = Tensor | tuple | list | dict
"""A tensor tree (a Tensor, a tuple/list of trees, or a dict ``str -> tree``).

The annotation of a tree; the helpers accept any such nesting, e.g.
``dict(model.named_parameters())``.  Leaves are tensors (a float or ``None`` is refused).

Examples:
    >>> import torch
    >>> from bilevel.tree import Tree, is_tree
    >>> params: Tree = {"w": torch.ones(3, 2), "b": (torch.zeros(2), torch.tensor(0.0))}
    >>> is_tree(params), is_tree({"w": 1.0})
    (True, False)
"""


class TreeDef:
    """The structure of a tree, without its leaves (hashable, comparable).

    Returned by :func:`tree_flatten`; :func:`tree_unflatten` rebuilds a tree from it and a
    list of leaves.  Two trees have equal ``TreeDef`` values iff they have the same nesting,
    the same container types and the same dict keys in the same order.

    Examples:
        >>> import torch
        >>> from bilevel.tree import tree_flatten
        >>> _, treedef = tree_flatten({"w": torch.ones(2), "b": (torch.ones(1), torch.ones(1))})
        >>> treedef, treedef.num_leaves
        ({'w': *, 'b': (*, *,)}, 3)
        >>> treedef == tree_flatten({"w": torch.zeros(5), "b": (torch.zeros(1), torch.zeros(3))})[1]
        True
    """

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

    Leaves come in depth-first order (dicts in insertion order).

    Raises:
        BilevelTypeError: if a leaf is not a tensor (e.g. a float or None), naming where
            (a ``TypeError``).

    Examples:
        >>> import torch
        >>> from bilevel.tree import tree_flatten
        >>> leaves, treedef = tree_flatten({"w": torch.ones(2, 3), "b": torch.zeros(2)})
        >>> [tuple(t.shape) for t in leaves], treedef
        ([(2, 3), (2,)], {'w': *, 'b': *})
    """
    if isinstance(tree, Tensor):  # the common case, without the recursion
        return [tree], _LEAF
    leaves: list[Tensor] = []
    treedef = _flatten_into(tree, "", leaves)
    return leaves, treedef


# The recursions are module-level functions, not closures: a nested function that calls
# itself is a reference cycle (function -> closure cell -> function) holding the leaves it
# saw until Python's cyclic garbage collector runs -- in a solver loop, iterate-sized
# tensors piling up in memory between collections.
def _flatten_into(t: Any, path: str, leaves: list[Tensor]) -> TreeDef:
    if isinstance(t, Tensor):
        leaves.append(t)
        return _LEAF
    if isinstance(t, dict):
        keys = tuple(t.keys())
        return TreeDef("dict", keys, tuple(_flatten_into(t[k], f"{path}[{k!r}]", leaves) for k in keys))
    if isinstance(t, (tuple, list)) and not hasattr(t, "_fields"):
        kind = "tuple" if isinstance(t, tuple) else "list"
        return TreeDef(kind, None, tuple(_flatten_into(c, f"{path}[{i}]", leaves) for i, c in enumerate(t)))
    raise BilevelTypeError(
        f"expected a tensor tree (Tensor, tuple/list or dict of Tensors), "
        f"found {type(t).__name__} at {path or 'the root'}"
    )


def _unflatten_from(d: TreeDef, it: Any) -> Any:
    if d.kind == "leaf":
        return next(it)
    if d.kind == "dict":
        return {k: _unflatten_from(c, it) for k, c in zip(d.meta, d.children)}
    children = [_unflatten_from(c, it) for c in d.children]
    return tuple(children) if d.kind == "tuple" else children


def tree_unflatten(treedef: TreeDef, leaves: list[Tensor] | tuple[Tensor, ...]) -> Any:
    """Inverse of :func:`tree_flatten`: the tree of structure ``treedef`` with ``leaves``.

    Raises:
        BilevelValueError: if there are more leaves than the structure holds.

    Examples:
        >>> import torch
        >>> from bilevel.tree import tree_flatten, tree_unflatten
        >>> leaves, treedef = tree_flatten({"w": torch.ones(2), "b": torch.zeros(1)})
        >>> tree_unflatten(treedef, [2 * t for t in leaves])
        {'w': tensor([2., 2.]), 'b': tensor([0.])}
    """
    it = iter(leaves)
    out = _unflatten_from(treedef, it)
    rest = list(it)
    if rest:
        raise BilevelValueError(f"{len(rest)} leaves left over when rebuilding {treedef!r}")
    return out


def is_tree(obj: Any) -> bool:
    """True if ``obj`` is a (non-empty or empty) tensor tree.

    Examples:
        >>> import torch
        >>> from bilevel.tree import is_tree
        >>> is_tree((torch.ones(1), [torch.zeros(2)])), is_tree({"a": 1.0}), is_tree(())
        (True, False, True)
    """
    try:
        tree_flatten(obj)
    except TypeError:
        return False
    return True


def tree_map(fn: Callable[..., Tensor], tree: Any, *rest: Any) -> Any:
    """Apply ``fn`` leaf-wise to ``tree`` and trees of the same structure in ``rest``.

    Raises:
        BilevelValueError: if the structures differ (a ``ValueError``).

    Examples:
        >>> import torch
        >>> from bilevel.tree import tree_map
        >>> tree_map(torch.add, (torch.ones(2), torch.zeros(1)), (torch.ones(2), torch.ones(1)))
        (tensor([2., 2.]), tensor([1.]))
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
    """``a − b`` leaf-wise (two trees of the same structure).

    Examples:
        >>> import torch
        >>> from bilevel.tree import tree_sub
        >>> tree_sub({"w": torch.tensor([3.0, 4.0])}, {"w": torch.ones(2)})
        {'w': tensor([2., 3.])}
    """
    return tree_map(torch.sub, a, b)


def tree_scale(alpha: Any, a: Any, batched: bool = False) -> Any:
    """``alpha * a``; ``alpha`` may be a float, a 0-d tensor or (batched) a ``(B,)`` tensor.

    Examples:
        One factor per task (``batched=True``: the leading dimension is the task):

        >>> import torch
        >>> from bilevel.tree import tree_scale
        >>> tree_scale(torch.tensor([1.0, 2.0]), {"w": torch.ones(2, 3)}, batched=True)
        {'w': tensor([[1., 1., 1.],
                [2., 2., 2.]])}
    """
    return tree_map(lambda x: _bcast(alpha, x, batched) * x, a)


def tree_axpy(alpha: Any, x: Any, y: Any, batched: bool = False) -> Any:
    """``alpha * x + y`` leaf-wise (``alpha`` as in :func:`tree_scale`).

    Examples:
        >>> import torch
        >>> from bilevel.tree import tree_axpy
        >>> tree_axpy(2.0, (torch.ones(2),), (torch.tensor([1.0, 0.0]),))
        (tensor([3., 2.]),)
    """
    return tree_map(lambda xi, yi: _bcast(alpha, xi, batched) * xi + yi, x, y)


def tree_where(mask: Tensor, a: Any, b: Any) -> Any:
    """Per-task select (batched): leaves of ``a`` where ``mask[b]`` else leaves of ``b``.

    ``mask`` is a ``(B,)`` bool tensor; every leaf has the leading task dimension ``B``.

    Examples:
        >>> import torch
        >>> from bilevel.tree import tree_where
        >>> tree_where(torch.tensor([True, False]), {"w": torch.ones(2, 2)}, {"w": torch.zeros(2, 2)})
        {'w': tensor([[1., 1.],
                [0., 0.]])}
    """
    return tree_map(lambda x, y: torch.where(_bcast(mask, x, True), x, y), a, b)


def tree_zeros_like(a: Any) -> Any:
    """A tree of zeros shaped like ``a`` (same dtypes and devices).

    Examples:
        >>> import torch
        >>> from bilevel.tree import tree_zeros_like
        >>> tree_zeros_like({"w": torch.ones(2), "b": torch.ones(())})
        {'w': tensor([0., 0.]), 'b': tensor(0.)}
    """
    return tree_map(torch.zeros_like, a)


def tree_detach(a: Any) -> Any:
    """``a`` with every leaf detached from the autograd graph.

    Examples:
        >>> import torch
        >>> from bilevel.tree import tree_detach
        >>> x = torch.ones(2, requires_grad=True)
        >>> tree_detach({"w": 2 * x})["w"].requires_grad
        False
    """
    return tree_map(torch.Tensor.detach, a)


def tree_vdot(a: Any, b: Any, batched: bool = False) -> Tensor:
    """Sum over leaves of ``<a_i, b_i>``; a 0-d tensor, or ``(B,)`` when batched.

    Raises:
        BilevelValueError: if the structures differ or the tree is empty.

    Examples:
        >>> import torch
        >>> from bilevel.tree import tree_vdot
        >>> tree_vdot((torch.tensor([1.0, 2.0]), torch.tensor(3.0)), (torch.tensor([3.0, 4.0]), torch.tensor(2.0)))
        tensor(17.)
        >>> tree_vdot(torch.ones(2, 3), torch.ones(2, 3), batched=True)     # one per task
        tensor([3., 3.])
    """
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
    """Euclidean norm of the concatenated leaves (per task when batched).

    Examples:
        >>> import torch
        >>> from bilevel.tree import tree_norm
        >>> tree_norm({"w": torch.tensor([3.0]), "b": torch.tensor(4.0)})
        tensor(5.)
        >>> tree_norm({"w": torch.ones(4, 3), "b": torch.ones(4)}, batched=True)   # 4 tasks
        tensor([2., 2., 2., 2.])
    """
    return tree_vdot(a, a, batched).clamp_min(0).sqrt()


def tree_relative_error(a: Any, ref: Any, batched: bool = False) -> Tensor:
    """``‖a − ref‖ / ‖ref‖`` over the concatenated leaves (per task when batched); NaN where
    ``ref`` is zero (a relative error against nothing is undefined, not 0 or inf).

    Examples:
        >>> import torch
        >>> from bilevel.tree import tree_relative_error
        >>> tree_relative_error({"w": torch.ones(3)}, {"w": torch.full((3,), 2.0)})
        tensor(0.5000)
        >>> tree_relative_error(torch.ones(2), torch.zeros(2))
        tensor(nan)
    """
    den = tree_norm(ref, batched)
    num = tree_norm(tree_sub(a, ref), batched)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(den, float("nan")))


def tree_cosine(a: Any, b: Any, batched: bool = False) -> Tensor:
    """Cosine similarity of two trees as flat vectors (per task when batched); NaN where one is zero.

    Examples:
        >>> import torch
        >>> from bilevel.tree import tree_cosine
        >>> a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
        >>> cos = tree_cosine(a, torch.tensor([[0.0, 1.0], [2.0, 2.0]]), batched=True)
        >>> [round(c, 4) for c in cos.tolist()]                 # one per task
        [0.0, 1.0]
    """
    den = tree_norm(a, batched) * tree_norm(b, batched)
    dot = tree_vdot(a, b, batched)
    return torch.where(den > 0, dot / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(den, float("nan")))


def tree_ravel(a: Any, batched: bool = False) -> Tensor:
    """Concatenate the leaves into one vector (``(B, n)`` when batched), in leaf order.

    Examples:
        >>> import torch
        >>> from bilevel.tree import tree_ravel
        >>> tree_ravel({"w": torch.ones(2, 2), "b": torch.zeros(1)})
        tensor([1., 1., 1., 1., 0.])
        >>> tree_ravel({"w": torch.ones(3, 2), "b": torch.zeros(3)}, batched=True).shape
        torch.Size([3, 3])
    """
    leaves, _ = tree_flatten(a)
    if batched:
        return torch.cat([x.reshape(x.shape[0], -1) for x in leaves], dim=1)
    return torch.cat([x.reshape(-1) for x in leaves])


def tree_unravel(like: Any, flat: Tensor, batched: bool = False) -> Any:
    """Inverse of :func:`tree_ravel`, taking shapes, dtypes and devices from ``like``.

    Raises:
        BilevelValueError: if ``flat`` does not have the tree's number of entries.

    Examples:
        >>> import torch
        >>> from bilevel.tree import tree_unravel
        >>> tree_unravel({"w": torch.ones(2, 2), "b": torch.zeros(1)}, torch.arange(5.0))
        {'w': tensor([[0., 1.],
                [2., 3.]]), 'b': tensor([4.])}
    """
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
    """Number of scalar unknowns (per task when batched).

    Examples:
        >>> import torch
        >>> from bilevel.tree import tree_size
        >>> t = {"w": torch.ones(2, 3), "b": torch.zeros(2)}
        >>> tree_size(t), tree_size(t, batched=True)       # batched: 2 tasks of 3 + 1
        (8, 4)
    """
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
    """Leading dimension shared by all leaves (batched mode): the number of tasks.

    Raises:
        BilevelValueError: if the leaves disagree, a leaf is 0-d, or the dimension is 0.

    Examples:
        >>> import torch
        >>> from bilevel.tree import batch_size
        >>> batch_size({"w": torch.ones(4, 3), "b": torch.zeros(4)})
        4
    """
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
