"""Meta-gradients of iMAML (GD and Hessian-free inner solvers), MAML, first-order MAML and Reptile.

Every algorithm is a function with one signature::

    meta_gradient(learner, theta, rho, batch) -> MetaGradient

where ``theta`` is the dict of meta-parameters (leaf tensors, as given to Adam), ``rho``
the dict of raw per-layer λ parameters (empty unless λ is learned), ``batch`` a
:class:`~applications.imaml.tasks.TaskBatch` of ``B`` tasks.  The result holds the
meta-loss (mean query loss over the tasks), the mean query metric (accuracy or MSE),
the meta-gradients (of the mean over tasks) and statistics of the inner and backward
solves.  A meta-batch is always processed as one batched computation — ``torch.func.vmap``
over the task dimension, and for iMAML one batched :class:`bilevel.Proximal` call — never
a Python loop over tasks.

iMAML (Rajeswaran, Finn, Kakade & Levine 2019).  Per task,
``φ*(θ) = argmin_φ L_support(φ) + ½ Σ_j λ_j ‖φ_j − θ_j‖²`` solved by
:class:`bilevel.solvers.GradientDescent` (iMAML-GD) or :class:`bilevel.solvers.NewtonCG`
(iMAML-HF) started at θ.  The meta-gradient of the query loss is
``(I + H/λ)^{-1} ∇L_query(φ*)`` (``H`` the support-loss Hessian at φ*), computed by
the layer's backward with a fixed budget of ``cg_steps`` conjugate-gradient iterations on
``(H + Λ) u = ∇L_query``, ``g = Λ u``.  The proximal term is what makes φ* depend on θ
through the optimality condition — without it the implicit gradient would be zero.
The layer runs with ``on_failure="ignore"``: a fixed number of CG steps (5 in the paper)
and a fixed number of inner steps are the paper's protocol, so "did not reach the
tolerance" is the expected outcome, not an error; the statuses are counted in the
statistics (and the CSV log) instead — including CG's negative-curvature stops, which mean
λ is too small for the current Hessian.

Learned λ (the extension the paper names as future work): one λ per parameter tensor,
``λ_j = lam_min + softplus(ρ_j)``, passed per call as ``lam=`` so that its gradient —
a by-product of the same CG solve, ``∂ℓ/∂λ_j = −Σ (φ*_j − θ_j) u_j`` — reaches ρ.

MAML (Finn, Abbeel & Levine 2017): ``inner_steps`` steps of SGD unrolled with
``torch.func.grad`` inside ``vmap`` and differentiated by reverse mode through the whole
loop (second order).  First-order MAML: the same adaptation without a graph; the
meta-gradient is the query gradient at the adapted parameters.  Reptile (Nichol, Achiam &
Schulman 2018): the same SGD adaptation; the meta-"gradient" is ``θ − mean_b φ_b``, which
Adam then follows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import bilevel
from bilevel.linsolve import CG, MINRES
from bilevel.solvers import GradientDescent, NewtonCG

from .tasks import TaskBatch

__all__ = [
    "ALGORITHMS",
    "IMPLICIT",
    "LearnerConfig",
    "MetaGradient",
    "MetaLearner",
    "fomaml_meta_gradient",
    "imaml_meta_gradient",
    "maml_meta_gradient",
    "reptile_meta_gradient",
]

Params = dict[str, Tensor]

IMPLICIT = ("imaml", "imaml-hf")
LINSOLVERS = {"cg": CG, "minres": MINRES}


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    """Inner-loop configuration shared by training and evaluation.

    Attributes:
        algorithm: ``imaml``, ``imaml-hf``, ``maml``, ``fomaml`` or ``reptile``.
        task: ``"classification"`` (cross-entropy, accuracy) or ``"regression"`` (MSE).
        inner_steps: GD steps (iMAML-GD), Newton iterations (iMAML-HF) or SGD steps.
        inner_lr: step size of the inner GD / SGD (unused by iMAML-HF, which line-searches).
        lam: λ of the proximal term (iMAML), or its initial value when learned.
        learn_lam: learn one λ per parameter tensor.
        lam_min: floor of a learned λ (``λ = lam_min + softplus(ρ)``).
        cg_steps: CG iterations of the backward solve (iMAML).
        cg_tol: relative tolerance of that CG (it stops earlier if reached; None: dtype default).
        hf_cg_steps: CG iterations per Newton step of iMAML-HF's inner solver.
        linsolve: ``"cg"`` (the paper) or ``"minres"`` for the backward system
            ``(H + Λ) u = v``.  CG is only valid while ``H + Λ`` is positive definite; with
            batch norm the support-loss Hessian has negative eigenvalues of a few units
            (scale invariance of the conv weights), so with λ = 2 CG often stops early
            on negative curvature (counted as ``cg_failures``).  MINRES needs only
            symmetry and, with the same budget, minimises the residual over the same
            Krylov space.
        hvp: how the backward's Hessian-vector products are computed (``bilevel``'s
            ``hvp=``): ``"reverse"`` (default here: the support-loss gradient graph is
            built once per backward and reused; cheaper per product in eager PyTorch) or
            ``"forward"`` (forward-over-reverse).  Both give the same products.
    """

    algorithm: str = "imaml"
    task: str = "classification"
    inner_steps: int = 16
    inner_lr: float = 0.1
    lam: float = 2.0
    learn_lam: bool = False
    lam_min: float = 0.1
    cg_steps: int = 5
    cg_tol: Optional[float] = None
    hf_cg_steps: int = 5
    linsolve: str = "cg"
    hvp: str = "reverse"

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
        if self.task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', got {self.task!r}")
        if self.inner_steps < 0 or (self.algorithm not in IMPLICIT and self.inner_steps < 1):
            raise ValueError(f"inner_steps must be >= 1, got {self.inner_steps}")
        if not (self.inner_lr > 0 and math.isfinite(self.inner_lr)):
            raise ValueError(f"inner_lr must be > 0, got {self.inner_lr}")
        if not (self.lam > 0 and math.isfinite(self.lam)):
            raise ValueError(f"lam must be > 0, got {self.lam}")
        if self.learn_lam and not 0 <= self.lam_min < self.lam:
            raise ValueError(f"a learned λ needs 0 <= lam_min < lam, got lam_min={self.lam_min}, lam={self.lam}")
        if self.cg_steps < 1 or self.hf_cg_steps < 1:
            raise ValueError("cg_steps and hf_cg_steps must be >= 1")
        if self.linsolve not in LINSOLVERS:
            raise ValueError(f"unknown linsolve {self.linsolve!r}; choose one of {', '.join(LINSOLVERS)}")


@dataclasses.dataclass
class MetaGradient:
    """Result of one meta-gradient computation.

    Attributes:
        loss: mean query loss over the meta-batch (0-d, detached).
        metric: mean query accuracy (classification) or MSE (regression) (0-d, detached).
        grads: gradient of ``loss`` w.r.t. each meta-parameter (Reptile: ``θ − mean φ``).
        rho_grads: gradient w.r.t. the raw λ parameters (empty unless λ is learned).
        stats: floats for the log (inner gradient norm, CG residual, λ, failures, ...).
    """

    loss: Tensor
    metric: Tensor
    grads: Params
    rho_grads: Params
    stats: dict[str, float]


def _softplus_inv(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class MetaLearner:
    """A model used functionally plus the inner procedure of one algorithm.

    Args:
        model: the network; its own parameters are never used (``functional_call`` swaps
            in θ or φ), they only give the structure.
        config: :class:`LearnerConfig`.
    """

    def __init__(self, model: nn.Module, config: LearnerConfig) -> None:
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.config = config
        self.layer: Optional[bilevel.Proximal] = None
        if config.algorithm in IMPLICIT:
            if config.algorithm == "imaml":
                solver: Any = GradientDescent(lr=config.inner_lr, steps=config.inner_steps)
            else:
                solver = NewtonCG(maxiter=config.inner_steps, cg_maxiter=config.hf_cg_steps)
            self.layer = bilevel.Proximal(
                self.support_loss,
                lam=config.lam,
                solver=solver,
                linsolve=LINSOLVERS[config.linsolve](tol=config.cg_tol, maxiter=config.cg_steps),
                on_failure="ignore",
                hvp=config.hvp,
            )

    # -- per-task losses (written for ONE task; vmapped by the callers) ----------------
    def loss_and_metric(self, params: Params, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        out = functional_call(self.model, params, (x,))
        if self.config.task == "regression":
            loss = F.mse_loss(out, y)
            return loss, loss.detach()
        loss = F.cross_entropy(out, y)
        return loss, (out.argmax(-1) == y).to(out.dtype).mean().detach()

    def support_loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return self.loss_and_metric(params, x, y)[0]

    # -- λ -------------------------------------------------------------------------------
    def init_rho(self, theta: Params) -> Params:
        """Raw λ parameters (one 0-d tensor per parameter tensor) or ``{}`` if λ is fixed."""
        if not self.config.learn_lam:
            return {}
        r = _softplus_inv(self.config.lam - self.config.lam_min)
        return {k: torch.tensor(r, dtype=v.dtype, device=v.device) for k, v in theta.items()}

    def lam_value(self, rho: Params) -> Any:
        """λ as passed to the layer: the fixed float, or ``{name: 0-d tensor}`` when learned."""
        if not rho:
            return self.config.lam
        return {k: self.config.lam_min + F.softplus(r) for k, r in rho.items()}

    def lam_stats(self, rho: Params) -> dict[str, float]:
        lam = self.lam_value(rho)
        if not isinstance(lam, dict):
            return {"lam_mean": float(lam), "lam_min": float(lam), "lam_max": float(lam)}
        vals = torch.stack([v.detach() for v in lam.values()])
        return {"lam_mean": float(vals.mean()), "lam_min": float(vals.min()), "lam_max": float(vals.max())}

    # -- adaptation ----------------------------------------------------------------------
    def sgd_adapt(self, theta: Params, xs: Tensor, ys: Tensor) -> Params:
        """``inner_steps`` SGD steps on one task's support loss (differentiable if θ is)."""
        phi = theta
        lr = self.config.inner_lr
        g_fn = grad(self.support_loss)
        for _ in range(self.config.inner_steps):
            g = g_fn(phi, xs, ys)
            phi = {k: phi[k] - lr * g[k] for k in phi}
        return phi

    def adapt(self, theta: Params, rho: Params, batch: TaskBatch) -> Params:
        """Task-specific parameters ``φ_b`` (leading dim B), without gradients (evaluation)."""
        th = {k: v.detach() for k, v in theta.items()}
        with torch.no_grad():
            if self.layer is not None:
                lam = self.lam_value({k: r.detach() for k, r in rho.items()})
                return self.layer(th, batch.support_x, batch.support_y, lam=lam, batched=True)
            return vmap(self.sgd_adapt, in_dims=(None, 0, 0))(th, batch.support_x, batch.support_y)

    def query(self, phi: Params, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """Per-task query losses and metrics ``(B,)`` at the adapted parameters."""
        return vmap(self.loss_and_metric)(phi, batch.query_x, batch.query_y)

    def evaluate(self, theta: Params, rho: Params, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """Adapt to each task of ``batch`` and return per-task query losses and metrics."""
        phi = self.adapt(theta, rho, batch)
        with torch.no_grad():
            return self.query(phi, batch)

    def support_grad_norm(self, phi: Params, batch: TaskBatch) -> Tensor:
        """Per-task norm of the support-loss gradient at ``φ_b`` (no graph)."""
        with torch.no_grad():
            g = vmap(grad(self.support_loss))({k: v.detach() for k, v in phi.items()}, batch.support_x, batch.support_y)
            return torch.sqrt(sum(t.reshape(t.shape[0], -1).square().sum(1) for t in g.values()))

    def meta_gradient(self, theta: Params, rho: Params, batch: TaskBatch) -> MetaGradient:
        return ALGORITHMS[self.config.algorithm](self, theta, rho, batch)


# --------------------------------------------------------------------------------------
# the algorithms
# --------------------------------------------------------------------------------------
def imaml_meta_gradient(learner: MetaLearner, theta: Params, rho: Params, batch: TaskBatch) -> MetaGradient:
    """iMAML (GD or Hessian-free inner solver): one batched Proximal call over the meta-batch."""
    layer = learner.layer
    assert layer is not None, "imaml_meta_gradient needs an iMAML learner"
    lam = learner.lam_value(rho)
    phi = layer(theta, batch.support_x, batch.support_y, lam=lam if rho else None, batched=True)
    # Capture the backward's right-hand sides v_b = dL/dφ_b to report relative CG residuals.
    rhs: dict[str, Tensor] = {}
    for k, v in phi.items():
        v.register_hook(lambda g, k=k: rhs.__setitem__(k, g.detach()))
    losses, metrics = learner.query(phi, batch)
    loss = losses.mean()
    keys, rkeys = list(theta), list(rho)
    gs = torch.autograd.grad(loss, [theta[k] for k in keys] + [rho[k] for k in rkeys], allow_unused=True)
    grads = {k: torch.zeros_like(theta[k]) if g is None else g for k, g in zip(keys, gs[: len(keys)])}
    rho_grads = {k: torch.zeros_like(rho[k]) if g is None else g for k, g in zip(rkeys, gs[len(keys) :])}

    stats: dict[str, float] = {}
    fwd, bwd = layer.diagnostics.forward, layer.diagnostics.backward
    if fwd is not None:
        if fwd.grad_norm is not None:
            stats["inner_grad_norm"] = float(fwd.grad_norm.mean())
        stats["inner_failures"] = float(sum(not s.ok for s in fwd.task_status)) if fwd.task_status else 0.0
    if bwd is not None:
        rn = bwd.residual_norm.reshape(-1)
        if rhs:
            vn = torch.sqrt(sum(t.reshape(t.shape[0], -1).square().sum(1) for t in rhs.values()))
            stats["cg_residual"] = float((rn / vn.clamp_min(torch.finfo(vn.dtype).tiny)).mean())
        stats["cg_iterations"] = float(bwd.iterations)
        statuses = bwd.task_status or (bwd.status,)
        stats["cg_failures"] = float(sum(s.name in ("NEGATIVE_CURVATURE", "NONFINITE", "BREAKDOWN") for s in statuses))
    stats.update(learner.lam_stats(rho))
    return MetaGradient(loss.detach(), metrics.mean(), grads, rho_grads, stats)


def maml_meta_gradient(learner: MetaLearner, theta: Params, rho: Params, batch: TaskBatch) -> MetaGradient:
    """Second-order MAML: reverse mode through the unrolled, vmapped inner SGD."""

    def task(th: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Tensor, Tensor, Params]:
        phi = learner.sgd_adapt(th, xs, ys)
        loss, metric = learner.loss_and_metric(phi, xq, yq)
        return loss, metric, {k: v.detach() for k, v in phi.items()}

    losses, metrics, phi = vmap(task, in_dims=(None, 0, 0, 0, 0))(
        theta, batch.support_x, batch.support_y, batch.query_x, batch.query_y
    )
    loss = losses.mean()
    keys = list(theta)
    gs = torch.autograd.grad(loss, [theta[k] for k in keys])
    stats = {"inner_grad_norm": float(learner.support_grad_norm(phi, batch).mean())}
    return MetaGradient(loss.detach(), metrics.mean(), dict(zip(keys, gs)), {}, stats)


def fomaml_meta_gradient(learner: MetaLearner, theta: Params, rho: Params, batch: TaskBatch) -> MetaGradient:
    """First-order MAML: the mean over tasks of the query gradient at the adapted φ_b."""
    phi = learner.adapt(theta, rho, batch)

    def qgrad(p: Params, xq: Tensor, yq: Tensor) -> tuple[Params, tuple[Tensor, Tensor]]:
        loss, metric = learner.loss_and_metric(p, xq, yq)
        return loss, (loss.detach(), metric)

    g, (losses, metrics) = vmap(grad(qgrad, has_aux=True))(phi, batch.query_x, batch.query_y)
    grads = {k: g[k].mean(0) for k in theta}
    stats = {"inner_grad_norm": float(learner.support_grad_norm(phi, batch).mean())}
    return MetaGradient(losses.mean(), metrics.mean(), grads, {}, stats)


def reptile_meta_gradient(learner: MetaLearner, theta: Params, rho: Params, batch: TaskBatch) -> MetaGradient:
    """Reptile: the direction ``θ − mean_b φ_b`` after the inner SGD steps (followed by Adam)."""
    phi = learner.adapt(theta, rho, batch)
    with torch.no_grad():
        losses, metrics = learner.query(phi, batch)
        grads = {k: theta[k].detach() - phi[k].mean(0) for k in theta}
    stats = {"inner_grad_norm": float(learner.support_grad_norm(phi, batch).mean())}
    return MetaGradient(losses.mean(), metrics.mean(), grads, {}, stats)


ALGORITHMS: dict[str, Callable[[MetaLearner, Params, Params, TaskBatch], MetaGradient]] = {
    "imaml": imaml_meta_gradient,
    "imaml-hf": imaml_meta_gradient,
    "maml": maml_meta_gradient,
    "fomaml": fomaml_meta_gradient,
    "reptile": reptile_meta_gradient,
}
