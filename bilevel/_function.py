"""The one autograd Function behind every layer, and the per-call spec it carries (docs/design.md §3).

``x* = solve(x0, *args)`` runs under ``torch.no_grad()`` and saves nothing but the
solution and the inputs, so the memory kept for backward does not grow with the number
of inner steps; the derivative is the implicit function theorem's
(:mod:`bilevel._adjoint`), never the solver's path.

``autograd.Function`` takes no tensor trees: :func:`implicit_apply` flattens at the
boundary and rebuilds in a thin wrapper.  One module-level Function in the modern form
(``forward`` without ctx, ``setup_context``, ``backward``, ``jvp``, ``vmap``) serves every
call; the per-call configuration travels in a :class:`CallSpec` stored on ``ctx`` only,
never on a layer, so no graph outlives its backward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._adjoint import backward_jvp, backward_vjp
from ._diagnostics import Diagnostics, strip_backward, strip_forward
from ._errors import BilevelTypeError, BilevelValueError, NonFiniteError
from ._guards import (
    check_solution,
    eager_only,
    first_order_only,
    flatten_checked,
    refuse_inference_mode,
    refuse_modified_arguments,
    solution_of,
    suspended_saved_tensor_hooks,
    versions,
    warn_if_only_closed_over_tensors_need_grad,
)
from ._precision import autocast_off, cast, explain_dtype_errors, work_dtype
from ._problem import ClosedBt, RootProblem, task_slice
from ._result import LinearSolveResult, Status, report
from ._traced import traced_apply, tracing
from ._transforms import any_wrapped
from ._tree import TreeDef, batch_size, tree_flatten, tree_unflatten
from ._types import HvpMode, OnFailure

ON_FAILURE = ("warn", "raise", "ignore")
HVP_MODES = ("forward", "reverse")


@dataclasses.dataclass(frozen=True, eq=False)  # identity semantics: it is a per-call token
class CallSpec:
    """Per-call configuration handed to the autograd Function (never stored on a layer).

    It repeats some fields of the :class:`~bilevel._problem.RootProblem` it is built from
    rather than holding it: the problem carries the initial point and the arguments,
    which the autograd context must not keep alive beyond what it saves (a batched ``x0``
    is B copies of θ).

    ``layout`` says how the flat argument leaves rebuild the positional arguments: per
    argument ``("tree", treedef, n_leaves)`` (a tensor tree, its leaves inputs of the
    Function, so they can receive gradients) or ``("static", value)``.
    """

    solve: Callable[..., Any]
    optimality: Callable[..., Any]
    x_def: TreeDef
    x_meta: list[tuple[torch.Size, torch.dtype]]
    layout: list[tuple]
    linsolve: Any
    symmetric: bool
    batched: bool
    diagnostics: Diagnostics
    on_failure: OnFailure
    hvp: HvpMode
    name: str
    # The per-task-loop strategy (``batched="loop"``): the optimality map of ONE task and
    # the task dimension of each argument (None: shared).
    task_optimality: Callable[..., Any] | None = None
    task_dims: tuple[int | None, ...] | None = None
    # A closed form of Bᵀw (Proximal's), used when every operator of the backward built a
    # reverse-mode graph of F (where closed-over tensors are then detected for free).
    closed_bt: ClosedBt | None = None
    # Which call of the layer this is (Diagnostics.calls when it started): the forward and
    # backward statistics carry it, so that interleaved calls cannot be confused.
    call_id: int = 0
    # The precision of the backward ("auto": float32 for half-precision inputs).
    backward_dtype: Any = "auto"
    # The eager path's check that the solve modified no input in place (version counters),
    # run in ``forward`` right after the solve -- before its status is reported, so that a
    # ConvergenceWarning caused by a modified argument does not come before the error that
    # names the cause -- on the tensors the solve saw (under torch.func.vmap, the slices,
    # whose counters are the caller's).  ``x0_copied``: x0 is the layer's own copy, which
    # the solver may update in place; ``arg_labels``: the arguments' names in messages.
    check_inputs: bool = False
    x0_copied: bool = False
    arg_labels: tuple[str, ...] | None = None

    def unpack(self, leaves: list[Tensor] | tuple[Tensor, ...]) -> tuple:
        """The positional arguments rebuilt from their flat tensor leaves."""
        out = []
        i = 0
        for item in self.layout:
            if item[0] == "static":
                out.append(item[1])
            else:
                _, d, n = item
                out.append(tree_unflatten(d, list(leaves[i : i + n])))
                i += n
        return tuple(out)


def _pack_args(args: tuple) -> tuple[list[Tensor], list[tuple]]:
    """The tensor leaves of the arguments and the layout that rebuilds them (:class:`CallSpec`)."""
    leaves: list[Tensor] = []
    layout: list[tuple] = []
    for a in args:
        try:
            ls, d = tree_flatten(a)
        except TypeError:
            layout.append(("static", a))
            continue
        layout.append(("tree", d, len(ls)))
        leaves.extend(ls)
    return leaves, layout


def _leaf_labels(args: tuple, layout: list[tuple], labels: tuple[str, ...] | None) -> list[str]:
    """A name per tensor leaf of the arguments, for messages: ``args[1]``, ``theta['w']``."""
    out: list[str] = []
    for i, (a, entry) in enumerate(zip(args, layout)):
        if entry[0] != "tree":
            continue
        base = labels[i] if labels is not None and i < len(labels) else f"args[{i}]"
        if isinstance(a, Tensor):
            out.append(base)
        elif isinstance(a, dict):
            out.extend(f"{base}[{k!r}]" for k in _dict_leaf_keys(a))
        else:
            out.extend(f"{base} (leaf {j})" for j in range(entry[2]))
    return out


def _refuse_modified_inputs(spec: CallSpec, flat: tuple[Tensor, ...], before: list[int]) -> None:
    """Raise if the solve modified an argument or (unless it is the layer's copy) x0 in place."""
    nx = spec.x_def.num_leaves
    refuse_modified_arguments(spec.name, flat[nx:], before[nx:],
                              lambda: _leaf_labels(spec.unpack(flat[nx:]), spec.layout, spec.arg_labels))
    if not spec.x0_copied and versions(flat[:nx]) != before[:nx]:
        raise BilevelValueError(
            f"{spec.name}: the solver modified the initial point x0 in place (its version counter changed): the "
            "caller's tensor now holds an iterate, not what was passed. Copy it in the solver first (x = x0.clone())"
        )


def _dict_leaf_keys(d: dict) -> list[Any]:
    """The top-level key of each tensor leaf of a dict tree, in leaf order."""
    keys: list[Any] = []
    for k, v in d.items():
        keys.extend([k] * len(tree_flatten(v)[0]))
    return keys


def _record_linear_solve(spec: CallSpec, res: LinearSolveResult, what: str, rhs: list[Tensor]) -> None:
    """Keep the solve's statistics in the layer's diagnostics; raise on NaN/Inf whatever
    ``on_failure`` says, else report non-convergence by ``on_failure``.

    "ignore" means "a fixed budget is expected", not "hide NaN": a NaN/Inf cotangent or
    Jacobian product would otherwise leave the solver's finite x = 0 as a silent zero gradient.
    ``rhs`` (the cotangent or tangent) is read only to say where a NaN/Inf came from.
    """
    spec.diagnostics.backward = strip_backward(res)
    spec.diagnostics.backward_call = spec.call_id
    statuses = res.task_status if res.task_status is not None else (res.status,)
    if Status.NONFINITE in statuses:
        tasks = [i for i, st in enumerate(statuses) if st is Status.NONFINITE] if res.task_status is not None else []
        where = f" for task(s) {tasks}" if tasks else ""
        if not all(bool(torch.isfinite(t).all()) for t in rhs):
            cause = f"the {'cotangent' if what == 'backward' else 'tangent'} holds a NaN or Inf"
        else:
            # A finite right-hand side: either the operator's products or the iterates overflowed.
            cause = ("a Jacobian-vector product gave a NaN or Inf, or the solver's iterates grew without bound "
                     "(a singular or indefinite system at x*, e.g. a Hessian with a zero direction: add an L2 term to the "
                     "inner objective or use Proximal; or Neumann with alpha above 2/||A||)")
        raise NonFiniteError(f"{spec.name}: the {what} linear solve met a NaN or Inf{where}: {cause}. {res.summary()}")
    if not res.success:  # the message reads values: only build it when it is needed
        failing = ""
        if res.task_status is not None:
            failing = f"; failing task(s): {[i for i, s in enumerate(res.task_status) if not s.ok]}"
        if Status.NEGATIVE_CURVATURE in statuses:
            failing += ("; CG needs a positive-definite system: for a symmetric indefinite or negative-definite "
                        "Jacobian use linsolve=MINRES(), for a non-symmetric one GMRES()")
        report(False, f"{spec.name}: the {what} linear solve ({type(spec.linsolve).__name__}) did not converge: "
               f"{res.summary()}{failing}", spec.on_failure)


class _ImplicitFunction(torch.autograd.Function):
    """x* = solve(x0, *args), differentiated by the implicit function theorem."""

    @staticmethod
    def forward(spec: CallSpec, *flat: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        nx = spec.x_def.num_leaves
        x0 = tree_unflatten(spec.x_def, list(flat[:nx]))
        # Detached: a solver that differentiates its objective itself must not build graphs
        # through the inputs that require grad (the layer's own backward is the IFT).
        args = spec.unpack([t.detach() for t in flat[nx:]])
        before = versions(flat) if spec.check_inputs else None
        try:
            with torch.no_grad(), suspended_saved_tensor_hooks():
                out = spec.solve(x0, *args)
        finally:  # also when the solve raises: a modified input is then the likelier cause
            if before is not None:
                _refuse_modified_inputs(spec, flat, before)
        x = solution_of(out, spec.name)
        leaves = check_solution(x, spec.x_def, spec.x_meta, spec.batched, spec.name)
        diag = spec.diagnostics
        diag.forward_call = spec.call_id
        diag.forward = strip_forward(out) if out is not x else None
        if diag.forward is not None and diag.forward.status is not Status.UNKNOWN:
            status = diag.forward.status
            extra = f" ({diag.forward.message})" if diag.forward.message else ""
            tasks = diag.forward.task_status
            if tasks is not None and not status.ok:
                extra += f"; failing task(s): {[i for i, s in enumerate(tasks) if not s.ok]}"
            report(status.ok, f"{spec.name}: the inner solve did not converge: {status}{extra}", spec.on_failure)
        inputs = {id(t) for t in flat}
        # An output must not be one of the inputs (a solver that took 0 steps may hand x0 back).
        return tuple(leaf.detach().clone() if id(leaf) in inputs else leaf.detach() for leaf in leaves)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        spec = inputs[0]
        nx = spec.x_def.num_leaves
        ctx.spec = spec
        ctx.save_for_backward(*output, *inputs[1 + nx :])
        ctx.save_for_forward(*output, *inputs[1 + nx :])

    @staticmethod
    def vmap(info: Any, in_dims: tuple, spec: CallSpec, *flat: Tensor) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:  # type: ignore[override]
        """``torch.func.vmap`` over a layer call: one solve per vmapped slice, stacked.

        Each slice is an ordinary call of the layer (its own solve and, in reverse mode,
        its own implicit backward), so the result equals a loop over the slices and
        ``batched=True`` on the same tasks (tested); it is not the fused batched solve.
        """
        outs = []
        for b in range(info.batch_size):
            sl = [t if d is None else t.select(d, b) for t, d in zip(flat, in_dims[1:])]
            outs.append(_ImplicitFunction.apply(spec, *sl))
        stacked = tuple(torch.stack([o[i] for o in outs]) for i in range(len(outs[0])))
        return stacked, (0,) * len(stacked)

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor | None) -> tuple[Tensor, ...]:
        """Forward mode: for a tangent ``t`` of the arguments, solve ``A s = −B t`` (docs/design.md §1)."""
        spec: CallSpec = ctx.spec
        nx = spec.x_def.num_leaves
        saved = ctx.saved_tensors
        x_leaves, arg_leaves = list(saved[:nx]), list(saved[nx:])
        t_args = list(tangents[1 + nx :])
        # The same precision policy as the backward's (bilevel/_precision.py).
        work = work_dtype(spec.backward_dtype, [*x_leaves, *arg_leaves])
        with autocast_off(x_leaves[0].device.type), explain_dtype_errors(spec.name, "forward-mode solve", "backward_dtype",
                                                                          work):
            s_leaves, res = backward_jvp(spec, cast(x_leaves, work), cast(arg_leaves, work), cast(t_args, work))
        _record_linear_solve(spec, res, "forward-mode", [t for t in t_args if t is not None])
        return tuple(s.to(xl.dtype) for s, xl in zip(s_leaves, x_leaves))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        # The backward is first-order: a double backward must raise instead of being
        # silently wrong.  With autograd's create_graph=True the gradients get a node that
        # raises an error naming the layer if anything differentiates them; inside a
        # torch.func transform (which also runs backward with grad mode on) torch's own
        # once_differentiable does it, and refuse_second_order names the layer first.
        saved = ctx.saved_tensors
        if torch.is_grad_enabled() and not any_wrapped([*saved, *(g for g in grads if g is not None)]):
            with torch.no_grad():
                out = _ImplicitFunction._backward(ctx, *grads)
            return first_order_only(ctx.spec.name, out, [t for t in saved if t.requires_grad])
        return _once_differentiable_backward(ctx, *grads)

    @staticmethod
    def _backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        spec: CallSpec = ctx.spec
        nx = spec.x_def.num_leaves
        saved = ctx.saved_tensors
        x_leaves = [t.detach() for t in saved[:nx]]
        arg_leaves = list(saved[nx:])
        need = ctx.needs_input_grad[1 + nx :]
        none_prefix: tuple[None, ...] = (None,) * (1 + nx)
        if not any(need):
            return none_prefix + (None,) * len(arg_leaves)
        v_leaves = [torch.zeros_like(xl) if g is None else g for g, xl in zip(grads, x_leaves)]
        # The precision policy, applied once (docs/design.md §3, bilevel/_precision.py).
        work = work_dtype(spec.backward_dtype, [*x_leaves, *arg_leaves])
        with autocast_off(x_leaves[0].device.type), explain_dtype_errors(spec.name, "backward", "backward_dtype", work):
            args_w = arg_leaves if work is None else cast([a.detach() for a in arg_leaves], work)
            out, res = backward_vjp(spec, cast(x_leaves, work), cast(v_leaves, work), args_w, need)
        _record_linear_solve(spec, res, "backward", v_leaves)
        return none_prefix + tuple(None if g is None else g.to(a.dtype) for g, a in zip(out, arg_leaves))


_once_differentiable_backward = once_differentiable(_ImplicitFunction._backward)


def implicit_apply(
    problem: RootProblem,
    *,
    linsolve: Any,
    diagnostics: Diagnostics,
    on_failure: OnFailure,
    name: str,
    hvp: HvpMode = "reverse",
    backward_dtype: Any = "auto",
    traceable: bool = False,
) -> Any:
    """Run ``problem.solve`` and return its solution, differentiable w.r.t. the tensor trees
    in ``problem.args``.

    The configuration was validated once, by the layer that built ``problem``.  With
    ``task_optimality`` and ``task_dims`` (batched only), the backward works task by task
    (the ``batched="loop"`` strategy).  While ``torch.compile`` traces the call, a layer
    whose solver and linear solver run fixed budgets (``traceable``: the layer vouches for
    its solve) takes the traced path (:mod:`bilevel._traced`); any other
    runs eagerly, one clean graph break.
    """

    def spec(x_def: TreeDef, x_leaves: list[Tensor], layout: list[tuple], call_id: int | None = None) -> CallSpec:
        return _call_spec(problem, x_def, x_leaves, layout, linsolve, diagnostics, on_failure, hvp, name,
                          backward_dtype, call_id)

    if traceable and tracing() and problem.task_optimality is None:
        x_leaves, x_def, arg_leaves, layout = _flat_inputs(problem, name)
        # Call 0: counting calls would read an int on the layer, which dynamo guards on
        # (a recompilation per call).
        return tree_unflatten(x_def, list(traced_apply(spec(x_def, x_leaves, layout, 0), x_leaves, arg_leaves)))
    return _eager_apply(problem, name, diagnostics, spec)


def _flat_inputs(problem: RootProblem, name: str, eager: bool = False) -> tuple[list[Tensor], TreeDef, list[Tensor], list[tuple]]:
    """The initial point's leaves and tree, the arguments' leaves and layout, checked (the
    checks read shapes and dtypes only: the traced path runs them too; inference mode,
    eager only, first)."""
    x_leaves, x_def = flatten_checked(problem.x0, name, "the initial point")
    arg_leaves, layout = _pack_args(problem.args)
    if eager:
        refuse_inference_mode(name, [*x_leaves, *arg_leaves])
    if not x_leaves:
        raise BilevelValueError(f"{name}: the initial point is an empty tree")
    for leaf in x_leaves:
        if not leaf.dtype.is_floating_point:
            raise BilevelTypeError(f"{name}: the unknowns must be floating-point tensors, got {leaf.dtype}")
    if problem.batched:
        batch_size(problem.x0)
    return x_leaves, x_def, arg_leaves, layout


def _call_spec(problem: RootProblem, x_def: TreeDef, x_leaves: list[Tensor], layout: list[tuple], linsolve: Any,
               diagnostics: Diagnostics, on_failure: OnFailure, hvp: HvpMode, name: str, backward_dtype: Any,
               call_id: int | None = None) -> CallSpec:
    batched = problem.batched
    return CallSpec(
        solve=problem.solve,
        optimality=problem.optimality,
        x_def=x_def,
        x_meta=[(t.shape, t.dtype) for t in x_leaves],
        layout=layout,
        linsolve=linsolve,
        symmetric=problem.symmetric,
        batched=batched,
        diagnostics=diagnostics,
        on_failure=on_failure,
        hvp=hvp,
        name=name,
        task_optimality=problem.task_optimality if batched else None,
        task_dims=problem.task_dims if batched else None,
        closed_bt=problem.closed_bt,
        call_id=diagnostics.start_call() if call_id is None else call_id,
        backward_dtype=backward_dtype,
        x0_copied=problem.x0_copied,
        arg_labels=problem.arg_labels,
    )


@eager_only
def _eager_apply(problem: RootProblem, name: str, diagnostics: Diagnostics, make_spec: Callable[..., CallSpec]) -> Any:
    """:func:`implicit_apply`'s eager path: every check, statistics in the diagnostics."""
    diagnostics.traced = False
    x_leaves, x_def, arg_leaves, layout = _flat_inputs(problem, name, eager=True)
    if any(t.device.type == "meta" for t in (*x_leaves, *arg_leaves)):
        # A shape-only run (e.g. a model built on the meta device): no solver can run on
        # values that do not exist; the solution has the initial point's shapes and dtypes.
        # No gradient flows (there is nothing to differentiate), and no diagnostics.
        return tree_unflatten(x_def, [torch.empty_like(t, device="meta") for t in x_leaves])
    spec = dataclasses.replace(make_spec(x_def, x_leaves, layout), check_inputs=True)
    out = _ImplicitFunction.apply(spec, *[t.detach() for t in x_leaves], *arg_leaves)
    if torch.is_grad_enabled() and not any(t.requires_grad for t in arg_leaves):
        # Costs one evaluation of F, and only here (grad mode on, no argument requiring
        # grad -- e.g. evaluation outside torch.no_grad()).
        # In the backward's precision: F is what the backward would evaluate (an objective
        # may not accept the inputs' mixed dtypes, e.g. bfloat16 data with float32 unknowns).
        work = work_dtype(spec.backward_dtype, [*out, *arg_leaves])
        fn, xs, a = spec.optimality, cast(list(out), work), spec.unpack(cast([t.detach() for t in arg_leaves], work))
        if spec.task_optimality is not None and spec.task_dims is not None:  # the loop strategy: task 0 suffices
            fn, xs, a = spec.task_optimality, [t[0] for t in xs], task_slice(a, spec.task_dims, 0)
        with torch.enable_grad():
            F = tree_flatten(fn(tree_unflatten(x_def, [t.detach() for t in xs]), *a))[0]
        warn_if_only_closed_over_tensors_need_grad(F, name)
    return tree_unflatten(x_def, list(out))
