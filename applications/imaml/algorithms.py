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

The computations of MAML, first-order MAML and iMAML are those of
:mod:`applications.meta_gradients` (shared with the experiments); the functions here give
them the learner's losses, the meta-batch and the clock, and add the log's statistics.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import bilevel
from bilevel.linsolve import CG, MINRES
from bilevel.solvers import Adam, GradientDescent, NewtonCG
from bilevel.tree import tree_norm

from .. import meta_gradients
from ..meta_gradients import no_clock
from .tasks import TaskBatch

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "LearnerConfig",
    "MetaGradient",
    "MetaLearner",
    "fomaml_meta_gradient",
    "imaml_meta_gradient",
    "maml_meta_gradient",
    "reptile_meta_gradient",
]

Params = dict[str, Tensor]

RECIPES = ("proximal", "imaml-dev")
LINSOLVERS = {"cg": CG, "minres": MINRES}
#: iMAML-GD's inner first-order methods (``--inner-optimizer``).
INNER_OPTIMIZERS = ("gd", "momentum", "nesterov", "adam")
#: ``--compile`` values: off, or a ``torch.compile`` mode for the inner loop's step.
COMPILE_MODES = ("off", "default", "reduce-overhead")


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
            batch norm the support-loss Hessian has negative eigenvalues (scale invariance
            of the conv weights; docs/applications/imaml.md, "Negative curvature"), so CG may stop early on
            negative curvature (counted as ``cg_failures``).  MINRES needs only
            symmetry and, with the same budget, minimises the residual over the same
            Krylov space.
        recipe: ``"proximal"`` (default: the paper's algorithm as stated — GD on the proximal
            objective, exact implicit gradient) or ``"imaml-dev"`` (the official code,
            aravindr93/imaml_dev: ``inner_steps`` plain SGD steps on the support loss, then
            one pull-back step ``φ ← φ − inner_lr·λ(φ − θ)``; the backward solves the damped
            system ``((1 + c) I + H/(λ + δ)) g = v`` with ``c = cg_damping``, ``δ =
            lam_damping``; evaluation adapts with plain SGD, no proximal term).  The second
            is not the gradient of any well-defined function of θ: it is the exact
            gradient only as δ, c → 0 *and* the inner loop converges to the proximal point.
        cg_damping: ``c`` of the imaml-dev recipe (default 1).
        lam_damping: ``δ`` of the imaml-dev recipe (default 10).
        power_iters: with ``> 0``, after each inner solve, an estimate of the largest
            eigenvalue of the support-loss Hessian at φ, ``H_max``, gives
            ``inner_lr·(H_max + λ)`` (reported as ``inner_lr_curvature``; above 2 the
            fixed-step inner GD is unstable).  The estimate is Lanczos
            (:func:`bilevel.hessian_extremes`) with that many steps — a lower bound of
            ``H_max`` that tightens with the steps (the option kept its name from the power
            iteration it replaced).  Costs ``power_iters`` Hessian-vector products per task.
        batching: how iMAML runs the meta-batch (``bilevel``'s ``batched=``): ``"auto"``
            (the layer times ``"vmap"`` and ``"loop"`` on its first call of each shape and
            keeps the faster), ``"vmap"`` (one vmapped computation) or ``"loop"`` (one task at
            a time: less memory; which is faster depends on the net and the device:
            ``benchmarks/batching.py``).
        hvp: how the backward's Hessian-vector products are computed (``bilevel``'s
            ``hvp=``): ``"reverse"`` (default here: the support-loss gradient graph is
            built once per backward and reused; cheaper per product in eager PyTorch) or
            ``"forward"`` (forward-over-reverse).  Both give the same products.
        inner_optimizer: iMAML-GD's inner method: ``"gd"`` (plain gradient descent, the
            paper's), ``"momentum"`` (heavy ball) or ``"nesterov"`` with coefficient
            ``inner_momentum``, or ``"adam"`` (step ``inner_lr``).
        inner_momentum: the momentum coefficient of ``"momentum"`` / ``"nesterov"``.
        compile: ``"off"``, or a ``torch.compile`` mode (``"default"``, ``"reduce-overhead"``)
            for each step of iMAML-GD's inner loop, health statistics included
            (``bilevel.solvers.GradientDescent(compile=...)``).  The first meta-step of
            each batch shape compiles.
        query_batching: how every algorithm runs its query pass over the tasks: ``"vmap"``,
            ``"loop"`` or ``"auto"`` (measured once per shape, :meth:`MetaLearner.query_strategy`).
    """

    algorithm: str = "imaml"
    task: str = "classification"
    inner_steps: int = 16
    inner_lr: float = 0.1
    lam: float = 2.0
    learn_lam: bool = False
    lam_min: float = 0.1
    cg_steps: int = 5
    cg_tol: float | None = None
    hf_cg_steps: int = 5
    linsolve: str = "cg"
    hvp: str = "reverse"
    recipe: str = "proximal"
    cg_damping: float = 1.0
    lam_damping: float = 10.0
    power_iters: int = 0
    batching: str = "auto"
    inner_optimizer: str = "gd"
    inner_momentum: float = 0.9
    compile: str = "off"
    query_batching: str = "auto"

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
        if self.task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', got {self.task!r}")
        if self.inner_steps < 0 or (not ALGORITHMS[self.algorithm].implicit and self.inner_steps < 1):
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
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        if self.recipe == "imaml-dev":
            if self.algorithm != "imaml":
                raise ValueError(f"--recipe imaml-dev applies to --algorithm imaml only, not {self.algorithm!r}")
            if self.learn_lam:
                raise ValueError("--recipe imaml-dev has a fixed λ (its backward damps λ + δ): drop --learn-lam")
        for name in ("cg_damping", "lam_damping"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {v}")
        if self.batching not in ("auto", "vmap", "loop"):
            raise ValueError(f"batching must be auto, vmap or loop, got {self.batching!r}")
        if self.power_iters < 0:
            raise ValueError(f"power_iters must be >= 0, got {self.power_iters}")
        if self.inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"unknown inner optimizer {self.inner_optimizer!r}; choose one of {', '.join(INNER_OPTIMIZERS)}")
        if not 0 <= self.inner_momentum < 1:
            raise ValueError(f"inner_momentum must be in [0, 1), got {self.inner_momentum}")
        if self.inner_optimizer != "gd" and (self.algorithm != "imaml" or self.recipe != "proximal"):
            raise ValueError(f"--inner-optimizer {self.inner_optimizer} applies to --algorithm imaml with the proximal recipe")
        if self.query_batching not in ("auto", "vmap", "loop"):
            raise ValueError(f"query_batching must be auto, vmap or loop, got {self.query_batching!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")


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
        # The algorithm builds its own inner procedure (None: the baselines' unrolled SGD).
        self.layer: bilevel.Proximal | None = ALGORITHMS[config.algorithm].build_layer(self)
        #: ``clock(phase)``: a context manager around each phase of a meta-step; the profiler
        #: (:mod:`.phases`) swaps in one that times them, training leaves this no-op.
        self.clock: Callable[[str], ContextManager[None]] = no_clock
        #: ``{(query shape, grad mode): {"choice": "vmap" | "loop", "vmap_s": ..., "loop_s": ...}}``:
        #: the query strategies ``config.query_batching="auto"`` measured (:meth:`query_strategy`).
        self.query_choices: dict[tuple, dict[str, Any]] = {}

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
        return meta_gradients.gd_steps(self.support_loss, theta, xs, ys, lr=self.config.inner_lr,
                                       steps=self.config.inner_steps)

    def adapt(self, theta: Params, rho: Params, batch: TaskBatch) -> Params:
        """Task-specific parameters ``φ_b`` (leading dim B), without gradients (evaluation)."""
        th = {k: v.detach() for k, v in theta.items()}
        with torch.no_grad():
            if self.layer is not None and self.config.recipe != "imaml-dev":
                lam = self.lam_value({k: r.detach() for k, r in rho.items()})
                return self.layer(th, batch.support_x, batch.support_y, lam=lam, batched=self.config.batching)
            return vmap(self.sgd_adapt, in_dims=(None, 0, 0))(th, batch.support_x, batch.support_y)

    def query_objective(self, batch: TaskBatch) -> Callable[[Params], tuple[Tensor, Tensor]]:
        """``outer(φ) -> (mean query loss, per-task metrics)`` of :mod:`applications.meta_gradients`
        (``has_aux=True``): the query pass of :meth:`query`, looked up at call time."""

        def outer(phi: Params) -> tuple[Tensor, Tensor]:
            losses, metrics = self.query(phi, batch)
            return losses.mean(), metrics

        return outer

    def query(self, phi: Params, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """Per-task query losses and metrics ``(B,)`` at the adapted parameters (with a graph
        to ``phi`` when grad mode is on), by the query strategy (:meth:`query_strategy`)."""
        if self.query_strategy(phi, batch) == "loop":
            return self._query_loop(phi, batch)
        return vmap(self.loss_and_metric)(phi, batch.query_x, batch.query_y)

    def _query_loop(self, phi: Params, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        out = [self.loss_and_metric({k: v[b] for k, v in phi.items()}, batch.query_x[b], batch.query_y[b])
               for b in range(batch.query_x.shape[0])]
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])

    def query_strategy(self, phi: Params, batch: TaskBatch) -> str:
        """How the query pass runs the tasks: ``config.query_batching`` if it names one, else
        (``"auto"``) measured once per query shape and grad mode.

        The query pass is the part of a meta-step every algorithm shares (75 query images per
        task at 5-way, against 5 support images), and which way of batching it is faster
        depends on the net and the device (docs/applications/imaml.md: "Where a meta-step's time goes"): one
        vmapped computation runs grouped convolutions, a loop plain ones.  So ``"auto"`` times
        both (forward and, with grad mode on, backward, on the actual batch) the first time it
        meets a shape, and keeps the faster (by :func:`bilevel.time_alternatives`, the rule
        of ``batched="auto"``); :attr:`query_choices` records the choice and the times.  The
        two agree to rounding.
        """
        mode = self.config.query_batching
        if mode != "auto":
            return mode
        key = (tuple(batch.query_x.shape), torch.is_grad_enabled())
        if key not in self.query_choices:
            self.query_choices[key] = self._measure_query(phi, batch)
        return str(self.query_choices[key]["choice"])

    def _measure_query(self, phi: Params, batch: TaskBatch) -> dict[str, Any]:
        grad_mode = torch.is_grad_enabled()
        p = {k: v.detach().requires_grad_(grad_mode) for k, v in phi.items()}

        def timed(fn: Callable[[], tuple[Tensor, Tensor]]) -> Callable[[], None]:
            def run() -> None:
                loss = fn()[0].sum()
                if grad_mode:
                    torch.autograd.grad(loss, list(p.values()), allow_unused=True)
            return run

        # The library's rule for batched="auto" (a warm-up each, a second round only when close).
        best = bilevel.time_alternatives(
            {"vmap": timed(lambda: vmap(self.loss_and_metric)(p, batch.query_x, batch.query_y)),
             "loop": timed(lambda: self._query_loop(p, batch))}, batch.query_x.device)
        return {"choice": min(best, key=best.__getitem__), **{f"{k}_s": v for k, v in best.items()}}

    def evaluate(self, theta: Params, rho: Params, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """Adapt to each task of ``batch`` and return per-task query losses and metrics."""
        phi = self.adapt(theta, rho, batch)
        with torch.no_grad():
            return self.query(phi, batch)

    def support_grad_norm(self, phi: Params, batch: TaskBatch) -> Tensor:
        """Per-task norm of the support-loss gradient at ``φ_b`` (no graph)."""
        with torch.no_grad():
            g = vmap(grad(self.support_loss))({k: v.detach() for k, v in phi.items()}, batch.support_x, batch.support_y)
            return tree_norm(g, batched=True)

    def hessian_max(self, phi: Params, batch: TaskBatch, iters: int) -> Tensor:
        """Per-task estimate of the largest eigenvalue of the support-loss Hessian at ``φ_b``:
        the largest Ritz value of ``iters`` Lanczos steps (:func:`bilevel.hessian_extremes`),
        a lower bound of the true one."""
        return bilevel.hessian_extremes(vmap(self.support_loss), phi, batch.support_x, batch.support_y, batched=True,
                                        steps=max(1, iters))[1]

    def meta_gradient(self, theta: Params, rho: Params, batch: TaskBatch) -> MetaGradient:
        return ALGORITHMS[self.config.algorithm].meta_gradient(self, theta, rho, batch)


# --------------------------------------------------------------------------------------
# the algorithms
# --------------------------------------------------------------------------------------
def imaml_meta_gradient(learner: MetaLearner, theta: Params, rho: Params, batch: TaskBatch) -> MetaGradient:
    """iMAML (GD or Hessian-free inner solver): one batched Proximal call over the meta-batch
    (:func:`applications.meta_gradients.imaml_meta_gradient`), with a learned λ's gradient."""
    layer = learner.layer
    assert layer is not None, "imaml_meta_gradient needs an iMAML learner"
    step = meta_gradients.imaml_meta_gradient(
        layer, learner.query_objective(batch), theta, (batch.support_x, batch.support_y),
        lam=learner.lam_value(rho) if rho else None, extra=rho, batched=learner.config.batching, has_aux=True,
        clock=learner.clock,
    )
    with learner.clock("health statistics"):
        stats = _imaml_stats(learner, layer, step, batch, rho)
    return MetaGradient(step.objective, step.aux.mean(), step.grads, step.extra_grads, stats)


