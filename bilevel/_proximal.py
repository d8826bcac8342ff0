"""The proximal layer of implicit MAML and its closed-form argument product (docs/design.md §1)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._argmin import Argmin
from ._batching import InDims, arg_dims, strategy_of, task_count
from ._errors import BilevelTypeError, BilevelValueError
from ._guards import eager_only, flatten_checked, refuse_inference_mode
from ._problem import ClosedBt, task_slice
from ._traced import compile_boundary, tracing
from ._transforms import any_wrapped
from ._tree import is_tree, tree_flatten, tree_map
from ._types import BackwardDtype, Batched, HvpMode, OnFailure


def _lam_tree(lam: Any, theta: Any, name: str) -> Any:
    """Validate λ and return it as a tensor or a tree matching θ (leaves 0-d or θ-shaped)."""
    t_leaves, t_def = tree_flatten(theta)
    ref = t_leaves[0]
    if isinstance(lam, bool) or not isinstance(lam, (int, float, Tensor, dict, list, tuple)):
        raise BilevelTypeError(f"{name}: lam must be a float, a tensor or a tree of tensors matching theta, got {type(lam).__name__}")
    if isinstance(lam, (int, float)):
        if not math.isfinite(lam) or lam <= 0:
            raise BilevelValueError(f"{name}: lam must be finite and > 0, got {lam}")
        return torch.tensor(float(lam), dtype=ref.dtype, device=ref.device)
    if isinstance(lam, Tensor) and lam.dim() == 0:
        leaves = [lam]
    else:
        leaves, d = flatten_checked(lam, name, "lam")
        if d != t_def:
            raise BilevelValueError(f"{name}: lam's structure {d!r} must be a scalar or match theta's {t_def!r}")
        for lt, tt in zip(leaves, t_leaves):
            if lt.dim() != 0 and lt.shape != tt.shape:
                raise BilevelValueError(
                    f"{name}: each leaf of lam must be a scalar (per layer) or have its parameter's shape "
                    f"(per element); got {tuple(lt.shape)} for a parameter of shape {tuple(tt.shape)}"
                )
    for leaf in leaves:
        if not leaf.dtype.is_floating_point:
            raise BilevelTypeError(f"{name}: lam must be floating point, got {leaf.dtype}")
        # One host sync per call (not per iteration) to refuse a λ that makes the problem ill-posed.
        if not bool(torch.isfinite(leaf).all()) or not bool((leaf > 0).all()):
            raise BilevelValueError(f"{name}: lam must be finite and > 0 everywhere; got min {float(leaf.min())}")
    return lam


def proximal_term(phi: Any, theta: Any, lam: Any) -> Tensor:
    """½ Σ_j λ_j ‖φ_j − θ_j‖² for λ a scalar, a per-leaf scalar or a per-element tree."""
    p_leaves, _ = tree_flatten(phi)
    t_leaves, _ = tree_flatten(theta)
    if isinstance(lam, Tensor) and lam.dim() == 0:
        return 0.5 * lam * sum(((p - t) ** 2).sum() for p, t in zip(p_leaves, t_leaves))
    l_leaves, _ = tree_flatten(lam)
    return 0.5 * sum((lj * (p - t) ** 2).sum() for p, t, lj in zip(p_leaves, t_leaves, l_leaves))  # type: ignore[return-value]


def proximal_closed_bt(n_theta: int, scalar_lam: bool, batched: bool) -> ClosedBt:
    """``Bᵀw`` of a :class:`Proximal` layer in closed form: a specialisation of the generic
    argument VJP of the implicit function theorem's rule (docs/design.md §1).

    With ``F(φ; θ, λ, data) = ∇L(φ; data) + Λ(φ − θ)`` (+ the damping term, which does not
    depend on the arguments), ``(∂F/∂θ)ᵀ w = −Λ w`` and ``(∂F/∂λ)ᵀ w = (φ* − θ) · w``,
    summed over tasks in batched mode; with ``w = −u`` the meta-gradient is ``Λu``
    (Rajeswaran et al. 2019, Eq. 6: ``λ (H + λI)^{-1} v``).  Nothing re-evaluates F -- no
    forward/backward of the inner loss, which the generic VJP pays for terms that do not
    depend on θ or λ.  Returns ``None`` (use the generic VJP) when a data argument needs a
    gradient, which the closed form does not give.

    Args:
        n_theta: number of θ leaves; the arguments are θ's leaves, λ's, then the data's.
        scalar_lam: λ is one 0-d tensor shared by all leaves (else a tree matching θ
            whose leaves are 0-d or θ-shaped).
        batched: φ* and w carry a leading task dimension (θ and λ do not).
    """
    n_lam = 1 if scalar_lam else n_theta

    def bt(x: list[Tensor], w: list[Tensor], args: Sequence[Tensor], need: Sequence[bool]) -> list[Tensor | None] | None:
        if any(need[n_theta + n_lam:]):
            return None
        theta, lam = args[:n_theta], args[n_theta:n_theta + n_lam]
        out: list[Tensor | None] = []
        for j in range(n_theta):
            if need[j]:
                wj = w[j].sum(0) if batched else w[j]  # θ is shared: the task gradients add
                out.append((-(lam[0 if scalar_lam else j] * wj)).to(theta[j].dtype))
            else:
                out.append(None)
        prods = [(xj - tj) * wj for xj, tj, wj in zip(x, theta, w)] if any(need[n_theta:n_theta + n_lam]) else []
        if scalar_lam:
            out.append(torch.stack([p.sum() for p in prods]).sum().to(lam[0].dtype) if need[n_theta] else None)
        else:
            for j, lj in enumerate(lam):
                if not need[n_theta + j]:
                    out.append(None)
                elif lj.dim() == 0:
                    out.append(prods[j].sum().to(lj.dtype))
                else:
                    out.append((prods[j].sum(0) if batched else prods[j]).to(lj.dtype))
        out.extend([None] * (len(args) - n_theta - n_lam))
        return out

    return bt


class Proximal(Argmin):
    """φ*(θ) = argmin_φ inner_loss(φ, *args) + ½ Σ_j λ_j ‖φ_j − θ_j‖²  (implicit MAML).

    The inner solver starts at θ.  The backward solves ``(H + Λ) u = v`` with ``H`` the
    Hessian of ``inner_loss`` at φ* and returns ``dl/dθ = Λ u`` — for a scalar λ the
    paper's ``(I + H/λ)^{-1} v`` (Rajeswaran et al. 2019, Eq. 6) — and, as a by-product
    of the same solve, ``dl/dλ_j = −Σ (φ*_j − θ_j) u_j``.  ``H + Λ`` is SPD whenever
    ``λ > −λ_min(H)`` (every λ_j, for a tree of λ), so CG runs on it directly (not on the
    normal equations).  Memory kept for backward: φ*, θ, λ and the task data, whatever
    the number of inner steps.

    Args:
        inner_loss: ``inner_loss(phi, *args) -> scalar`` for one task (e.g. the support
            loss of a network evaluated with ``torch.func.functional_call``).
        lam: λ > 0: a float, a 0-d tensor (may require grad), or a tree matching θ whose
            leaves are 0-d (one λ per parameter tensor) or θ-shaped (one per element).
            A λ computed from a learned parameter (e.g. ``softplus(rho)``) should be passed
            per call as ``layer(theta, ..., lam=...)`` so that no graph is kept on the layer.
        solver: inner solver (default ``NewtonCG()``); it is called with the objective
            ``inner_loss + proximal term`` and θ as the initial point.
        linsolve: backward linear solver (default ``CG()``).
        damping: δ ≥ 0 added to the backward system only: it solves ``(H + Λ + δI) u = v``
            and returns ``Λ u`` (and ``−(φ* − θ) u`` for λ).  The forward is unchanged.
            δ > 0 keeps the system positive definite where ``H`` has eigenvalues below
            ``−λ`` (batch-norm nets far from a minimiser), at the price of a **biased**
            gradient: for scalar λ it is ``λ (H + (λ + δ) I)^{-1} v`` instead of
            ``(I + H/λ)^{-1} v`` — shrunk towards ``λ/(λ+δ) · v`` along directions of small
            curvature.  The official iMAML code's ``(1 + c) I + H/(λ + δ')`` system is
            this with ``lam = λ + δ'`` and ``damping = c (λ + δ')``.  Default 0 (exact).
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` on non-convergence (see
            :class:`ImplicitLayer`).
        hvp: ``"reverse"`` or ``"forward"`` Hessian-vector products in the backward (see
            :class:`ImplicitLayer`).
        backward_dtype: the precision of the backward (see :class:`ImplicitLayer`).
        solve_dtype: the precision of the inner solve (see :class:`Argmin`; by default
            half-precision θ is solved for in float32 and φ* returned in θ's dtype).

    Call ``layer(theta, *args, lam=None, batched=False, in_dims=0)``: ``lam`` given per
    call replaces the layer's λ for that call.  Batched (a meta-batch of B tasks in one
    computation)::

        phi = layer(theta, x_support, y_support, batched=True)   # x_support: (B, K, ...)

    θ and λ are shared; every argument with ``in_dims`` 0 carries the task dimension;
    every leaf of φ* gets a leading dimension B.  The solver and CG run batched with
    per-task step sizes and convergence; the gradient w.r.t. θ is the sum of the per-task
    gradients.

    Examples:
        With the inner loss ``(a/2) ||φ - x||²`` the Hessian is ``H = a I``, so
        ``φ* = (a x + λ θ) / (a + λ)`` and the meta-gradient of ``sum(φ*)`` is
        ``λ (H + λ I)^{-1} 1 = λ / (a + λ)`` per coordinate (here ``a = 3``, ``λ = 1``):

        >>> import torch, bilevel
        >>> layer = bilevel.Proximal(lambda phi, x: 1.5 * ((phi - x) ** 2).sum(), lam=1.0)
        >>> theta = torch.zeros(2, requires_grad=True)
        >>> phi = layer(theta, torch.tensor([1.0, 2.0]))
        >>> [round(v, 4) for v in phi.tolist()]
        [0.75, 1.5]
        >>> phi.sum().backward()
        >>> theta.grad
        tensor([0.2500, 0.2500])

        A learned λ, passed per call (it gets a gradient too), and a batch of 3 tasks:

        >>> rho = torch.tensor(0.0, requires_grad=True)
        >>> phi = layer(theta, torch.tensor([1.0, 2.0]), lam=torch.nn.functional.softplus(rho))
        >>> phi.sum().backward()
        >>> rho.grad is not None
        True
        >>> layer(theta, torch.ones(3, 2), batched=True).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        inner_loss: Callable[..., Tensor],
        lam: Any = 1.0,
        solver: Any = None,
        linsolve: Any = None,
        *,
        damping: float = 0.0,
        on_failure: OnFailure = "warn",
        hvp: HvpMode = "reverse",
        backward_dtype: BackwardDtype = "auto",
        solve_dtype: BackwardDtype = "auto",
    ) -> None:
        super().__init__(inner_loss, solver, linsolve, on_failure=on_failure, hvp=hvp, backward_dtype=backward_dtype,
                         solve_dtype=solve_dtype)
        if isinstance(lam, (int, float)) and not isinstance(lam, bool):
            if not math.isfinite(lam) or lam <= 0:
                raise BilevelValueError(f"Proximal: lam must be finite and > 0, got {lam}")
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
            raise BilevelValueError(f"Proximal: damping must be a finite float >= 0, got {damping!r}")
        try:
            lam_leaves = tree_flatten(lam)[0] if not isinstance(lam, (int, float)) else []
        except TypeError:
            lam_leaves = []  # refused with a clear message at the first call
        if any(t.grad_fn is not None for t in lam_leaves):
            raise BilevelValueError(
                "Proximal: lam carries an autograd graph (it was computed from a parameter, e.g. softplus(rho)); "
                "stored on the layer, that graph would be freed by the first backward and every later call would "
                "fail. Pass a learned λ per call instead: layer(theta, ..., lam=softplus(rho))"
            )
        self.lam = lam
        self.damping = float(damping)

    def _proximal_objective(self) -> Callable[..., Tensor]:
        """``(phi, theta, lam, *args) -> inner_loss(phi, *args) + proximal term``, the same
        function object on every call while ``self.objective`` is unchanged (see
        :meth:`Argmin._objectives`)."""
        inner = self.objective
        cached = self.__dict__.get("_proximal_cache")
        if cached is None or cached[0] is not inner:

            def objective(phi: Any, theta: Any, lam: Any, *a: Any) -> Tensor:
                return inner(phi, *a) + proximal_term(phi, theta, lam)

            cached = (inner, objective)
            self.__dict__["_proximal_cache"] = cached
        return cached[1]

    @compile_boundary
    def __call__(  # type: ignore[override]
        self,
        theta: Any,
        *args: Any,
        lam: Any = None,
        batched: Batched = False,
        in_dims: InDims = 0,
    ) -> Any:
        """Solve the proximal problem at θ and return φ*, differentiable in θ, λ and ``args``.

        Args:
            theta: the meta-parameters θ (a tensor or a tree of tensors); the solver starts there.
            *args: the inner loss's further arguments (task data), after φ.
            lam: λ for this call (a float, a 0-d tensor or a tree matching θ), e.g. computed from
                a learned parameter; ``None`` uses the layer's ``lam``.
            batched: ``False`` (one task), ``True``/``"auto"`` (measured), ``"vmap"`` or ``"loop"``.
            in_dims: per argument of ``args``, 0 (carries the task dimension) or ``None``
                (shared); one int applies to all.

        Returns:
            φ*, shaped like θ (with a leading task dimension when batched).
        """
        name = type(self).__name__
        strategy = strategy_of(batched, theta, name)
        theta_leaves, _ = flatten_checked(theta, name, "theta")
        if not theta_leaves:
            raise BilevelValueError(f"{name}: theta is an empty tree ({theta!r}): there are no meta-parameters to solve for")
        lam_t = _lam_tree(self.lam if lam is None else lam, theta, name)
        objective = self._proximal_objective()

        if strategy:
            dims = (None, None, *arg_dims(args, in_dims))
            n = task_count(args, dims[2:])
            x0 = tree_map(lambda t: t.detach().unsqueeze(0).expand(n, *t.shape).clone(), theta)
            strategy = self._resolve(strategy, objective, x0, (theta, lam_t, *args), dims)
        else:
            dims = ()
            # A copy: a solver that updates its initial point in place must not touch θ.
            x0 = tree_map(lambda t: t.detach().clone(), theta)
            self.diagnostics.strategy, self.diagnostics.strategy_seconds = None, None
        # Not while dynamo traces (the check reads a gradient on the host): the first eager call checks.
        if not self.__dict__.get("_inner_loss_checked") and not tracing():
            _check_inner_loss(self, theta, args, dims[2:] if strategy else None, name)
        scalar_lam = isinstance(lam_t, Tensor) and lam_t.dim() == 0
        closed = proximal_closed_bt(len(tree_flatten(theta)[0]), scalar_lam, strategy is not None)
        labels = ("theta", "lam", *(f"args[{i}]" for i in range(len(args))))
        return self._apply(self._problem(objective, x0, (theta, lam_t, *args), dims, strategy, self.damping, closed,
                                         labels, x0_copied=True))


@eager_only  # evaluates the loss: part of the layer's eager region under torch.compile
def _check_inner_loss(layer: Proximal, theta: Any, args: tuple, dims: Sequence[int | None] | None, name: str) -> None:
    """Refuse an inner loss with no gradient path to φ (detached, or computed outside
    torch): the proximal term alone would then be minimised, φ* = θ whatever the data,
    and the meta-gradient would be the identity -- silently.  Checked once per layer, on
    its first call (one evaluation of the inner loss, of one task)."""
    leaves = [*tree_flatten(theta)[0], *(t for a in args if is_tree(a) for t in tree_flatten(a)[0])]
    refuse_inference_mode(name, leaves)  # before evaluating anything: its own message
    if any_wrapped(leaves) or any(t.device.type == "meta" for t in leaves):
        return  # inside a torch.func transform or a shape-only run: nothing to evaluate
    a = args if dims is None else task_slice(args, dims, 0)
    with torch.enable_grad():
        phi = tree_map(lambda t: t.detach().requires_grad_(True), theta)
        value = layer.objective(phi, *a)  # Argmin keeps the inner loss as its objective
        reaches_phi = isinstance(value, Tensor) and value.requires_grad and any(
            g is not None for g in torch.autograd.grad(value.sum(), tree_flatten(phi)[0], allow_unused=True))
    if not reaches_phi:
        raise BilevelValueError(
            f"{name}: the inner loss does not depend on φ through torch operations (it returned "
            f"{'a tensor with no graph to φ' if isinstance(value, Tensor) else type(value).__name__}: detached, "
            "computed with .item()/.numpy(), or under torch.no_grad()): the layer would minimise the proximal "
            "term alone and return φ* = θ whatever the data. Return a differentiable function of φ"
        )
    layer.__dict__["_inner_loss_checked"] = True

