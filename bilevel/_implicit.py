"""The implicit-function-theorem autograd Function shared by every layer.

Given a black-box ``solve(x0, *args) -> x*`` and a differentiable optimality condition
``F(x, *args)`` with ``F(x*, args) = 0``, the implicit function theorem gives, with
``A = dF/dx`` and ``B = dF/dargs`` at the solution, for a cotangent ``v = dl/dx*``::

    solve  A^T u = v          (matrix-free, by the configured linear solver)
    dl/dargs = -B^T u         (one vector-Jacobian product of F)

(Rajeswaran et al. 2019, "Meta-Learning with Implicit Gradients", Lemma 1 / Eq. 6, for
the proximal case; Blondel et al. 2022 for the general root form.)  The gradient depends
on the solution only, never on the solver's path: the forward pass runs the solver under
``torch.no_grad()`` and saves nothing but the solution and the inputs, so the memory kept
for backward does not grow with the number of inner steps.

``autograd.Function`` takes no tensor trees: :func:`implicit_apply` flattens at the
boundary and rebuilds in a thin wrapper.  One module-level Function in the modern form
(``forward`` without ctx, ``setup_context``, ``backward``) serves every call; the per-call
configuration travels in a plain :class:`_Spec` object stored on ``ctx`` only, never on a
layer, so no graph outlives its backward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._diagnostics import Diagnostics, strip_backward, strip_forward
from ._errors import (
    BilevelTypeError,
    BilevelValueError,
    ClosedOverTensorWarning,
    NonFiniteError,
    UnsupportedError,
)
from ._result import Status, report, stack_linear_results
from ._transforms import any_wrapped, is_vmapped
from ._tree import (
    TreeDef,
    batch_size,
    tree_detach,
    tree_flatten,
    tree_map,
    tree_unflatten,
)
from ._types import HvpMode, OnFailure

_ON_FAILURE = ("warn", "raise", "ignore")
_HVP_MODES = ("forward", "reverse")


@contextlib.contextmanager
def _suspended_saved_tensor_hooks() -> Iterator[None]:
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


#: ``closed_vjp(x*, u, arg_leaves, needs_grad) -> per-argument gradients, or None``: a
#: layer's closed form of ``-Bᵀu`` (e.g. :class:`~bilevel.Proximal`'s ``Λu``); ``None``
#: (returned, or as the spec's field) means "use the generic VJP of the optimality map".
ClosedVJP = Callable[[list[Tensor], list[Tensor], Sequence[Tensor], Sequence[bool]], list[Tensor | None] | None]


@dataclasses.dataclass(frozen=True)
class Problem:
    """One call of a layer as the core sees it: a black-box ``solve`` and the ``optimality``
    map whose root it finds, with what the backward needs to know about them.

    Every layer is a thin builder of one of these per call (the layer's ``_apply`` hands it
    to :func:`implicit_apply`); nothing else about a layer reaches the
    autograd Function.

    Attributes:
        solve: ``solve(x0, *args)``: the solution tree, or a result with ``.x``.
        optimality: ``F(x, *args)``, a tree shaped like ``x``, zero at the solution.
        x0: the initial point.
        args: the arguments (tensor trees get gradients).
        symmetric: whether ``dF/dx`` is symmetric (enables CG/MINRES).
        batched: every leaf of ``x0`` has a leading task dimension.
        task_optimality: the per-task-loop strategy: ``F`` of ONE task, with ``task_dims``
            the task dimension of each argument (``None``: shared).
        task_dims: see ``task_optimality``.
        closed_vjp: a closed form of the argument VJP (e.g. :class:`Proximal`'s ``Λu``).
    """

    solve: Callable[..., Any]
    optimality: Callable[..., Any]
    x0: Any
    args: tuple
    symmetric: bool
    batched: bool = False
    task_optimality: Callable[..., Any] | None = None
    task_dims: tuple[int | None, ...] | None = None
    closed_vjp: ClosedVJP | None = None


@dataclasses.dataclass(frozen=True, eq=False)  # identity semantics: it is a per-call token
class _Spec:
    """Per-call configuration handed to the autograd Function (never stored on a layer).

    It repeats some fields of the :class:`Problem` it is built from rather than holding
    it: the Problem carries the initial point and the arguments, which the autograd
    context must not keep alive beyond what it saves (a batched ``x0`` is B copies of θ).
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
    # the task dimension of each argument (None: shared).  The backward then runs one
    # unbatched linear solve and one VJP per task instead of vmapped ones.
    task_optimality: Callable[..., Any] | None = None
    task_dims: tuple[int | None, ...] | None = None
    # A closed form of the argument VJP, used when every operator of the backward built a
    # reverse-mode graph of F (where closed-over tensors are then detected for free).
    closed_vjp: ClosedVJP | None = None
    # Which call of the layer this is (Diagnostics.calls when it started): the forward and
    # backward statistics carry it, so that interleaved calls cannot be confused.
    call_id: int = 0
    # The precision of the backward ("auto": float32 for half-precision inputs).
    backward_dtype: Any = "auto"


def task_slice(args: tuple, dims: tuple[int | None, ...], b: int) -> tuple:
    """Task ``b``'s arguments: slice ``b`` of each argument with a task dimension."""
    return tuple(a if d is None else tree_map(lambda t, d=d: t.select(d, b), a) for a, d in zip(args, dims))


# --------------------------------------------------------------------------------------
# argument packing: each positional argument is either a tensor tree (its leaves become
# inputs of the Function, so they can receive gradients) or a static Python object.
# --------------------------------------------------------------------------------------
def _pack_args(args: tuple) -> tuple[list[Tensor], list[tuple]]:
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


def _unpack_args(layout: list[tuple], leaves: tuple | list) -> tuple:
    out = []
    i = 0
    for item in layout:
        if item[0] == "static":
            out.append(item[1])
        else:
            _, d, n = item
            out.append(tree_unflatten(d, list(leaves[i : i + n])))
            i += n
    return tuple(out)


def _solution_of(out: Any, name: str) -> Any:
    """The solution tree inside whatever the solver returned (a tree or an object with .x)."""
    if out is None:
        raise BilevelTypeError(f"{name}: the solver returned None instead of a solution")
    if hasattr(out, "x") and not isinstance(out, Tensor):
        x = out.x
        if x is None:
            raise BilevelTypeError(f"{name}: the solver's result has no solution (its .x is None)")
        return x
    return out


def _describe_bad_tasks(leaves: list[Tensor], batched: bool) -> str:
    if not batched:
        return ""
    bad = torch.zeros(leaves[0].shape[0], dtype=torch.bool, device=leaves[0].device)
    for leaf in leaves:
        bad |= ~torch.isfinite(leaf.reshape(leaf.shape[0], -1)).all(1)
    return f" for task(s) {bad.nonzero().reshape(-1).tolist()}"


class _ImplicitFunction(torch.autograd.Function):
    """x* = solve(x0, *args), differentiated by the implicit function theorem."""

    @staticmethod
    def forward(spec: _Spec, *flat: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        nx = spec.x_def.num_leaves
        x0 = tree_unflatten(spec.x_def, list(flat[:nx]))
        # Detached: a solver that differentiates its objective itself must not build graphs
        # through the inputs that require grad (the layer's own backward is the IFT).
        args = _unpack_args(spec.layout, [t.detach() for t in flat[nx:]])
        with torch.no_grad(), _suspended_saved_tensor_hooks():
            out = spec.solve(x0, *args)
        x = _solution_of(out, spec.name)
        try:
            leaves, d = tree_flatten(x)
        except TypeError as e:
            raise BilevelTypeError(f"{spec.name}: the solver's solution is not a tensor tree: {e}") from None
        if d != spec.x_def:
            raise BilevelValueError(f"{spec.name}: the solution's structure {d!r} differs from the initial point's {spec.x_def!r}")
        for leaf, (shape, dtype) in zip(leaves, spec.x_meta):
            if leaf.shape != shape or leaf.dtype != dtype:
                raise BilevelValueError(
                    f"{spec.name}: the solver returned a leaf of shape {tuple(leaf.shape)} and dtype {leaf.dtype}; "
                    f"the initial point's is {tuple(shape)} / {dtype}"
                )
        # One host sync for the whole tree (not one per leaf).
        if not bool(torch.stack([torch.isfinite(leaf).all() for leaf in leaves]).all()):
            raise NonFiniteError(
                f"{spec.name}: the inner solution contains NaN or Inf{_describe_bad_tasks(leaves, spec.batched)}"
            )
        spec.diagnostics.forward_call = spec.call_id
        if out is not x:
            spec.diagnostics.forward = strip_forward(out)
            status = spec.diagnostics.forward.status
            if status is not Status.UNKNOWN:
                extra = f" ({spec.diagnostics.forward.message})" if spec.diagnostics.forward.message else ""
                tasks = spec.diagnostics.forward.task_status
                if tasks is not None and not status.ok:
                    extra += f"; failing task(s): {[i for i, s in enumerate(tasks) if not s.ok]}"
                report(status.ok, f"{spec.name}: the inner solve did not converge: {status}{extra}", spec.on_failure)
        else:
            spec.diagnostics.forward = None
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
    def vmap(info: Any, in_dims: tuple, spec: _Spec, *flat: Tensor) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:  # type: ignore[override]
        """``torch.func.vmap`` over a layer call: one solve per vmapped slice, stacked.

        Each slice is an ordinary call of the layer (its own solve and, in reverse mode,
        its own implicit backward), so the result equals a loop over the slices and
        ``batched=True`` on the same tasks (tested); it is not the fused batched solve.
        """
        n = info.batch_size
        outs = []
        for b in range(n):
            sl = [t if d is None else t.select(d, b) for t, d in zip(flat, in_dims[1:])]
            outs.append(_ImplicitFunction.apply(spec, *sl))
        stacked = tuple(torch.stack([o[i] for o in outs]) for i in range(len(outs[0])))
        return stacked, (0,) * len(stacked)

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor | None) -> tuple[Tensor, ...]:
        """Forward mode: for a tangent ``t`` of the arguments, solve ``A s = −B t`` (docs/design.md §1)."""
        spec: _Spec = ctx.spec
        nx = spec.x_def.num_leaves
        saved = ctx.saved_tensors
        x_leaves, arg_leaves = list(saved[:nx]), list(saved[nx:])
        t_args = list(tangents[1 + nx :])
        s_leaves, res = implicit_jvp(spec, x_leaves, arg_leaves, t_args)
        spec.diagnostics.backward = strip_backward(res)
        spec.diagnostics.backward_call = spec.call_id
        statuses = res.task_status if res.task_status is not None else (res.status,)
        if Status.NONFINITE in statuses:
            raise NonFiniteError(f"{spec.name}: the forward-mode linear solve met a NaN or Inf: {res.summary()}")
        if not res.success:
            report(False, f"{spec.name}: the forward-mode linear solve did not converge: {res.summary()}",
                   spec.on_failure)
        return tuple(s_leaves)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        # The backward is first-order: a double backward must raise instead of being
        # silently wrong.  With autograd's create_graph=True the gradients get a node that
        # raises an error naming the layer if anything differentiates them; inside a
        # torch.func transform (which also runs backward with grad mode on) torch's own
        # once_differentiable does it, and _refuse_second_order names the layer first.
        saved = ctx.saved_tensors
        if torch.is_grad_enabled() and not any_wrapped([*saved, *(g for g in grads if g is not None)]):
            with torch.no_grad():
                out = _ImplicitFunction._backward(ctx, *grads)
            anchors = [t for t in saved if t.requires_grad]
            return _first_order_only(ctx.spec.name, out, anchors)
        return _once_differentiable_backward(ctx, *grads)

    @staticmethod
    def _backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        spec: _Spec = ctx.spec
        nx = spec.x_def.num_leaves
        saved = ctx.saved_tensors
        x_leaves = [t.detach() for t in saved[:nx]]
        arg_leaves = saved[nx:]
        need = ctx.needs_input_grad[1 + nx :]
        none_prefix: tuple[None, ...] = (None,) * (1 + nx)
        if not any(need):
            return none_prefix + (None,) * len(arg_leaves)

        v_leaves = [torch.zeros_like(xl) if g is None else g for g, xl in zip(grads, x_leaves)]
        out, res = implicit_vjp(spec, x_leaves, v_leaves, list(arg_leaves), need)
        spec.diagnostics.backward = strip_backward(res)
        spec.diagnostics.backward_call = spec.call_id
        statuses = res.task_status if res.task_status is not None else (res.status,)
        if Status.NONFINITE in statuses:
            # Whatever on_failure says: "ignore" means "a fixed budget is expected", not
            # "hide NaN" -- a NaN/Inf cotangent or Hessian product would otherwise leave
            # the solver's finite x = 0 as a silent zero meta-gradient.
            tasks = [i for i, st in enumerate(statuses) if st is Status.NONFINITE] if res.task_status is not None else []
            where = f" for task(s) {tasks}" if tasks else ""
            raise NonFiniteError(
                f"{spec.name}: the backward linear solve met a NaN or Inf{where} (in the cotangent of the solution "
                f"or in a Jacobian-vector product): {res.summary()}"
            )
        if not res.success:  # the message reads values: only build it when it is needed
            failing = ""
            if res.task_status is not None:
                failing = f"; failing task(s): {[i for i, s in enumerate(res.task_status) if not s.ok]}"
            report(
                False,
                f"{spec.name}: the backward linear solve ({type(spec.linsolve).__name__}) did not converge: "
                f"{res.summary()}{failing}",
                spec.on_failure,
            )
        return none_prefix + tuple(out)


_once_differentiable_backward = once_differentiable(_ImplicitFunction._backward)


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


def _first_order_only(name: str, out: tuple[Tensor | None, ...], anchors: list[Tensor]) -> tuple[Tensor | None, ...]:
    """``out`` (a backward's gradients) routed through :class:`_SecondDerivativeRefused`."""
    idx = [i for i, g in enumerate(out) if g is not None]
    if not idx or not anchors:
        return out
    wrapped = _SecondDerivativeRefused.apply(name, len(idx), *[out[i] for i in idx], *anchors)
    res = list(out)
    for i, w in zip(idx, wrapped):
        res[i] = w
    return tuple(res)


def implicit_vjp(
    spec: _Spec, x_leaves: list[Tensor], v_leaves: list[Tensor], arg_leaves: list[Tensor], need: Sequence[bool]
) -> tuple[list[Tensor | None], Any]:
    """The implicit function theorem's vector-Jacobian product, as one function of its inputs.

    With ``A = ∂F/∂x`` and ``B = ∂F/∂args`` at the solution ``x*`` (docs/design.md §1;
    Rajeswaran et al. 2019, Lemma 1; Blondel et al. 2022, Eq. 5)::

        solve  Aᵀ u = v          (spec.linsolve, matrix-free: products with Aᵀ only)
        return −Bᵀ u             (one VJP of F, or the layer's closed form)

    It reads nothing but its arguments and the per-call ``spec`` (no layer, no ctx), so
    it can be called outside autograd, e.g. by a custom transform.

    Args:
        spec: the call's configuration (optimality map, linear solver, batching, ...).
        x_leaves: leaves of the solution ``x*`` (detached).
        v_leaves: leaves of the cotangent ``v = ∂l/∂x*``.
        arg_leaves: the tensor leaves of the arguments, in the layer's packing order.
        need: per argument leaf, whether its gradient is wanted.

    Returns:
        ``(grads, result)``: per argument leaf ``−Bᵀu`` (``None`` where not needed) and
        the linear solve's :class:`~bilevel.LinearSolveResult` (whose ``x`` is ``u``).
    """
    if _autocast_on(x_leaves):
        # The backward is not autocast, even when backward() is called inside an autocast
        # region: the adjoint system follows backward_dtype (float32 for half inputs).
        with torch.autocast(device_type=x_leaves[0].device.type, enabled=False):
            return implicit_vjp(spec, x_leaves, v_leaves, arg_leaves, need)
    work = _work_dtype(spec.backward_dtype, x_leaves, arg_leaves)
    if work is not None:
        # The whole backward in ``work`` precision (the adjoint system sums many products:
        # half precision loses the meta-gradient), the gradients back in each input's dtype.
        def up(t: Tensor) -> Tensor:
            return t.to(work) if t.is_floating_point() else t

        grads, res = implicit_vjp(dataclasses.replace(spec, backward_dtype=None), [up(t) for t in x_leaves],
                                  [up(t) for t in v_leaves], [up(a.detach()) for a in arg_leaves], need)
        return [None if g is None else g.to(a.dtype) for g, a in zip(grads, arg_leaves)], res
    if any_wrapped([*x_leaves, *arg_leaves, *v_leaves]):
        return _functional_vjp(spec, x_leaves, v_leaves, arg_leaves, need)
    x = tree_unflatten(spec.x_def, x_leaves)
    v = tree_unflatten(spec.x_def, v_leaves)
    args_det = _unpack_args(spec.layout, [a.detach() for a in arg_leaves])

    loop = spec.task_optimality is not None and spec.task_dims is not None
    graphs = _GraphLog(spec.name, check=spec.closed_vjp is not None)
    with _suspended_saved_tensor_hooks():
        if loop:
            res = _looped_solve(spec, x_leaves, v_leaves, args_det, graphs)
        else:
            matvec = _operator(spec, x, args_det, spec.optimality, graphs)
            with torch.enable_grad():
                res = spec.linsolve(matvec, v, batched=spec.batched)
    u_leaves, _ = tree_flatten(res.x)

    # −Bᵀu in closed form where the layer has one and the graphs of F have been checked
    # for closed-over tensors; else one VJP of F.
    if spec.closed_vjp is not None and graphs.all_built():
        closed = spec.closed_vjp(x_leaves, [t.detach() for t in u_leaves], [a.detach() for a in arg_leaves], need)
        if closed is not None:
            return closed, res
    with torch.enable_grad(), _suspended_saved_tensor_hooks():
        req = [a.detach().requires_grad_(True) if n else a.detach() for a, n in zip(arg_leaves, need)]
        args_req = _unpack_args(spec.layout, req)
        if loop:
            # One VJP of the stacked per-task residuals: task b's F depends on slice b
            # of the per-task arguments and on the shared ones, whose gradient sums.
            F_leaves, u_all = [], []
            for b in range(x_leaves[0].shape[0]):
                xb = tree_unflatten(spec.x_def, [t[b] for t in x_leaves])
                Fb = spec.task_optimality(xb, *task_slice(args_req, spec.task_dims, b))  # type: ignore[misc,arg-type]
                F_leaves += tree_flatten(Fb)[0]
                u_all += [u[b] for u in u_leaves]
            u_leaves = u_all
        else:
            F_leaves = tree_flatten(spec.optimality(x, *args_req))[0]
        targets = [r for r, n in zip(req, need) if n]
        _warn_closed_over(F_leaves, targets, spec.name)
        pairs = [(f, -u) for f, u in zip(F_leaves, u_leaves) if f.requires_grad]
        gs: tuple[Tensor | None, ...] = (None,) * len(targets)
        if pairs:
            gs = torch.autograd.grad(
                [p[0] for p in pairs], targets, grad_outputs=[p[1] for p in pairs], allow_unused=True
            )
    it = iter(gs)
    return [next(it) if n else None for n in need], res


def implicit_jvp(
    spec: _Spec, x_leaves: list[Tensor], arg_leaves: list[Tensor], t_args: Sequence[Tensor | None]
) -> tuple[list[Tensor], Any]:
    """The implicit function theorem's Jacobian-vector product: ``s = −A⁻¹ B t``.

    ``A = ∂F/∂x`` and ``B = ∂F/∂args`` at the solution; ``t``: tangents of the argument
    leaves (``None``: zero).  Built from ``torch.func.vjp`` only (no ``requires_grad_``,
    no nested forward mode), so it runs under ``torch.autograd.forward_ad`` and inside
    ``torch.func.jvp``: ``B t`` and ``A u`` are VJPs of the (linear) VJP maps, the
    "double-VJP" trick.

    Returns:
        ``(s_leaves, result)``: the tangent of each solution leaf and the linear solve's
        :class:`~bilevel.LinearSolveResult`.
    """
    if spec.task_optimality is not None:
        raise UnsupportedError(
            f"{spec.name}: forward-mode differentiation of batched='loop' is not supported; use batched=True (vmap)"
        )
    tangents = [torch.zeros_like(a) if t is None else t for a, t in zip(arg_leaves, t_args)]
    _refuse_second_order(spec.name, "forward")
    _refuse_vmapped(spec.name, "forward", tangents, spec.linsolve)

    F_x, F_args = _flat_maps(spec, x_leaves, arg_leaves)

    with _suspended_saved_tensor_hooks():
        F0, vjp_args = torch.func.vjp(F_args, *arg_leaves)[:2]
        # B t: the VJP map w -> Bᵀw is linear, so its own VJP with cotangent t is B t.
        vjp_of_vjp = torch.func.vjp(lambda *w: vjp_args(list(w)), *[torch.zeros_like(f) for f in F0])[1]
        Bt = vjp_of_vjp(tuple(tangents))
        vjp_x = torch.func.vjp(F_x, *x_leaves)[1]
        if spec.symmetric:

            def matvec(u: Any) -> Any:
                return tree_unflatten(spec.x_def, list(vjp_x(tree_flatten(u)[0])))
        else:
            vjp_xt = torch.func.vjp(lambda *w: vjp_x(list(w)), *[torch.zeros_like(f) for f in F0])[1]

            def matvec(u: Any) -> Any:
                return tree_unflatten(spec.x_def, list(vjp_xt(tuple(tree_flatten(u)[0]))))

        rhs = tree_unflatten(spec.x_def, [-b for b in Bt])
        res = spec.linsolve(matvec, rhs, batched=spec.batched)
    return tree_flatten(res.x)[0], res


def _flat_maps(
    spec: _Spec, x_leaves: list[Tensor], arg_leaves: list[Tensor]
) -> tuple[Callable[..., list[Tensor]], Callable[..., list[Tensor]]]:
    """The optimality map's leaves as functions of x's leaves (arguments fixed) and of the
    argument leaves (x fixed): what ``torch.func.vjp`` differentiates in the functional paths."""

    def F_x(*xl: Tensor) -> list[Tensor]:
        return tree_flatten(spec.optimality(tree_unflatten(spec.x_def, list(xl)), *_unpack_args(spec.layout, arg_leaves)))[0]

    def F_args(*a: Tensor) -> list[Tensor]:
        return tree_flatten(spec.optimality(tree_unflatten(spec.x_def, x_leaves), *_unpack_args(spec.layout, list(a))))[0]

    return F_x, F_args


def _refuse_vmapped(name: str, mode: str, tensors: Sequence[Tensor], linsolve: Any = None) -> None:
    """A batch of cotangents/tangents under ``vmap`` (``jacrev``, ``jacfwd``, ``hessian``,
    ``vmap`` of ``grad``) would drive the Krylov solver's data-dependent stopping tests with
    batched values: refuse with what to do instead, not torch's internal message."""
    syncless = getattr(linsolve, "steps", None) is not None or getattr(linsolve, "vmap_tolerance", False)
    if not syncless and any(is_vmapped(t) for t in tensors):
        raise UnsupportedError(
            f"{name}: vmapped {mode}-mode products through an implicit layer (jacrev, jacfwd, or vmap of "
            f"grad/vjp/jvp) need a linear solver without data-dependent host control: {type(linsolve).__name__} "
            "to a tolerance stops on such tests. Use CG, MINRES or Neumann (to a tolerance: they then run all "
            "their maxiter iterations), any solver with a fixed budget (steps=m), or compute Jacobian rows with "
            "a Python loop of torch.func.vjp/jvp calls"
        )


def _autocast_on(leaves: Sequence[Tensor]) -> bool:
    """Whether autocast is enabled for the device of these tensors."""
    dev = leaves[0].device.type
    try:
        return bool(torch.is_autocast_enabled(dev))
    except TypeError:  # torch < 2.4: per-device query functions
        return bool(torch.is_autocast_enabled() if dev == "cuda" else torch.is_autocast_cpu_enabled())


def _refuse_second_order(name: str, mode: str) -> None:
    """The implicit derivative is first-order: differentiating it again (``hessian``,
    ``grad`` of ``grad``, ``jvp`` of ``grad``, ``grad`` of ``jvp``) would differentiate the
    linear solver's iterations, not the implicit function -- measured 52 % off a finite-
    difference Hessian.  Refuse it whenever the ``torch.func`` stack shows it."""
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


def _functional_vjp(
    spec: _Spec, x_leaves: list[Tensor], v_leaves: list[Tensor], arg_leaves: list[Tensor], need: Sequence[bool]
) -> tuple[list[Tensor | None], Any]:
    """:func:`implicit_vjp` with ``torch.func`` primitives only, for a backward that runs inside
    a ``torch.func`` transform (``torch.func.grad`` of a loss containing a layer), where
    ``requires_grad_`` and ``torch.autograd.grad`` are not allowed: ``Aᵀu`` is a VJP of F
    in x, ``−Bᵀu`` one in the arguments."""
    if spec.task_optimality is not None:
        raise UnsupportedError(
            f"{spec.name}: torch.func transforms of batched='loop' are not supported; use batched=True (vmap)"
        )
    _refuse_second_order(spec.name, "reverse")
    _refuse_vmapped(spec.name, "reverse", v_leaves, spec.linsolve)

    F_x, F_args = _flat_maps(spec, x_leaves, arg_leaves)

    with _suspended_saved_tensor_hooks():
        vjp_x = torch.func.vjp(F_x, *x_leaves)[1]

        def matvec(u: Any) -> Any:
            return tree_unflatten(spec.x_def, list(vjp_x(tree_flatten(u)[0])))

        res = spec.linsolve(matvec, tree_unflatten(spec.x_def, v_leaves), batched=spec.batched)
        u_leaves = tree_flatten(res.x)[0]
        vjp_args = torch.func.vjp(F_args, *arg_leaves)[1]
        gs = vjp_args([-u for u in u_leaves])
    return [g if n else None for g, n in zip(gs, need)], res


_HALF = (torch.float16, torch.bfloat16)


def _work_dtype(policy: Any, x_leaves: list[Tensor], arg_leaves: Sequence[Tensor]) -> torch.dtype | None:
    """The dtype the backward runs in, if not the inputs' own (``None``)."""
    if policy is None:
        return None
    floats = [t.dtype for t in (*x_leaves, *arg_leaves) if t.is_floating_point()]
    if policy == "auto":
        return torch.float32 if any(d in _HALF for d in floats) else None
    return policy if any(d != policy for d in floats) else None


def _check_residual_structure(Fx: Any, x: Any, name: str) -> None:
    try:
        fl, fd = tree_flatten(Fx)
    except TypeError as e:
        raise BilevelTypeError(f"{name}: the optimality residual is not a tensor tree: {e}") from None
    xl, xd = tree_flatten(x)
    if fd != xd or any(a.shape != b.shape for a, b in zip(fl, xl)):
        raise BilevelValueError(
            f"{name}: the optimality residual must have the structure of x; got {fd!r} with shapes "
            f"{[tuple(a.shape) for a in fl]}, x is {xd!r} with shapes {[tuple(b.shape) for b in xl]}"
        )


class _GraphLog:
    """Which backward operators built their reverse-mode graph of F, and the closed-over check on it.

    A graph of F built with the arguments detached reaches, besides x, exactly the
    tensors the optimality map closes over: when a closed-form VJP skips the generic
    VJP (where :func:`_warn_closed_over` runs), the check runs here instead, once per
    backward, at no extra cost.
    """

    def __init__(self, name: str, check: bool) -> None:
        self.name, self.check = name, check
        self.operators = 0
        self.built = 0

    def graph(self, F_leaves: list[Tensor], x_leaves: list[Tensor]) -> None:
        if self.check and self.built == 0:
            _warn_closed_over(F_leaves, x_leaves, self.name)
        self.built += 1

    def all_built(self) -> bool:
        return self.operators > 0 and self.built == self.operators


def _looped_solve(spec: _Spec, x_leaves: list[Tensor], v_leaves: list[Tensor], args: tuple, graphs: _GraphLog) -> Any:
    """One unbatched linear solve per task (``batched="loop"``), results stacked."""
    per = []
    for b in range(x_leaves[0].shape[0]):
        xb = tree_unflatten(spec.x_def, [t[b] for t in x_leaves])
        vb = tree_unflatten(spec.x_def, [t[b] for t in v_leaves])
        matvec = _operator(spec, xb, task_slice(args, spec.task_dims, b), spec.task_optimality, graphs)  # type: ignore[arg-type]
        with torch.enable_grad():
            per.append(spec.linsolve(matvec, vb, batched=False))
    u = tree_unflatten(spec.x_def, [torch.stack(ls) for ls in zip(*[tree_flatten(r.x)[0] for r in per])])
    return stack_linear_results(per, u)


def _operator(
    spec: _Spec, x: Any, args: tuple, optimality: Callable[..., Any], graphs: _GraphLog | None = None
) -> Callable[[Any], Any]:
    """Matrix-free ``u -> A^T u`` at the solution (``A u`` when A is symmetric).

    Symmetric, ``hvp="forward"``: forward-over-reverse (``torch.func.jvp`` of the
    optimality map, itself a gradient for Argmin/Proximal), vmap-friendly; if an
    operation has no forward-mode rule it falls back to reverse-over-reverse.
    ``hvp="reverse"``: reverse-over-reverse on a graph of F built once per backward and
    reused by every product (one extra gradient's memory; in eager PyTorch each product
    is often several times cheaper than a forward-mode one — ``benchmarks/backward_cost.py``
    measures both).
    Non-symmetric: ``torch.func.vjp`` built once; each product reuses it.
    """

    def F(y: Any) -> Any:
        return optimality(y, *args)

    if not spec.symmetric:
        with torch.enable_grad():
            Fx, vjp_fn = torch.func.vjp(F, x)[:2]
        _check_residual_structure(Fx, x, spec.name)

        def matvec_t(u: Any) -> Any:
            return tree_detach(vjp_fn(u)[0])

        return matvec_t

    state: dict[str, Any] = {"mode": "jvp" if spec.hvp == "forward" else "reverse", "checked": False}
    if graphs is not None:
        graphs.operators += 1

    def reverse(u: Any) -> Any:
        if "graph" not in state:
            with torch.enable_grad():
                xl, xd = tree_flatten(x)
                xr = [t.detach().requires_grad_(True) for t in xl]
                Fx = F(tree_unflatten(xd, xr))
            if not state["checked"]:
                _check_residual_structure(Fx, x, spec.name)
                state["checked"] = True
            state["graph"] = (tree_flatten(Fx)[0], xr, xd)
            if graphs is not None:
                graphs.graph(state["graph"][0], xr)
        F_leaves, xr, xd = state["graph"]
        ul, _ = tree_flatten(u)
        pairs = [(f, w) for f, w in zip(F_leaves, ul) if f.requires_grad]
        if not pairs:  # F does not depend on x at all: A = 0
            return tree_unflatten(xd, [torch.zeros_like(r) for r in xr])
        with torch.enable_grad():
            gs = torch.autograd.grad(
                [p[0] for p in pairs], xr, grad_outputs=[p[1] for p in pairs], retain_graph=True, allow_unused=True
            )
        return tree_unflatten(xd, [torch.zeros_like(r) if g is None else g.detach() for g, r in zip(gs, xr)])

    def matvec(u: Any) -> Any:
        if state["mode"] == "jvp":
            try:
                Fx, Au = torch.func.jvp(F, (x,), (u,))[:2]
            except (RuntimeError, NotImplementedError):
                state["mode"] = "reverse"
                return reverse(u)
            if not state["checked"]:
                _check_residual_structure(Fx, x, spec.name)
                state["checked"] = True
            return tree_detach(Au)
        return reverse(u)

    return matvec


def _warn_closed_over(outputs: list[Tensor], targets: list[Tensor], name: str) -> None:
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


#: What ``torch.compile(..., fullgraph=True)`` says when it meets a layer (torch >= 2.8
#: shows a ``torch.compiler.disable`` reason; older versions their generic message).
EAGER_REASON = (
    "a bilevel implicit layer runs eagerly between compiled graphs: its black-box inner solver and the "
    "backward's linear solve have host-side control flow and torch.func internals that dynamo does not trace. "
    "Compile with fullgraph=False (one graph break at the layer; the code before and after it is compiled), "
    "or compile the functions the layer calls (the inner loss, a model) instead of the whole step"
)


def _eager_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compiler.disable`` with :data:`EAGER_REASON` (one clean graph break instead of
    dynamo's warnings about untraceable builtins inside the solvers)."""
    try:
        return torch.compiler.disable(fn, reason=EAGER_REASON)  # type: ignore[call-arg,unused-ignore]
    except TypeError:  # torch < 2.8: no reason argument
        return torch.compiler.disable(fn)


@_eager_only
def implicit_apply(
    problem: Problem,
    *,
    linsolve: Any,
    diagnostics: Diagnostics,
    on_failure: OnFailure,
    name: str,
    hvp: HvpMode = "reverse",
    backward_dtype: Any = "auto",
) -> Any:
    """Run ``problem.solve`` and return its solution, differentiable w.r.t. the tensor trees
    in ``problem.args``.

    The configuration was validated once, by the layer that built ``problem``.  With
    ``task_optimality`` and ``task_dims`` (batched only), the backward loops over the
    tasks: one unbatched linear solve and VJP per task (the ``batched="loop"`` strategy).
    """
    x0, args, batched = problem.x0, problem.args, problem.batched
    try:
        x_leaves, x_def = tree_flatten(x0)
    except TypeError as e:
        raise BilevelTypeError(f"{name}: the initial point must be a tensor tree: {e}") from None
    if not x_leaves:
        raise BilevelValueError(f"{name}: the initial point is an empty tree")
    for leaf in x_leaves:
        if not leaf.dtype.is_floating_point:
            raise BilevelTypeError(f"{name}: the unknowns must be floating-point tensors, got {leaf.dtype}")
    if batched:
        batch_size(x0)
    arg_leaves, layout = _pack_args(args)
    if any(t.device.type == "meta" for t in (*x_leaves, *arg_leaves)):
        # A shape-only run (e.g. a model built on the meta device): no solver can run on
        # values that do not exist; the solution has the initial point's shapes and dtypes.
        # No gradient flows (there is nothing to differentiate), and no diagnostics.
        return tree_unflatten(x_def, [torch.empty_like(t, device="meta") for t in x_leaves])
    call_id = diagnostics.start_call()
    spec = _Spec(
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
        closed_vjp=problem.closed_vjp,
        call_id=call_id,
        backward_dtype=backward_dtype,
    )
    out = _ImplicitFunction.apply(spec, *[t.detach() for t in x_leaves], *arg_leaves)
    if torch.is_grad_enabled() and not any(t.requires_grad for t in arg_leaves):
        _warn_if_only_closed_over_tensors_need_grad(spec, list(out), arg_leaves)
    return tree_unflatten(x_def, list(out))


def _warn_if_only_closed_over_tensors_need_grad(spec: _Spec, x_leaves: list[Tensor], arg_leaves: list[Tensor]) -> None:
    """No argument requires grad, so the solution will not either; if the optimality map
    closes over a tensor that does, the user meant it to get a gradient and would otherwise
    meet torch's "element 0 of tensors does not require grad" at ``backward()``.

    Costs one evaluation of F, and only in this case (with grad mode on and no argument
    requiring grad -- e.g. evaluation outside ``torch.no_grad()``).
    """
    args = _unpack_args(spec.layout, [a.detach() for a in arg_leaves])
    fn = spec.optimality
    x_all = x_leaves
    if spec.task_optimality is not None and spec.task_dims is not None:  # the loop strategy: task 0 suffices
        fn, x_all, args = spec.task_optimality, [t[0] for t in x_leaves], task_slice(args, spec.task_dims, 0)
    with torch.enable_grad():
        F = tree_flatten(fn(tree_unflatten(spec.x_def, [t.detach() for t in x_all]), *args))[0]
    if any(f.requires_grad for f in F):
        warnings.warn(
            f"{spec.name}: no argument of the layer requires grad, so its solution does not either, but the "
            "optimality condition uses tensor(s) that do (closed over, not passed as arguments): they will get no "
            "gradient, and backward() through the solution will fail. Pass them as arguments of the layer.",
            ClosedOverTensorWarning,
            stacklevel=3,
        )