def _imaml_stats(learner: MetaLearner, layer: bilevel.Proximal, step: meta_gradients.MetaStep, batch: TaskBatch,
                 rho: Params) -> dict[str, float]:
    """The log's statistics of one iMAML meta-step, from the layer's diagnostics (host reads
    happen here, once per meta-step, after the solves)."""
    stats: dict[str, float] = {}
    fwd, bwd = layer.diagnostics.forward, layer.diagnostics.backward
    if fwd is not None:
        if fwd.grad_norm is not None:
            stats["inner_grad_norm"] = float(fwd.grad_norm.mean())
        stats.update(inner_health(fwd))
        stats["inner_failures"] = float(sum(not s.ok for s in fwd.task_status)) if fwd.task_status else 0.0
    if bwd is not None:
        rn = bwd.residual_norm.reshape(-1)
        vn = tree_norm(step.rhs, batched=True)
        stats["cg_residual"] = float((rn / vn.clamp_min(torch.finfo(vn.dtype).tiny)).mean())
        stats["cg_iterations"] = float(bwd.iterations)
        statuses = bwd.task_status or (bwd.status,)
        stats["cg_failures"] = float(sum(s.early_stop for s in statuses))
    stats.update(learner.lam_stats(rho))
    cfg = learner.config
    if cfg.power_iters > 0 and cfg.algorithm == "imaml":
        hmax = learner.hessian_max(step.phi, batch, cfg.power_iters)
        # The GD step that runs in the inner loop: on L + ½λ‖φ−θ‖² (proximal) or on L alone
        # (imaml-dev, whose λ acts only in the pull-back step).
        shift = stats.get("lam_max", cfg.lam) if cfg.recipe == "proximal" else 0.0
        stats["inner_lr_curvature"] = float((cfg.inner_lr * (hmax + shift)).max())
    return stats


