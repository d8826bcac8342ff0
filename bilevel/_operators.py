"""The implicit function theorem's operator pair at the solution: products with ``A`` and ``B``.

With ``F(x, args)`` the optimality map, ``A = ∂F/∂x`` and ``B = ∂F/∂args`` at ``(x*, args)``
(docs/design.md §1), an :class:`Operators` holds the four products the adjoint needs:

* ``a_t(u) = Aᵀu`` and ``bt(w) = Bᵀw`` (reverse mode: the VJP);
* ``a(u) = A u`` and ``b(t) = B t`` (forward mode: the JVP).

Two builders, one per setting, and nothing else in the library differentiates ``F``:

* :func:`eager_operators` -- plain autograd, outside ``torch.func`` transforms (the
  common case): ``Aᵀu`` by reverse-over-reverse on a graph of ``F`` built once per
  backward and reused by every product (:func:`bilevel._autodiff.reverse_operator`), or forward
  mode (``hvp="forward"``); ``Bᵀw`` by one VJP of ``F`` in the arguments, or the layer's
  closed form (:class:`~bilevel.Proximal`'s, a specialisation); the per-task loop
  strategy as a block-diagonal operator, task by task;
* :func:`functional_operators` -- ``torch.func.vjp`` only (inside a transform, and for
  forward mode, where ``requires_grad_`` and ``torch.autograd.grad`` are not allowed):
  ``A u`` and ``B t`` are VJPs of the (linear) VJP maps -- the "double-VJP" trick.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._autodiff import graph_vjp, reverse_operator
from ._guards import check_residual_structure, warn_closed_over
from ._problem import task_slice
from ._tree import tree_detach, tree_flatten, tree_unflatten

if TYPE_CHECKING:
    from ._function import CallSpec

MatVec = Callable[[Any], Any]


@dataclasses.dataclass
class Operators:
    """Products with ``A = ∂F/∂x`` and ``B = ∂F/∂args`` at the solution.

    Attributes:
        a_t: ``u ↦ Aᵀu`` on trees shaped like ``x`` (``None`` when ``a_t_blocks`` is given).
        bt: ``w ↦ Bᵀw``: from the leaves of ``w`` (shaped like ``x``) to one gradient per
            argument leaf (``None`` where it is not needed or not reached).
        a: ``u ↦ A u`` (forward mode; ``None`` where not built).
        b: ``t ↦ B t``: from one tangent per argument leaf to leaves shaped like ``x``.
        a_t_blocks: a block-diagonal ``Aᵀ`` (the per-task loop strategy), one factory per
            task building that task's unbatched operator when its solve starts, so that
            one task's graph of F is alive at a time.
    """

    a_t: MatVec | None
    bt: Callable[[list[Tensor]], list[Tensor | None]]
    a: MatVec | None = None
    b: Callable[[list[Tensor]], list[Tensor]] | None = None
    a_t_blocks: Sequence[Callable[[], MatVec]] | None = None


class _GraphLog:
    """Which products built their reverse-mode graph of F, and the closed-over check on it.

    A graph of F built with the arguments detached reaches, besides x, exactly the
    tensors the optimality map closes over: when a closed form of ``Bᵀw`` skips the
    generic VJP (where :func:`~bilevel._guards.warn_closed_over` runs), the check runs
    here instead, once per backward, at no extra cost.
    """

    def __init__(self, name: str, check: bool) -> None:
        self.name, self.check = name, check
        self.operators = 0
        self.built = 0

    def graph(self, F_leaves: list[Tensor], x_leaves: list[Tensor]) -> None:
        if self.check and self.built == 0:
            warn_closed_over(F_leaves, x_leaves, self.name)
        self.built += 1

    def all_built(self) -> bool:
        return self.operators > 0 and self.built == self.operators


def _a_transpose(spec: CallSpec, x: Any, args: tuple, optimality: Callable[..., Any], graphs: _GraphLog) -> MatVec:
    """Matrix-free ``u ↦ Aᵀu`` at ``x`` (``A u`` when A is symmetric), eagerly.

    Symmetric, ``hvp="reverse"`` (default): reverse-over-reverse on a graph of F built at
    the first product and reused by every later one (one extra gradient's memory).
    ``hvp="forward"``: forward-over-reverse (``torch.func.jvp`` of F), falling back to
    reverse mode for an operation without a forward-mode rule.  Non-symmetric:
    ``torch.func.vjp`` built once; each product reuses it.
    """

    def F(y: Any) -> Any:
        return optimality(y, *args)

    if not spec.symmetric:
        with torch.enable_grad():
            Fx, vjp_fn = torch.func.vjp(F, x)[:2]
        check_residual_structure(Fx, x, spec.name)
        return lambda u: tree_detach(vjp_fn(u)[0])

    state: dict[str, Any] = {"mode": "jvp" if spec.hvp == "forward" else "reverse", "checked": False}
    graphs.operators += 1

    def built(Fx: Any, xr: list[Tensor]) -> None:
        if not state["checked"]:
            check_residual_structure(Fx, x, spec.name)
            state["checked"] = True
        graphs.graph(tree_flatten(Fx)[0], xr)

    reverse = reverse_operator(F, x, on_graph=built)

    def matvec(u: Any) -> Any:
        if state["mode"] == "jvp":
            try:
                Fx, Au = torch.func.jvp(F, (x,), (u,))[:2]
            except (RuntimeError, NotImplementedError):
                state["mode"] = "reverse"
                return reverse(u)
            if not state["checked"]:
                check_residual_structure(Fx, x, spec.name)
                state["checked"] = True
            return tree_detach(Au)
        return reverse(u)

    return matvec


def eager_operators(spec: CallSpec, x_leaves: list[Tensor], arg_leaves: Sequence[Tensor],
                    need: Sequence[bool]) -> Operators:
    """The reverse-mode products by plain autograd (no ``torch.func`` transform encloses the backward).

    With the per-task loop strategy (``spec.task_optimality``), ``Aᵀ`` is block-diagonal:
    one unbatched operator per task (its own graph of that task's F), built when that
    task's solve starts; ``Bᵀw`` is one VJP of the stacked per-task residuals.
    """
    x = tree_unflatten(spec.x_def, x_leaves)
    args_det = spec.unpack([a.detach() for a in arg_leaves])
    task_opt, dims = spec.task_optimality, spec.task_dims
    graphs = _GraphLog(spec.name, check=spec.closed_bt is not None)
    blocks: list[Callable[[], MatVec]] | None = None
    a_t: MatVec | None = None
    if task_opt is not None and dims is not None:

        def block(b: int) -> MatVec:
            xb = tree_unflatten(spec.x_def, [t[b] for t in x_leaves])
            return _a_transpose(spec, xb, task_slice(args_det, dims, b), task_opt, graphs)

        blocks = [functools.partial(block, b) for b in range(x_leaves[0].shape[0])]
    else:
        a_t = _a_transpose(spec, x, args_det, spec.optimality, graphs)

    def bt(w: list[Tensor]) -> list[Tensor | None]:
        # A closed form where the layer has one and the graphs of F have been checked for
        # closed-over tensors; else one VJP of F in the arguments.
        if spec.closed_bt is not None and graphs.all_built():
            closed = spec.closed_bt(x_leaves, [t.detach() for t in w], [a.detach() for a in arg_leaves], need)
            if closed is not None:
                return closed
        with torch.enable_grad():
            req = [a.detach().requires_grad_(True) if n else a.detach() for a, n in zip(arg_leaves, need)]
            args_req = spec.unpack(req)
            if task_opt is not None and dims is not None:
                # One VJP of the stacked per-task residuals: task b's F depends on slice b
                # of the per-task arguments and on the shared ones, whose gradient sums.
                F_leaves: list[Tensor] = []
                w_all: list[Tensor] = []
                for b in range(x_leaves[0].shape[0]):
                    xb = tree_unflatten(spec.x_def, [t[b] for t in x_leaves])
                    F_leaves += tree_flatten(task_opt(xb, *task_slice(args_req, dims, b)))[0]
                    w_all += [t[b] for t in w]
                w = w_all
            else:
                F_leaves = tree_flatten(spec.optimality(x, *args_req))[0]
            targets = [r for r, n in zip(req, need) if n]
            warn_closed_over(F_leaves, targets, spec.name)
            gs = iter(graph_vjp(F_leaves, targets, w, retain_graph=False, materialize=False))
        return [next(gs) if n else None for n in need]

    return Operators(a_t=a_t, bt=bt, a_t_blocks=blocks)


def functional_operators(spec: CallSpec, x_leaves: list[Tensor], arg_leaves: list[Tensor],
                         need: Sequence[bool] | None = None) -> Operators:
    """All four products with ``torch.func.vjp`` only (inside transforms, and forward mode).

    ``A u`` and ``B t`` are VJPs of the linear maps ``w ↦ Aᵀw`` and ``w ↦ Bᵀw`` (at zero,
    with cotangent ``u`` or ``t``); they are built at first use.  With ``need`` (one flag
    per argument leaf), ``Bᵀw`` differentiates only the flagged leaves (``None`` for the
    others): the traced path's backward, where a VJP in an integer leaf (labels) cannot
    be traced.
    """

    def F_x(*xl: Tensor) -> list[Tensor]:
        return tree_flatten(spec.optimality(tree_unflatten(spec.x_def, list(xl)), *spec.unpack(arg_leaves)))[0]

    def F_args(*a: Tensor) -> list[Tensor]:
        return tree_flatten(spec.optimality(tree_unflatten(spec.x_def, x_leaves), *spec.unpack(list(a))))[0]

    vjp_x = torch.func.vjp(F_x, *x_leaves)[1]
    # Built at first use and kept (a dict, not functools.cache: dynamo traces this in the
    # traced path's backward, bilevel/_traced.py, and cannot trace an lru_cache wrapper).
    memo: dict[str, Any] = {}

    def args_map() -> tuple[list[Tensor], Callable[..., Any]]:
        if "args" not in memo:
            memo["args"] = torch.func.vjp(F_args, *arg_leaves)[:2]
        return memo["args"]

    def a_t(u: Any) -> Any:
        return tree_unflatten(spec.x_def, list(vjp_x(tree_flatten(u)[0])))

    def bt(w: list[Tensor]) -> list[Tensor | None]:
        if need is None:
            return list(args_map()[1](list(w)))
        idx = [i for i, n in enumerate(need) if n]

        def F_needed(*a: Tensor) -> list[Tensor]:
            leaves = list(arg_leaves)
            for i, t in zip(idx, a):
                leaves[i] = t
            return F_args(*leaves)

        gs = torch.func.vjp(F_needed, *[arg_leaves[i] for i in idx])[1](list(w))
        out: list[Tensor | None] = [None] * len(arg_leaves)
        for i, g in zip(idx, gs):
            out[i] = g
        return out

    def a_map() -> Callable[..., Any]:
        if "a" not in memo:
            zeros = [torch.zeros_like(f) for f in args_map()[0]]
            memo["a"] = torch.func.vjp(lambda *w: vjp_x(list(w)), *zeros)[1]
        return memo["a"]

    def a(u: Any) -> Any:
        if spec.symmetric:
            return a_t(u)
        return tree_unflatten(spec.x_def, list(a_map()(tuple(tree_flatten(u)[0]))))

    def b(t: list[Tensor]) -> list[Tensor]:
        F0, vjp_args = args_map()
        # The VJP map w ↦ Bᵀw is linear, so its own VJP with cotangent t is B t.
        return list(torch.func.vjp(lambda *w: vjp_args(list(w)), *[torch.zeros_like(f) for f in F0])[1](tuple(t)))

    return Operators(a_t=a_t, bt=bt, a=a, b=b)
