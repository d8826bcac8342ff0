"""Derivatives of an objective, and the one reverse-mode Jacobian product (docs/design.md §3).

* :func:`value_and_grad`, :func:`value` -- an inner objective's value(s) and gradient;
* :func:`reverse_operator` -- ``u ↦ Jᵀu`` of a map at a point, its graph built once and
  reused by every product (:func:`graph_vjp`): the Hessian of an objective
  (:func:`hessian_operator`, :func:`hvp`) and the backward's products with ``Aᵀ``
  (:mod:`bilevel._operators`, which also holds the forward-mode and ``torch.func``
  products the transforms need) are built with it.

Each function picks plain autograd unless a ``torch.func`` transform encloses the call,
where only ``torch.func`` primitives are correct.  Why not ``torch.func`` everywhere: in
eager PyTorch a transform has a fixed cost per call, which dominates small problems
(``benchmarks/small_problem.py``), and a reverse-over-reverse product costs a small
multiple of a gradient, several times less than a forward-over-reverse one
(``benchmarks/backward_cost.py``; the numbers are in ``benchmarks/README.md``).

Batched mode (``batched=True``): every leaf of ``x`` has a leading task dimension ``B`` and
``objective(x, *args)`` returns a ``(B,)`` tensor; gradients are those of the sum, which
are the per-task gradients (task ``b`` depends only on slice ``b`` of ``x``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._errors import BilevelTypeError, BilevelValueError, NotDifferentiableError
from ._transforms import any_wrapped, leaves_of
from ._tree import tree_detach, tree_flatten, tree_unflatten

Objective = Callable[..., Tensor]


def total(objective: Objective, batched: bool) -> Callable[..., tuple[Tensor, Tensor]]:
    """``(scalar, values)``: a scalar whose gradient is the (per-task) gradient of ``objective``, and its values."""

    def f(x: Any, *args: Any) -> tuple[Tensor, Tensor]:
        v = objective(x, *args)
        if not isinstance(v, Tensor):
            raise BilevelTypeError(f"the objective must return a tensor, got {type(v).__name__}")
        if batched:
            if v.dim() != 1:
                raise BilevelValueError(f"in batched mode the objective must return a (B,) tensor, got shape {tuple(v.shape)}")
            return v.sum(), v
        if v.dim() != 0:
            raise BilevelValueError(f"the objective must return a scalar (0-d) tensor, got shape {tuple(v.shape)}")
        return v, v

    return f


def inside_transform(x: Any, args: tuple) -> bool:
    """Whether a ``torch.func`` transform wraps ``x`` or a tensor argument."""
    return any_wrapped(leaves_of(x, *args))


def value_and_grad(
    objective: Objective, x: Any, args: tuple, batched: bool = False, transform: bool | None = None
) -> tuple[Tensor, Any]:
    """Objective value(s) and gradient tree at ``x`` (works under an outer ``no_grad``).

    ``transform``: whether a ``torch.func`` transform encloses the call, if the caller
    already knows (a loop asks once per solve).
    """
    if transform if transform is not None else inside_transform(x, args):
        g, (_, v) = torch.func.grad_and_value(total(objective, batched), has_aux=True)(x, *args)
        return v.detach(), tree_detach(g)
    leaves, treedef = tree_flatten(x)
    v, gl = value_and_grad_leaves(objective, treedef, leaves, args, batched)
    return v, tree_unflatten(treedef, gl)


def _grad_graph(objective: Objective, treedef: Any, leaves: list[Tensor], args: tuple, batched: bool,
                create_graph: bool) -> tuple[Tensor, list[Tensor], tuple[Tensor | None, ...]]:
    """``(values, x leaves requiring grad, gradient leaves)`` by plain autograd."""
    return _grad_graph_of(objective, treedef, [t.detach().requires_grad_(True) for t in leaves], args, batched,
                          create_graph)


def _grad_graph_of(objective: Objective, treedef: Any, xr: list[Tensor], args: tuple, batched: bool,
                   create_graph: bool = True) -> tuple[Tensor, list[Tensor], tuple[Tensor | None, ...]]:
    """:func:`_grad_graph` at leaves ``xr`` that already require grad."""
    s, v = total(objective, batched)(tree_unflatten(treedef, xr), *args)
    if not s.requires_grad:
        raise NotDifferentiableError(
            "the objective's value does not depend on x through torch operations (did it leave torch, e.g. "
            "through .numpy() or .item()?): a gradient-based solver cannot use it; use a derivative-free "
            "one such as ScipyMinimize('Nelder-Mead' or 'Powell')"
        )
    gs = torch.autograd.grad(s, xr, create_graph=create_graph, allow_unused=True)
    return v, xr, gs


def value_and_grad_leaves(
    objective: Objective, treedef: Any, leaves: list[Tensor], args: tuple, batched: bool
) -> tuple[Tensor, list[Tensor]]:
    """:func:`value_and_grad` by plain reverse mode on the leaves of ``x`` (no transform
    encloses the call): the gradient leaves, without rebuilding trees a loop does not need."""
    with torch.enable_grad():
        v, _, gs = _grad_graph(objective, treedef, leaves, args, batched, create_graph=False)
    return v.detach(), [torch.zeros_like(t) if gi is None else gi for gi, t in zip(gs, leaves)]


def value(objective: Objective, x: Any, args: tuple, batched: bool = False) -> Tensor:
    """Objective value(s) without a gradient."""
    with torch.no_grad():
        return total(objective, batched)(x, *args)[1].detach()


def graph_vjp(outputs: Sequence[Tensor | None], inputs: list[Tensor], cotangents: Sequence[Tensor],
              retain_graph: bool = True, materialize: bool = True) -> list[Any]:
    """``Σᵢ (∂outputᵢ/∂inputs)ᵀ cotangentᵢ`` through a graph already built, detached; for
    inputs the outputs do not reach, zeros (``materialize``) or ``None``.  Outputs without
    a graph (``None``, or not requiring grad: they do not depend on the inputs) contribute
    nothing."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o is not None and o.requires_grad]
    gs: Sequence[Tensor | None] = (None,) * len(inputs)
    if pairs:
        with torch.enable_grad():
            gs = torch.autograd.grad([p[0] for p in pairs], inputs, grad_outputs=[p[1] for p in pairs],
                                     retain_graph=retain_graph, allow_unused=True)
    if not materialize:
        return [None if g is None else g.detach() for g in gs]
    return [torch.zeros_like(t) if g is None else g.detach() for g, t in zip(gs, inputs)]


