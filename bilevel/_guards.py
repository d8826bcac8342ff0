"""Guards, refusals and warnings of the implicit layer's core (docs/design.md §2).

Each function here checks one thing a user can get wrong, or one thing the implicit
derivative cannot do, and says so in one message naming the layer:

* the solver's output (:func:`solution_of`, :func:`check_solution`) and the optimality
  residual's structure (:func:`check_residual_structure`);
* tensors the optimality map closes over instead of taking as arguments
  (:func:`warn_closed_over`, :func:`warn_if_only_closed_over_tensors_need_grad`);
* second derivatives (:func:`refuse_second_order`, :func:`first_order_only`) and vmapped
  cotangents into a solver with host-side stopping tests (:func:`refuse_vmapped`);
* ``torch.compile``: one clean graph break at the layer (:func:`eager_only`);
* the user's saved-tensor hooks, set aside while the core runs (:func:`suspended_saved_tensor_hooks`);
* ``torch.inference_mode`` and inference tensors, which autograd cannot record at all
  (:func:`refuse_inference_mode`), and arguments the objective modified in place
  (:func:`versions`, :func:`refuse_modified_arguments`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ._errors import (
    BilevelTypeError,
    BilevelValueError,
    ClosedOverTensorWarning,
    NonFiniteError,
    UnsupportedError,
)
from ._transforms import is_vmapped
from ._tree import TreeDef, tree_flatten


@contextlib.contextmanager
def suspended_saved_tensor_hooks() -> Iterator[None]:
    """Run a block with the user's saved-tensor hooks (``save_on_cpu``, checkpointing,
    byte counters) set aside.

    The solver runs under ``no_grad`` and saves nothing, but ``torch.func`` transforms
    refuse to run at all while such hooks are active; setting them aside lets a layer be
    used inside them.  Relies on torch's hook stack; if that API is absent, it does nothing.
    """
    ag = torch._C._autograd
    if not (hasattr(ag, "_top_saved_tensors_default_hooks") and hasattr(ag, "_pop_saved_tensors_default_hooks")):
        yield
        return
    stack = []
    while True:
        top = ag._top_saved_tensors_default_hooks(False)
        if top is None:
            break
        stack.append(top)
        ag._pop_saved_tensors_default_hooks()
    try:
        yield
    finally:
        for pack, unpack in reversed(stack):
            ag._push_saved_tensors_default_hooks(pack, unpack)


def refuse_inference_mode(name: str, tensors: Sequence[Tensor]) -> None:
    """Refuse ``torch.inference_mode()`` and inference tensors, naming what to do instead.

    The inner solver takes gradients and the backward records a graph; inference mode
    switches autograd off for good (its tensors cannot be recorded even under
    ``torch.enable_grad()``), so the solve would fail deep inside with a message about
    the objective not depending on x.
    """
    if torch.is_inference_mode_enabled():
        raise UnsupportedError(
            f"{name}: called under torch.inference_mode(); the inner solver needs autograd, which inference mode "
            "switches off. Call the layer under torch.no_grad() instead: it then returns the solution without a graph"
        )
    if any(t.is_inference() for t in tensors):
        raise UnsupportedError(
            f"{name}: an input is an inference tensor (created under torch.inference_mode()), which autograd cannot "
            "record; create it under torch.no_grad() instead, or pass a clone made outside inference mode (t.clone())"
        )


def versions(tensors: Sequence[Tensor]) -> list[int]:
    """The version counters of ``tensors`` (each in-place operation increments a tensor's)."""
    return [t._version for t in tensors]


def refuse_modified_arguments(name: str, tensors: Sequence[Tensor], before: Sequence[int],
                              labels: Callable[[], Sequence[str]]) -> None:
    """Raise if the solve modified an argument in place (its version counter moved).

    An objective that writes into its data (``x *= 2``, ``x.clamp_(...)``) changes the
    caller's tensor, and the solution then depends on how often the solver evaluated it.
    """
    moved = [i for i, (t, v) in enumerate(zip(tensors, before)) if t._version != v]
    if moved:
        names = labels()  # built only for the message: this check runs on every call
        changed = [names[i] for i in moved]
        raise BilevelValueError(
            f"{name}: the objective modified {', '.join(changed)} in place during the solve (its version counter "
            "changed): the caller's tensor was changed and the solution depends on the number of evaluations; "
            "compute out of place (x = x * 2, not x *= 2; x.clamp(...), not x.clamp_(...))"
        )


def flatten_checked(tree: Any, name: str, what: str) -> tuple[list[Tensor], TreeDef]:
    """``tree_flatten(tree)``, or a :class:`~bilevel.BilevelTypeError` saying which input (``what``) is not a tensor tree."""
    try:
        return tree_flatten(tree)
    except TypeError as e:
        raise BilevelTypeError(f"{name}: {what} is not a tensor tree: {e}") from None


# --------------------------------------------------------------------------------------
# the solver's output
# --------------------------------------------------------------------------------------
def solution_of(out: Any, name: str) -> Any:
    """The solution tree inside whatever the solver returned (a tree or an object with .x)."""
    if out is None:
        raise BilevelTypeError(f"{name}: the solver returned None instead of a solution")
    if hasattr(out, "x") and not isinstance(out, Tensor):
        x = out.x
        if x is None:
            raise BilevelTypeError(f"{name}: the solver's result has no solution (its .x is None)")
        return x
    return out


def check_solution(x: Any, x_def: TreeDef, x_meta: Sequence[tuple[torch.Size, torch.dtype]], batched: bool,
                   name: str) -> list[Tensor]:
    """The leaves of the solution ``x``, after checking that it has the initial point's
    structure, shapes and dtypes and is finite (one host sync for the whole tree)."""
    leaves, d = flatten_checked(x, name, "the solver's solution")
    if d != x_def:
        raise BilevelValueError(f"{name}: the solution's structure {d!r} differs from the initial point's {x_def!r}")
    for leaf, (shape, dtype) in zip(leaves, x_meta):
        if leaf.shape != shape or leaf.dtype != dtype:
            raise BilevelValueError(
                f"{name}: the solver returned a leaf of shape {tuple(leaf.shape)} and dtype {leaf.dtype}; "
                f"the initial point's is {tuple(shape)} / {dtype}"
            )
    if not bool(torch.stack([torch.isfinite(leaf).all() for leaf in leaves]).all()):
        where = ""
        if batched:
            bad = torch.zeros(leaves[0].shape[0], dtype=torch.bool, device=leaves[0].device)
            for leaf in leaves:
                bad |= ~torch.isfinite(leaf.reshape(leaf.shape[0], -1)).all(1)
            where = f" for task(s) {bad.nonzero().reshape(-1).tolist()}"
        raise NonFiniteError(f"{name}: the inner solution contains NaN or Inf{where}")
    return leaves


def check_residual_structure(Fx: Any, x: Any, name: str) -> None:
    """The optimality residual must be a tree shaped like ``x``."""
    fl, fd = flatten_checked(Fx, name, "the optimality residual")
    xl, xd = tree_flatten(x)
    if fd != xd or any(a.shape != b.shape for a, b in zip(fl, xl)):
        raise BilevelValueError(
            f"{name}: the optimality residual must have the structure of x; got {fd!r} with shapes "
            f"{[tuple(a.shape) for a in fl]}, x is {xd!r} with shapes {[tuple(b.shape) for b in xl]}"
        )


# --------------------------------------------------------------------------------------
# closed-over tensors
# --------------------------------------------------------------------------------------
def warn_closed_over(outputs: list[Tensor], targets: list[Tensor], name: str) -> None:
    """Warn when the graph of F reaches a leaf that requires grad but is not an argument."""
    known = {id(t) for t in targets}
    seen: set[int] = set()
    stack = [o.grad_fn for o in outputs if o.grad_fn is not None]
    offenders: list[tuple[int, ...]] = []
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        var = getattr(fn, "variable", None)
        if var is not None and id(var) not in known:
            offenders.append(tuple(var.shape))
        stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    if offenders:
        warnings.warn(
            f"{name}: the optimality condition uses {len(offenders)} tensor(s) that require grad but are not "
            f"arguments of the layer (shapes {offenders[:5]}); they will receive no gradient from it. "
            "Pass them as arguments instead of closing over them.",
            ClosedOverTensorWarning,
            stacklevel=3,
        )


def warn_if_only_closed_over_tensors_need_grad(F_leaves: list[Tensor], name: str) -> None:
    """No argument requires grad, so the solution will not either; if the optimality map's
    value ``F_leaves`` (evaluated with grad mode on) depends on a tensor that does, the user
    meant it to get a gradient and would otherwise meet torch's "element 0 of tensors does
    not require grad" at ``backward()``."""
    if any(f.requires_grad for f in F_leaves):
        warnings.warn(
            f"{name}: no argument of the layer requires grad, so its solution does not either, but the "
            "optimality condition uses tensor(s) that do (closed over, not passed as arguments): they will get no "
            "gradient, and backward() through the solution will fail. Pass them as arguments of the layer.",
            ClosedOverTensorWarning,
            stacklevel=4,
        )


# --------------------------------------------------------------------------------------
# what the implicit derivative cannot do
# --------------------------------------------------------------------------------------
def refuse_second_order(name: str, mode: str) -> None:
    """The implicit derivative is first-order: differentiating it again (``hessian``,
    ``grad`` of ``grad``, ``jvp`` of ``grad``, ``grad`` of ``jvp``) would differentiate the
    linear solver's iterations, not the implicit function.  Refuse it whenever the
    ``torch.func`` stack shows it."""
    try:
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    except ImportError:  # an older torch without the helper: nothing to inspect
        return
    keys = [str(i.key()) for i in retrieve_all_functorch_interpreters()]
    grads = sum(k.endswith("Grad") for k in keys)
    jvps = sum(k.endswith("Jvp") for k in keys)
    second = (jvps >= 1 or grads >= 2) if mode == "reverse" else (jvps >= 2 or grads >= 1)
    if second:
        raise UnsupportedError(
            f"{name}: second derivatives through an implicit layer (hessian, grad of grad, jvp of grad) are not "
            "supported: its derivative is first-order (the implicit function theorem's linear solve). "
            "Differentiate an outer function of the layer's output once, or use finite differences of its gradient"
        )


def refuse_vmapped(name: str, mode: str, tensors: Sequence[Tensor], linsolve: Any = None, symmetric: bool = True) -> None:
    """A batch of cotangents/tangents under ``vmap`` (``jacrev``, ``jacfwd``, ``hessian``,
    ``vmap`` of ``grad``) would drive the Krylov solver's data-dependent stopping tests with
    batched values: refuse with what to do instead, not torch's internal message."""
    syncless = getattr(linsolve, "steps", None) is not None or getattr(linsolve, "vmap_tolerance", False)
    if not syncless and any(is_vmapped(t) for t in tensors):
        raise UnsupportedError(
            f"{name}: vmapped {mode}-mode products through an implicit layer (jacrev, jacfwd, or vmap of "
            f"grad/vjp/jvp) need a linear solver without data-dependent host control: {type(linsolve).__name__} "
            f"to a tolerance stops on such tests. Use {'CG, MINRES or Neumann' if symmetric else 'Neumann or Broyden'} (to a "
            "tolerance, all maxiter iterations then run), any solver with a fixed budget (steps=m), or "
            "compute Jacobian rows with a Python loop of torch.func.vjp/jvp calls"
        )


class _SecondDerivativeRefused(torch.autograd.Function):
    """Identity on a layer's gradients whose own backward raises an error naming the layer.

    Its extra inputs (``anchors``: the layer's arguments that require grad) make the
    outputs part of a ``create_graph=True`` graph, so that differentiating them reaches
    this node -- rather than torch's "element 0 of tensors does not require grad", which
    names nothing.
    """

    @staticmethod
    def forward(name: str, n: int, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        ctx.name = inputs[0]

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[None, ...]:  # type: ignore[override]
        raise UnsupportedError(
            f"{ctx.name}: a second derivative through an implicit layer (autograd with create_graph=True, then "
            "differentiating the gradient) is not supported: its backward is once_differentiable, the implicit "
            "function theorem's linear solve. Differentiate the layer's output once (create_graph is not needed "
            "for a meta-gradient), or use finite differences of its gradient"
        )


def first_order_only(name: str, out: tuple[Tensor | None, ...], anchors: list[Tensor]) -> tuple[Tensor | None, ...]:
    """``out`` (a backward's gradients) routed through a node that refuses to be differentiated."""
    idx = [i for i, g in enumerate(out) if g is not None]
    if not idx or not anchors:
        return out
    wrapped = _SecondDerivativeRefused.apply(name, len(idx), *[out[i] for i in idx], *anchors)
    res = list(out)
    for i, w in zip(idx, wrapped):
        res[i] = w
    return tuple(res)


#: What ``torch.compile(..., fullgraph=True)`` says when it meets a layer it cannot trace
#: (torch >= 2.8 shows a ``torch.compiler.disable`` reason; older versions their generic message).
EAGER_REASON = (
    "a bilevel implicit layer runs eagerly between compiled graphs unless it is traceable: an inner solver or a "
    "backward linear solver that iterates to a tolerance (or a user-written solve) reads values on the host. "
    "For a traced layer give both fixed budgets -- Argmin/Proximal with GradientDescent or Adam(steps=K) and "
    "CG, MINRES, Neumann or Broyden(steps=m). Otherwise compile with fullgraph=False (one graph break at the layer; the "
    "code before and after it is compiled), or compile the functions the layer calls (the inner loss, a model)"
)


def eager_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compiler.disable`` with :data:`EAGER_REASON` (one clean graph break instead of
    dynamo's warnings about untraceable builtins inside the solvers)."""
    try:
        return torch.compiler.disable(fn, reason=EAGER_REASON)  # type: ignore[call-arg,unused-ignore]
    except TypeError:  # torch < 2.8: no reason argument
        return torch.compiler.disable(fn)
