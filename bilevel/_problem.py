"""What one call of a layer hands the core: a black-box solve and the optimality map whose root it finds.

Every layer is a thin builder of one :class:`RootProblem` per call (docs/design.md §3);
nothing else about a layer reaches the autograd Function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from ._tree import tree_map

#: ``closed_bt(x*, w, arg_leaves, need) -> per-argument Bᵀw, or None``: a layer's closed form
#: of the argument product ``Bᵀw = (∂F/∂args)ᵀ w`` (e.g. :class:`~bilevel.Proximal`'s
#: ``−Λw`` for θ), a specialisation of the generic VJP of ``F`` (docs/design.md §1);
#: ``None`` (returned, or as the problem's field) means "use the generic VJP".
ClosedBt = Callable[[list[Tensor], list[Tensor], Sequence[Tensor], Sequence[bool]], list[Tensor | None] | None]


@dataclasses.dataclass(frozen=True)
class RootProblem:
    """One call of a layer as the core sees it: ``x* = solve(x0, *args)`` with ``F(x*, args) = 0``.

    Attributes:
        solve: ``solve(x0, *args)``: the solution tree, or a result with ``.x``.
        optimality: ``F(x, *args)``, a tree shaped like ``x``, zero at the solution.
        x0: the initial point.
        args: the arguments (tensor trees get gradients; anything else is static).
        symmetric: whether ``∂F/∂x`` is symmetric (enables CG/MINRES).
        batched: every leaf of ``x0`` has a leading task dimension.
        task_optimality: the per-task-loop strategy: ``F`` of ONE task, with ``task_dims``
            the task dimension of each argument (``None``: shared).
        task_dims: see ``task_optimality``.
        closed_bt: a closed form of the argument product ``Bᵀw`` (:data:`ClosedBt`).
        arg_labels: how messages name each argument (default ``args[i]``), e.g. ``theta``
            for the meta-parameters that :class:`~bilevel.Proximal` passes first.
        x0_copied: ``x0`` is the layer's own copy (:class:`~bilevel.Proximal`'s of θ), which
            a solver may update in place; otherwise that is refused (it is the caller's).
    """

    solve: Callable[..., Any]
    optimality: Callable[..., Any]
    x0: Any
    args: tuple
    symmetric: bool
    batched: bool = False
    task_optimality: Callable[..., Any] | None = None
    task_dims: tuple[int | None, ...] | None = None
    closed_bt: ClosedBt | None = None
    arg_labels: tuple[str, ...] | None = None
    x0_copied: bool = False


def task_slice(args: tuple, dims: Sequence[int | None], b: int) -> tuple:
    """Task ``b``'s arguments: slice ``b`` of each argument with a task dimension."""
    return tuple(a if d is None else tree_map(lambda t, d=d: t.select(d, b), a) for a, d in zip(args, dims))