def inner_health(res: Any) -> dict[str, float]:
    """Inner-loop health of a first-order inner solve (``bilevel.SolverResult``): the mean
    over tasks of ``‖∇f(φ)‖ / ‖∇f(θ)‖``, the fraction of tasks whose gradient norm fell
    monotonically, and the fraction whose objective fell at every step.  By the descent
    lemma a GD step below ``2 / (H_max + λ)`` never raises the objective, so an objective
    that rises on most tasks means the fixed step is too large: the inner problem is not
    solved, and the implicit gradient (which assumes ``∇f(φ) = 0``) describes a point the
    solver never reached.  (The gradient norm may rise even with a stable step, through
    negative curvature, so it is reported but not used to judge.)"""
    out: dict[str, float] = {}
    g0, mono = getattr(res, "grad_norm_initial", None), getattr(res, "grad_norm_monotone", None)
    descent = getattr(res, "value_monotone", None)
    if g0 is not None and res.grad_norm is not None:
        out["inner_grad_ratio"] = float((res.grad_norm / g0.clamp_min(torch.finfo(g0.dtype).tiny)).mean())
    if mono is not None:
        out["inner_monotone"] = float(mono.to(torch.float64).mean())
    if descent is not None:
        out["inner_descent"] = float(descent.to(torch.float64).mean())
    return out


