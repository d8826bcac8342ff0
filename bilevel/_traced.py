"""The traced path: a layer call that ``torch.compile(fullgraph=True)`` captures whole.

Under ``torch.compile`` a layer whose inner solver and backward linear solver both run a
fixed budget (``GradientDescent(steps=K)``, ``Adam(steps=K)``; ``CG``/``MINRES``/
``Neumann``/``Broyden(steps=m)``) has nothing that must be read on the host: every loop has a length
known at trace time and every stopped task is masked on the device.  Dynamo then traces
the call into the graph: the inner loop under no-grad, then one :class:`_TracedFunction`
that attaches the solution to the arguments, whose backward is the implicit function
theorem's rule (:func:`bilevel._adjoint.implicit_vjp`, the same pure function as the eager
backward) on ``torch.func`` operators -- and AOTAutograd compiles both; on a GPU ``mode="reduce-overhead"`` can replay the step as one
CUDA graph (docs/design.md §3).

What the traced path gives up, because a graph cannot read a value on the host: the
statuses and statistics of ``layer.diagnostics`` (``diagnostics.traced`` says so), the
warnings on non-convergence (a fixed budget reports ``COMPLETED`` anyway), the replay that
names the first non-finite inner step, and the first-call checks of the eager path.  A
NaN or Inf is not hidden: the inner loop propagates it into the solution, and a backward
whose cotangent or solve is non-finite returns NaN gradients (the eager path raises
:class:`~bilevel.NonFiniteError` instead).

Anything else -- a tolerance, a user-written ``solve``, the per-task loop strategy --
keeps the eager path, one clean graph break (:func:`bilevel._guards.eager_only`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

from ._adjoint import implicit_vjp
from ._guards import eager_only
from ._operators import functional_operators
from ._precision import autocast_off, cast, work_dtype
from ._tree import tree_flatten, tree_unflatten

if TYPE_CHECKING:
    from ._function import CallSpec


def tracing() -> bool:
    """Whether dynamo is tracing the current call (``torch.compile``)."""
    return bool(torch.compiler.is_compiling())


def untraceable_linsolve(linsolve: Any) -> str | None:
    """Why the backward's linear solver cannot be traced (``None``: it can)."""
    name = type(linsolve).__name__
    if not getattr(linsolve, "traceable", False):
        return (f"its backward linear solver {name} iterates to a tolerance or has host-side control flow "
                "(use CG, MINRES, Neumann or Broyden with steps=m; CG without a preconditioner)")
    return None


def untraceable_solver(solver: Any) -> str | None:
    """Why an inner solver cannot be traced (``None``: it can)."""
    if not getattr(solver, "traceable", False):
        return (f"its inner solver {type(solver).__name__} iterates to a tolerance or has host-side control flow "
                "(use GradientDescent or Adam with steps=K, without check_minimum)")
    return None


C = TypeVar("C", bound=Callable[..., Any])


def compile_boundary(call: C) -> C:
    """Decorate a layer's ``__call__``: while dynamo traces, a layer that cannot be traced
    (its ``_untraceable(batched)`` gives a reason) runs eagerly from here -- one clean graph
    break at the call, whatever the layer does inside -- and a traceable one is traced."""
    eager = eager_only(call)

    @functools.wraps(call)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if tracing() and self._untraceable(kwargs.get("batched", False)) is not None:
            return eager(self, *args, **kwargs)
        return call(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class _TracedFunction(torch.autograd.Function):
    """The solution ``x*`` (an input, computed under no-grad), attached to the arguments by
    the implicit backward; every step traceable by dynamo.

    The same mathematics as :class:`bilevel._function._ImplicitFunction` (nothing saved but
    the solution and the arguments, the backward by :func:`~bilevel._adjoint.implicit_vjp`),
    without its host-side bookkeeping.  The solve itself runs before, outside the Function:
    dynamo cannot trace ``torch.func.grad`` of a module's ``functional_call`` inside an
    ``autograd.Function``'s forward, and it traces it in ordinary code.
    """

    @staticmethod
    def forward(spec: CallSpec, *flat: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        # Copies: an output must not alias an input (autograd.Function's rule).
        return tuple(t.clone() for t in flat[: spec.x_def.num_leaves])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        spec = inputs[0]
        ctx.spec = spec
        ctx.save_for_backward(*output, *inputs[1 + spec.x_def.num_leaves :])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        spec: CallSpec = ctx.spec
        nx = spec.x_def.num_leaves
        saved = ctx.saved_tensors
        x_leaves, arg_leaves = list(saved[:nx]), list(saved[nx:])
        need = ctx.needs_input_grad[1 + nx :]
        v_leaves = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, x_leaves)]
        work = work_dtype(spec.backward_dtype, [*x_leaves, *arg_leaves])
        with autocast_off(x_leaves[0].device.type):
            xw, aw, vw = cast(x_leaves, work), cast(arg_leaves, work), cast(v_leaves, work)
            ops = functional_operators(spec, xw, aw, need)
            out, res = implicit_vjp(ops, spec.linsolve, tree_unflatten(spec.x_def, vw), spec.batched)
        # No host read can raise here: a non-finite solution, cotangent or solve makes every
        # gradient NaN (never a silent zero from a solver that stopped on a NaN curvature).
        finite = torch.stack([torch.isfinite(t).all() for t in [*xw, *vw, *tree_flatten(res.x)[0]]]).all()
        gs = tuple(
            None if g is None or not n else torch.where(finite, g, torch.full_like(g, float("nan"))).to(a.dtype)
            for g, a, n in zip(out, arg_leaves, need)
        )
        return (None,) * (1 + nx) + gs


def traced_apply(spec: CallSpec, x_leaves: list[Tensor], arg_leaves: list[Tensor]) -> tuple[Tensor, ...]:
    """The solution's leaves, solved under no-grad and attached by :class:`_TracedFunction`
    (called while dynamo traces)."""
    diag = spec.diagnostics
    diag.traced = True
    diag.forward = diag.backward = diag.forward_call = diag.backward_call = None
    with torch.no_grad():
        x0 = tree_unflatten(spec.x_def, [t.detach() for t in x_leaves])
        out = spec.solve(x0, *spec.unpack([t.detach() for t in arg_leaves]))
    x = out.x if hasattr(out, "x") and not isinstance(out, Tensor) else out
    leaves = tree_flatten(x)[0]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in arg_leaves)):
        # Nothing to differentiate (known at trace time).  Not through the Function: torch
        # 2.13's dynamo then calls its forward as if ``spec`` were a ctx.
        return tuple(leaves)
    return _TracedFunction.apply(spec, *leaves, *arg_leaves)
