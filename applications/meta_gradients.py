"""The meta-gradients of MAML, first-order MAML and iMAML, written once for the applications.

Each is "adapt θ to the tasks, then differentiate the outer (query) objective back to θ".
The few-shot application (:mod:`applications.imaml.algorithms`: a meta-batch of image
tasks sharing one θ), Figure 2a (:mod:`applications.experiments.fig2a`: one meta-gradient
per task) and the meta-gradient quality tool
(:mod:`applications.experiments.metagrad_quality`: one task, float64) all call the
functions here; they differ only in the losses and the data they pass.

Common arguments:

* ``inner(φ, *support) -> scalar``: one task's inner loss, written for one task;
* ``outer(φ) -> scalar`` (or ``(scalar, aux)`` with ``has_aux=True``): the objective of
  the adapted parameters that is differentiated (φ carries the task dimension when
  batched; the application returns the mean query loss over the tasks and, as ``aux``,
  the per-task metrics);
* ``theta``: the meta-parameters, a tensor tree whose leaves require grad
  (:func:`requiring_grad` makes such a copy);
* ``support``: the tuple of the inner loss's further arguments (with a leading task
  dimension when batched);
* ``clock(phase)``: a context manager around the phases ``"inner loop"``, ``"query
  forward"`` and ``"backward"`` (the application's profiler, :mod:`applications.imaml.phases`).

The three methods (Rajeswaran, Finn, Kakade & Levine 2019, Sec. 2-3):

* MAML — :func:`gd_steps` unrolled with a graph back to θ, then reverse mode through it;
* first-order MAML — the same steps without a graph; the gradient of ``outer`` at the
  adapted φ stands for the meta-gradient (``dφ/dθ`` taken as the identity);
* iMAML — a :class:`bilevel.Proximal` layer solves the inner problem and its backward
  gives the implicit gradient ``(I + H/λ)^{-1} ∇outer(φ*)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vmap

import bilevel
from bilevel.tree import tree_detach, tree_flatten, tree_map, tree_sub, tree_unflatten, tree_vdot

__all__ = [
    "MetaStep",
    "fomaml_meta_gradient",
    "gd_steps",
    "imaml_meta_gradient",
    "maml_meta_gradient",
    "no_clock",
    "requiring_grad",
]

Clock = Callable[[str], ContextManager[None]]


def no_clock(phase: str) -> ContextManager[None]:
    """The default ``clock``: times nothing."""
    return contextlib.nullcontext()


def requiring_grad(tree: Any) -> Any:
    """A detached copy of ``tree`` whose leaves require grad (fresh meta-parameters)."""
    return tree_map(lambda t: t.detach().clone().requires_grad_(True), tree)


@dataclasses.dataclass(frozen=True)
class MetaStep:
    """One meta-gradient and what was computed on the way.

    Attributes:
        grads: ``d outer / dθ``, a tree like θ (per task when θ carries the task dimension).
        objective: the differentiated value of ``outer`` (detached).
        aux: what ``outer`` returned beside it (``None`` without ``has_aux``).
        phi: the adapted parameters (detached).
        extra_grads: iMAML: the gradients of ``extra`` (e.g. the parameters of a learned λ).
        rhs: iMAML: ``∂outer/∂φ``, the right-hand side of the backward's linear system
            (a tree like φ), for relative residuals.
    """

    grads: Any
    objective: Tensor
    aux: Any
    phi: Any
    extra_grads: Any = None
    rhs: Any = None


def gd_steps(inner: Callable[..., Tensor], theta: Any, *args: Any, lr: float, steps: int, lam: float = 0.0) -> Any:
    """``steps`` gradient-descent steps of size ``lr`` on ``inner(φ, *args) + ½λ‖φ − θ‖²``
    from ``φ = θ`` (``lam = 0``: the inner loss alone, MAML's SGD).

    Written with :func:`torch.func.grad`: differentiable in θ (MAML's unrolled graph when θ
    requires grad) and vmappable over tasks; the iterates are those of
    :class:`bilevel.solvers.GradientDescent` inside :class:`bilevel.Proximal`.
    """
    objective = inner
    if lam:

        def objective(phi: Any, *a: Any) -> Tensor:
            d = tree_sub(phi, theta)
            return inner(phi, *a) + 0.5 * lam * tree_vdot(d, d)

    g_fn = grad(objective)
    phi = theta
    for _ in range(steps):
        phi = tree_map(lambda p, g: p - lr * g, phi, g_fn(phi, *args))
    return phi


def _adapt(inner: Callable[..., Tensor], theta: Any, support: tuple, lr: float, steps: int, lam: float, batched: bool,
           theta_batched: bool) -> Any:
    fn = functools.partial(gd_steps, inner, lr=lr, steps=steps, lam=lam)
    if not batched:
        return fn(theta, *support)
    return vmap(fn, in_dims=(0 if theta_batched else None, *(0,) * len(support)))(theta, *support)


def _outer(outer: Callable[[Any], Any], phi: Any, has_aux: bool) -> tuple[Tensor, Any]:
    out = outer(phi)
    return out if has_aux else (out, None)


def maml_meta_gradient(
    inner: Callable[..., Tensor], outer: Callable[[Any], Any], theta: Any, support: tuple, *, lr: float, steps: int,
    lam: float = 0.0, batched: bool = True, theta_batched: bool = False, has_aux: bool = False, clock: Clock = no_clock,
) -> MetaStep:
    """MAML: reverse mode through ``steps`` unrolled :func:`gd_steps` (second order).

    The graph of every step is kept, so memory grows with ``steps`` and the backward costs
    one Hessian-vector product per step.  ``batched``: ``support`` carries a task dimension
    and the adaptation is vmapped over it; ``theta_batched``: θ too (one θ per task, so the
    gradients are per task), else θ is shared and its gradient sums the tasks'.
    """
    with torch.enable_grad():
        with clock("inner loop"):
            phi = _adapt(inner, theta, support, lr, steps, lam, batched, theta_batched)
        with clock("query forward"):
            objective, aux = _outer(outer, phi, has_aux)
        leaves, treedef = tree_flatten(theta)
        with clock("backward"):
            gs = torch.autograd.grad(objective, leaves)
    return MetaStep(tree_unflatten(treedef, list(gs)), objective.detach(), aux, tree_detach(phi))


def fomaml_meta_gradient(
    inner: Callable[..., Tensor], outer: Callable[[Any], Any], theta: Any, support: tuple, *, lr: float, steps: int,
    lam: float = 0.0, batched: bool = True, theta_batched: bool = False, has_aux: bool = False, clock: Clock = no_clock,
) -> MetaStep:
    """First-order MAML: the gradient of ``outer`` at the adapted φ (no graph through the
    adaptation; ``dφ/dθ`` taken as the identity).  With a shared θ and ``batched``, the
    per-task gradients are summed over the tasks.  Arguments as :func:`maml_meta_gradient`."""
    with clock("inner loop"), torch.no_grad():
        phi = _adapt(inner, tree_detach(theta), support, lr, steps, lam, batched, theta_batched)
    # φ was just computed without a graph: it can be the leaf itself (no copy per meta-step).
    phi = tree_map(lambda t: t.detach().requires_grad_(True), phi)
    with torch.enable_grad():
        with clock("query forward"):
            objective, aux = _outer(outer, phi, has_aux)
        leaves, treedef = tree_flatten(phi)
        with clock("backward"):
            gs = list(torch.autograd.grad(objective, leaves))
            if batched and not theta_batched:
                gs = [g.sum(0) for g in gs]
    return MetaStep(tree_unflatten(treedef, gs), objective.detach(), aux, tree_detach(phi))


def imaml_meta_gradient(
    layer: bilevel.Proximal, outer: Callable[[Any], Any], theta: Any, support: tuple, *, lam: Any = None,
    extra: Any = (), batched: Any = True, has_aux: bool = False, clock: Clock = no_clock,
) -> MetaStep:
    """iMAML: ``φ = layer(θ, *support, lam=lam, batched=batched)``, then the gradient of
    ``outer(φ)`` with respect to θ and ``extra`` through the layer's implicit backward.

    ``lam``: a per-call λ (e.g. computed from the learned parameters in ``extra``; ``None``:
    the layer's own).  ``batched``: the layer's ``batched=`` (θ is shared by the tasks, so
    its gradient sums theirs).  The backward's right-hand side ``∂outer/∂φ`` is captured on
    the way (:attr:`MetaStep.rhs`).
    """
    with torch.enable_grad():
        with clock("inner loop"):
            phi = layer(theta, *support, lam=lam, batched=batched)
        phi_leaves, phi_def = tree_flatten(phi)
        rhs: dict[int, Tensor] = {}
        for i, leaf in enumerate(phi_leaves):
            leaf.register_hook(lambda g, i=i: rhs.__setitem__(i, g.detach()))
        with clock("query forward"):
            objective, aux = _outer(outer, phi, has_aux)
        theta_leaves, theta_def = tree_flatten(theta)
        extra_leaves, extra_def = tree_flatten(extra)
        with clock("backward"):  # the query backward, then the layer's (Krylov solve, closed-form VJP)
            gs = torch.autograd.grad(objective, theta_leaves + extra_leaves, allow_unused=True, materialize_grads=True)
    n = len(theta_leaves)
    v = [rhs[i] if i in rhs else torch.zeros_like(t) for i, t in enumerate(phi_leaves)]
    return MetaStep(
        tree_unflatten(theta_def, list(gs[:n])), objective.detach(), aux, tree_detach(phi),
        extra_grads=tree_unflatten(extra_def, list(gs[n:])), rhs=tree_unflatten(phi_def, v),
    )