class PullbackSGD:
    """The official iMAML code's inner procedure (aravindr93/imaml_dev, Omniglot): ``steps``
    plain SGD steps on the *unregularised* support loss from θ, then one step on the
    proximal term alone, ``φ ← φ − lr·λ(φ − θ)``.

    It is a black-box solver for :class:`bilevel.Proximal`: it is called with the proximal
    objective and ``(θ, λ', x_s, y_s)`` but ignores that objective and λ' (the backward's
    damped λ) and uses the learner's support loss and its own λ, as the official code does.
    Its result reports the health statistics of the SGD part (gradient norms of the support
    loss).
    """

    def __init__(self, learner: MetaLearner, lr: float, steps: int, lam: float) -> None:
        self.learner, self.lr, self.steps, self.lam = learner, lr, steps, lam

    def __call__(self, objective: Any, x0: Params, theta: Params, lam: Any, xs: Tensor, ys: Tensor,
                 batched: bool = False) -> Any:
        from bilevel import SolverResult, Status

        g_fn = torch.func.grad_and_value(self.learner.support_loss)
        if batched:
            g_fn = vmap(g_fn, in_dims=(0, 0, 0))

        phi = {k: v.detach() for k, v in x0.items()}
        g, f = g_fn(phi, xs, ys)
        g0 = prev = tree_norm(g, batched)
        mono = torch.ones_like(g0, dtype=torch.bool)
        descent = torch.ones_like(mono)
        f = f.reshape(mono.shape)
        for _ in range(self.steps):
            phi = {k: phi[k] - self.lr * g[k] for k in phi}
            g, f_new = g_fn(phi, xs, ys)
            f_new = f_new.reshape(mono.shape)
            gn = tree_norm(g, batched)
            mono, prev = mono & (gn <= prev), gn
            descent, f = descent & (f_new <= f + 1e-6 * f.abs()), f_new
        th = {k: (v.unsqueeze(0) if batched else v) for k, v in theta.items()}
        phi = {k: phi[k] - self.lr * self.lam * (phi[k] - th[k]) for k in phi}
        shape = (lambda t: t) if batched else (lambda t: t.reshape(()))
        n = int(g0.shape[0]) if batched else 1
        return SolverResult(
            x=phi, status=Status.COMPLETED, iterations=self.steps, grad_norm=shape(prev), n_grad=self.steps + 1,
            task_status=(Status.COMPLETED,) * n if batched else None, grad_norm_initial=shape(g0),
            grad_norm_monotone=shape(mono), value_monotone=shape(descent),
        )