def reverse_operator(build: Callable[[Any], Any], x: Any,
                     on_graph: Callable[[Any, list[Tensor]], None] | None = None) -> Callable[[Any], Any]:
    """``u ↦ (∂build/∂x)ᵀ u`` at the fixed point ``x``, by reverse mode: ``build(x)`` is
    evaluated once with a graph (at the first product) and every product is one VJP
    through it (:func:`graph_vjp`).  ``on_graph(output, x_leaves)`` sees the output once,
    when it is built.  For a symmetric Jacobian (a gradient map: a Hessian) this is also
    ``u ↦ J u``.  The one reverse-mode Jacobian product of the library: the Hessian of an
    objective (:func:`hessian_operator`) and the backward's products with ``Aᵀ``
    (:mod:`bilevel._operators`) are both built with it."""
    state: dict[str, Any] = {}

    def matvec(u: Any) -> Any:
        if "graph" not in state:
            leaves, treedef = tree_flatten(x)
            with torch.enable_grad():
                xr = [t.detach().requires_grad_(True) for t in leaves]
                out = build(tree_unflatten(treedef, xr))
            if on_graph is not None:
                on_graph(out, xr)
            state["graph"] = (tree_flatten(out)[0], xr, treedef)
        outs, xr, treedef = state["graph"]
        return tree_unflatten(treedef, graph_vjp(outs, xr, tree_flatten(u)[0]))

    return matvec


def hessian_operator(objective: Objective, x: Any, args: tuple, batched: bool = False) -> Callable[[Any], Any]:
    """``v ↦ ∇²f(x) v`` at the fixed point ``x`` (block-diagonal over tasks when batched).

    Reverse-over-reverse: the gradient is built once with a graph and every product is one
    VJP through it (:func:`reverse_operator`).  Inside a ``torch.func`` transform,
    forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``) instead.
    """
    if inside_transform(x, args):

        def g(y: Any) -> Any:
            return torch.func.grad(lambda z: total(objective, batched)(z, *args)[0])(y)

        return lambda v: tree_detach(torch.func.jvp(g, (x,), (v,))[1])

    def gradient(y: Any) -> Any:
        leaves, treedef = tree_flatten(y)
        _, _, gs = _grad_graph_of(objective, treedef, leaves, args, batched)
        # A leaf the objective does not use: a zero gradient without a graph (no product).
        return tree_unflatten(treedef, [torch.zeros_like(t) if g is None else g for g, t in zip(gs, leaves)])

    return reverse_operator(gradient, x)


def hvp(objective: Objective, x: Any, v: Any, args: tuple, batched: bool = False) -> Any:
    """One Hessian-vector product ``∇²f(x) v`` (see :func:`hessian_operator`)."""
    return hessian_operator(objective, x, args, batched)(v)
