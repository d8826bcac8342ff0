"""The implicit function theorem's rule, written once (docs/design.md §1).

For ``F(x*, args) = 0`` with ``A = ∂F/∂x`` and ``B = ∂F/∂args`` at the solution
(Rajeswaran et al. 2019, Lemma 1 / Eq. 6 for the proximal case; Blondel et al. 2022,
Eq. 5, for the general root form):

* reverse mode: solve ``Aᵀu = v``, then ``∂ℓ/∂args = Bᵀ(−u)`` (:func:`implicit_vjp`);
* forward mode: solve ``A s = −B t`` (:func:`implicit_jvp`).

Both are pure functions of an :class:`~bilevel._operators.Operators` (the products with
``A`` and ``B``) and a linear solver.  Every backward of the library -- eager, inside a
``torch.func`` transform, per task, or Proximal's closed form, which is only a cheaper
``Bᵀ`` -- is one of these two calls on the operators :func:`backward_vjp` and
:func:`backward_jvp` pick.  The gradient depends on the solution only, never on the
solver's path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._errors import UnsupportedError
from ._guards import refuse_second_order, refuse_vmapped, suspended_saved_tensor_hooks
from ._operators import Operators, eager_operators, functional_operators
from ._result import LinearSolveResult, stack_results
from ._transforms import any_wrapped
from ._tree import TreeDef, tree_flatten, tree_unflatten
from ._types import LinearSolverLike

if TYPE_CHECKING:
    from ._function import CallSpec


def implicit_vjp(ops: Operators, linsolve: LinearSolverLike, v: Any, batched: bool) -> tuple[list[Tensor | None], LinearSolveResult]:
    """Reverse mode: solve ``Aᵀu = v`` (matrix-free), return ``(Bᵀ(−u) per argument leaf, the solve's result)``."""
    res = _solve_transpose(ops, linsolve, v, batched)
    return ops.bt([-u for u in tree_flatten(res.x)[0]]), res


def _solve_transpose(ops: Operators, linsolve: LinearSolverLike, v: Any, batched: bool) -> LinearSolveResult:
    """``Aᵀu = v``: one (batched) solve, or for a block-diagonal ``Aᵀ`` (the per-task loop)
    one unbatched solve per block, each block's operator built when its solve starts and
    dropped after it (one task's graph of F alive at a time; each task stops at its own
    convergence), the results stacked."""
    if ops.a_t_blocks is None:
        assert ops.a_t is not None
        return linsolve(ops.a_t, v, batched=batched)
    vl, vd = tree_flatten(v)
    per = [linsolve(make(), tree_unflatten(vd, [t[b] for t in vl]), batched=False) for b, make in enumerate(ops.a_t_blocks)]
    u = tree_unflatten(vd, [torch.stack(ls) for ls in zip(*[tree_flatten(r.x)[0] for r in per])])
    return stack_results(per, u)


def implicit_jvp(ops: Operators, linsolve: LinearSolverLike, t: list[Tensor], x_def: TreeDef, batched: bool) -> tuple[list[Tensor], LinearSolveResult]:
    """Forward mode: solve ``A s = −B t``, return ``(the leaves of s, the solve's result)``."""
    assert ops.a is not None and ops.b is not None, "forward mode needs the functional operators"
    rhs = tree_unflatten(x_def, [-b for b in ops.b(t)])
    res = linsolve(ops.a, rhs, batched=batched)
    return tree_flatten(res.x)[0], res


def backward_vjp(
    spec: CallSpec, x_leaves: list[Tensor], v_leaves: list[Tensor], arg_leaves: list[Tensor], need: Sequence[bool]
) -> tuple[list[Tensor | None], LinearSolveResult]:
    """The layer's reverse mode: :func:`implicit_vjp` on the operators of this setting.

    Inside a ``torch.func`` transform (``torch.func.grad`` of a loss containing a layer)
    only ``torch.func`` primitives are allowed: the functional operators; otherwise plain
    autograd (cheaper in eager PyTorch).
    """
    v = tree_unflatten(spec.x_def, v_leaves)
    if any_wrapped([*x_leaves, *arg_leaves, *v_leaves]):
        if spec.task_optimality is not None:
            raise UnsupportedError(
                f"{spec.name}: torch.func transforms of batched='loop' are not supported; use batched=True (vmap)"
            )
        refuse_second_order(spec.name, "reverse")
        refuse_vmapped(spec.name, "reverse", v_leaves, spec.linsolve, spec.symmetric)
        with suspended_saved_tensor_hooks():
            grads, res = implicit_vjp(functional_operators(spec, x_leaves, arg_leaves), spec.linsolve, v, spec.batched)
        return [g if n else None for g, n in zip(grads, need)], res
    with suspended_saved_tensor_hooks(), torch.enable_grad():
        return implicit_vjp(eager_operators(spec, x_leaves, arg_leaves, need), spec.linsolve, v, spec.batched)


def backward_jvp(
    spec: CallSpec, x_leaves: list[Tensor], arg_leaves: list[Tensor], t_args: Sequence[Tensor | None]
) -> tuple[list[Tensor], LinearSolveResult]:
    """The layer's forward mode: :func:`implicit_jvp` on the functional operators (they
    run under ``torch.autograd.forward_ad`` and inside ``torch.func.jvp``)."""
    if spec.task_optimality is not None:
        raise UnsupportedError(
            f"{spec.name}: forward-mode differentiation of batched='loop' is not supported; use batched=True (vmap)"
        )
    tangents = [torch.zeros_like(a) if t is None else t for a, t in zip(arg_leaves, t_args)]
    refuse_second_order(spec.name, "forward")
    refuse_vmapped(spec.name, "forward", tangents, spec.linsolve, spec.symmetric)
    with suspended_saved_tensor_hooks():
        ops = functional_operators(spec, x_leaves, arg_leaves)
        return implicit_jvp(ops, spec.linsolve, tangents, spec.x_def, spec.batched)