def maml_meta_gradient(learner: MetaLearner, theta: Params, rho: Params, batch: TaskBatch) -> MetaGradient:
    """Second-order MAML: reverse mode through the unrolled, vmapped inner SGD
    (:func:`applications.meta_gradients.maml_meta_gradient`)."""
    return _sgd_meta_gradient(meta_gradients.maml_meta_gradient, learner, theta, batch)


def fomaml_meta_gradient(learner: MetaLearner, theta: Params, rho: Params, batch: TaskBatch) -> MetaGradient:
    """First-order MAML: the mean over tasks of the query gradient at the adapted φ_b
    (:func:`applications.meta_gradients.fomaml_meta_gradient`)."""
    return _sgd_meta_gradient(meta_gradients.fomaml_meta_gradient, learner, theta, batch)


def _sgd_meta_gradient(method: Callable[..., meta_gradients.MetaStep], learner: MetaLearner, theta: Params,
                       batch: TaskBatch) -> MetaGradient:
    cfg = learner.config
    step = method(learner.support_loss, learner.query_objective(batch), theta, (batch.support_x, batch.support_y),
                  lr=cfg.inner_lr, steps=cfg.inner_steps, has_aux=True, clock=learner.clock)
    with learner.clock("health statistics"):
        stats = {"inner_grad_norm": float(learner.support_grad_norm(step.phi, batch).mean())}
    return MetaGradient(step.objective, step.aux.mean(), step.grads, {}, stats)


def reptile_meta_gradient(learner: MetaLearner, theta: Params, rho: Params, batch: TaskBatch) -> MetaGradient:
    """Reptile: the direction ``θ − mean_b φ_b`` after the inner SGD steps (followed by Adam)."""
    phi = learner.adapt(theta, rho, batch)
    with torch.no_grad():
        losses, metrics = learner.query(phi, batch)
        grads = {k: theta[k].detach() - phi[k].mean(0) for k in theta}
    stats = {"inner_grad_norm": float(learner.support_grad_norm(phi, batch).mean())}
    return MetaGradient(losses.mean(), metrics.mean(), grads, {}, stats)


# --------------------------------------------------------------------------------------
# the registry: adding an algorithm touches only this file
# --------------------------------------------------------------------------------------
def _backward_linsolve(cfg: LearnerConfig) -> Any:
    # No tolerance: the paper's fixed budget of Krylov steps, which the library runs
    # without a host sync per step (``steps``); with --cg-tol, a tolerance and a cap.
    if cfg.cg_tol is None:
        return LINSOLVERS[cfg.linsolve](steps=cfg.cg_steps)
    return LINSOLVERS[cfg.linsolve](rtol=cfg.cg_tol, maxiter=cfg.cg_steps)


def _imaml_gd_layer(learner: MetaLearner) -> bilevel.Proximal:
    cfg = learner.config
    if cfg.recipe == "imaml-dev":
        solver: Any = PullbackSGD(learner, cfg.inner_lr, cfg.inner_steps, cfg.lam)
        # ((1+c)I + H/(λ+δ))^{-1} v  =  λ'(H + λ'I + cλ'I)^{-1} v  with λ' = λ + δ:
        # Proximal's backward with lam = λ' and damping = c·λ'.
        lam = cfg.lam + cfg.lam_damping
        damping = cfg.cg_damping * lam
    else:
        solver, lam, damping = inner_solver(cfg), cfg.lam, 0.0
    return bilevel.Proximal(learner.support_loss, lam=lam, solver=solver, linsolve=_backward_linsolve(cfg),
                            damping=damping, on_failure="ignore", hvp=cfg.hvp)


def inner_solver(cfg: LearnerConfig) -> Any:
    """iMAML-GD's inner solver for ``cfg``: ``inner_steps`` steps of the chosen first-order
    method, monitored (the health columns: one norm per step and one extra gradient, all on
    the device, no host sync inside the loop), compiled if ``cfg.compile`` says so."""
    compile: Any = False if cfg.compile == "off" else (True if cfg.compile == "default" else cfg.compile)
    common = dict(lr=cfg.inner_lr, steps=cfg.inner_steps, monitor=True, compile=compile)
    if cfg.inner_optimizer == "adam":
        return Adam(**common)  # type: ignore[arg-type]
    if cfg.inner_optimizer in ("momentum", "nesterov"):
        return GradientDescent(momentum=cfg.inner_momentum, nesterov=cfg.inner_optimizer == "nesterov", **common)  # type: ignore[arg-type]
    return GradientDescent(**common)  # type: ignore[arg-type]


def _imaml_hf_layer(learner: MetaLearner) -> bilevel.Proximal:
    cfg = learner.config
    return bilevel.Proximal(learner.support_loss, lam=cfg.lam,
                            solver=NewtonCG(maxiter=cfg.inner_steps, linsolve=CG(maxiter=cfg.hf_cg_steps)),
                            linsolve=_backward_linsolve(cfg), on_failure="ignore", hvp=cfg.hvp)


def _no_layer(learner: MetaLearner) -> None:
    return None


class InnerDefaults(NamedTuple):
    """One algorithm's default inner budget on one dataset.

    ``steps`` × ``lr`` up to 5 ways, ``steps20`` × ``lr20`` (default: ``lr``) above;
    ``cg_steps``: the Krylov steps of an implicit algorithm's backward (the paper's recipe).
    ``steps`` are GD/SGD steps, or Newton iterations for iMAML-HF.
    """

    steps: int
    steps20: int
    lr: float
    lr20: float | None = None
    cg_steps: int = 5

    def for_ways(self, ways: int) -> tuple[int, float]:
        """``(inner steps, inner lr)`` for ``ways``-way tasks."""
        return (self.steps, self.lr) if ways <= 5 else (self.steps20, self.lr if self.lr20 is None else self.lr20)


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One meta-learning algorithm of the harness.

    Attributes:
        name: the ``--algorithm`` value.
        meta_gradient: ``(learner, theta, rho, batch) -> MetaGradient``.
        build_layer: builds the learner's implicit layer (its inner procedure), or returns
            ``None`` for the algorithms that adapt by unrolled SGD (:meth:`MetaLearner.sgd_adapt`).
        inner_defaults: ``{dataset: InnerDefaults}``.
    """

    name: str
    meta_gradient: Callable[[MetaLearner, Params, Params, TaskBatch], MetaGradient]
    build_layer: Callable[[MetaLearner], bilevel.Proximal | None]
    inner_defaults: dict[str, InnerDefaults]

    @property
    def implicit(self) -> bool:
        return self.build_layer is not _no_layer

    def inner(self, dataset: str, ways: int) -> tuple[int, float]:
        """Default (inner steps, inner lr) for a dataset and number of ways."""
        return self.inner_defaults[dataset].for_ways(ways)


D = InnerDefaults
_SGD_BASELINE = {"sinusoid": D(1, 1, 0.01), "omniglot": D(1, 5, 0.4), "miniimagenet": D(5, 5, 0.01)}
_ALL = (
    # Omniglot: 3 GD steps of 0.4 at 5-way, 5 of 0.3 at 20-way, 2 MINRES steps, measured
    # against 16 steps of 0.1 with 5 MINRES steps and other budgets (docs/applications/imaml.md, "A cheaper inner
    # solve" and "Time to accuracy").
    Algorithm("imaml", imaml_meta_gradient, _imaml_gd_layer,
              {"sinusoid": D(16, 16, 0.01), "omniglot": D(3, 5, 0.4, 0.3, cg_steps=2), "miniimagenet": D(16, 16, 0.01)}),
    Algorithm("imaml-hf", imaml_meta_gradient, _imaml_hf_layer,
              {"sinusoid": D(5, 5, 0.01), "omniglot": D(5, 5, 0.1), "miniimagenet": D(5, 5, 0.01)}),
    Algorithm("maml", maml_meta_gradient, _no_layer, _SGD_BASELINE),
    Algorithm("fomaml", fomaml_meta_gradient, _no_layer, _SGD_BASELINE),
    Algorithm("reptile", reptile_meta_gradient, _no_layer,
              {"sinusoid": D(10, 10, 0.01), "omniglot": D(10, 10, 0.1), "miniimagenet": D(10, 10, 0.01)}),
)
del D
#: name -> :class:`Algorithm`, in the order the CLI lists them.
ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in _ALL}
