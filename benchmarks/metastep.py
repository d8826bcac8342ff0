"""Seconds and peak memory per implicit-MAML meta-step: ``bilevel`` against a hand-written
PyTorch loop, TorchOpt, and (first-order) MAML.

    python -m benchmarks.metastep [--nets paper,app] [--settings 5w1s,20w5s] [--rounds 5]
                                  [--meta-batch 4] [--threads 1] [--out benchmarks/results]
    python -m benchmarks.metastep --quick      # tiny nets (8 filters), 5w1s, B=2: the smoke test
    python benchmarks/metastep.py ...          # the same, run as a file

One *meta-step* is one meta-gradient ∂/∂θ Σ_b L_query,b(φ*_b(θ)) for a meta-batch of
B = 4 tasks: the inner solves plus the meta-gradient (no outer optimiser step).  The inner
problem is the paper's (Rajeswaran et al. 2019, Omniglot)::

    φ*_b(θ) = argmin_φ  CE(net_φ(x_support,b), y_support,b) + λ/2 ‖φ − θ‖²,   λ = 2,

K = 16 gradient-descent steps of 0.1 on that proximal objective started at θ, then 5 CG
iterations on ``(H + λI) w = v`` (a fixed budget: CG stops earlier only on non-positive curvature) (H the support-loss Hessian at φ*, v the query gradient),
meta-gradient ``λ w`` (= the paper's ``(I + H/λ)^{-1} v``).  Data are random
Omniglot-shaped episodes (1×28×28 images in [0, 1), balanced labels, fixed seed), so no
data set is needed.

Methods (``--methods``, all by default):

* ``bilevel``       — :class:`bilevel.Proximal` built by :func:`make_layer` (``GradientDescent(lr,
  steps=16)``, ``CG(steps=5)``: exactly 5 iterations unless the curvature turns non-positive),
  called once for the whole meta-batch with ``batched=True`` (``"auto"``: the faster of vmap
  and the per-task loop, measured by the layer on its first call; the info line says which).
* ``bilevel-vmap``  — the same layer with ``batched="vmap"`` (one vmapped computation).
* ``bilevel-outer-per-task`` — the ``bilevel`` call (``batched=True``), but the query loss of
  one task at a time: each task's query gradient ``v_b`` is taken with its graph freed before
  the next, then one backward through the layer with the cotangents ``v``.  The same
  meta-gradient, with the query activations of one task alive at a time (as the
  hand-written loop) instead of all ``B``: the pattern for when memory binds.
* ``bilevel-loop``  — the same layer with ``batched="loop"`` (one task at a time inside).
* ``hand-written``  — plain PyTorch, a Python loop over tasks: 16 steps with
  ``torch.autograd.grad``, the query gradient v, one ``create_graph=True`` gradient graph
  at φ* and 5 CG iterations whose Hessian-vector products are double-backward passes
  through it (CG stops early only on non-positive curvature, as ``bilevel``'s CG does).
* ``torchopt-cg``   — TorchOpt's ``torchopt.diff.implicit.custom_root`` around the same
  16-step solver (per task), optimality ``∇_φ`` of the proximal objective, backward with
  ``torchopt.linear_solve.solve_cg(maxiter=5)``.
* ``torchopt-doc``  — TorchOpt's documented iMAML set-up (its ``examples/iMAML``): an
  ``ImplicitMetaGradientModule`` per task, ``torchopt.SGD`` inner loop, backward with
  ``solve_normal_cg(maxiter=5, atol=0)`` — CG on the *normal equations*, so its
  meta-gradient differs from the others' (its relative difference is printed, not asserted).
  Both TorchOpt methods are skipped, with a message, when ``import torchopt`` fails.
* ``fomaml``        — first-order MAML: 16 steps on the support loss, meta-gradient = the
  query gradient at the adapted parameters (per task).
* ``maml``          — MAML: the 16 steps unrolled with ``create_graph=True`` (per task).
* ``bilevel-compiled`` — ``bilevel`` with ``GradientDescent(compile=True)`` (only when
  named in ``--methods``: it first compiles, in the warm-up rounds, which takes a while;
  ``benchmarks/README.md``).
* ``bilevel-fullgraph`` — the whole meta-loss (the batched layer and the vmapped query
  losses) under ``torch.compile(fullgraph=True)``, the traced layer of fixed budgets, then
  ``torch.autograd.grad`` (only when named: it compiles in the warm-up rounds).

Nets (``--nets``):

* ``paper`` — 4 blocks of conv3×3 (64 filters, padding 1), ``nn.BatchNorm2d`` on batch
  statistics (``track_running_stats=False``, i.e. ``F.batch_norm(training=True)`` with no
  running statistics), ReLU, 2×2 max-pooling, then a linear layer to ``ways`` logits;
  PyTorch's default initialisation.
* ``app``   — the few-shot application's model,
  ``applications.imaml.models.build_model("omniglot", ways, filters=64, image_shape=(1, 28, 28))``
  (stride-2 convolutions, the elementary-op batch norm, spatial mean).

Settings (``--settings``): ``5w1s`` = 5-way 1-shot with 15 query images per class;
``20w5s`` = 20-way 5-shot with **5** (not 15) query images per class, to keep MAML's
unrolled graph and the vmapped batch within a laptop's memory.

Measurements.  *Time*: every method runs in this one process; after ``--warmup`` untimed
rounds, each of ``--rounds`` rounds times one meta-step of every method in turn (methods
interleaved step by step, so machine-load drift hits all of them), with the garbage
collector off while timing; the table gives the median, max/min over rounds (flagged ``!``
above 1.5) and the ratios to ``hand-written`` and to ``fomaml``.  *Memory*: a fresh
subprocess per (net, setting, method) builds the problem and the method, then runs one
warm-up meta-step and ``--mem-steps`` more.  Two numbers (Linux ``/proc/self/status``):
``1st step`` = peak RSS during the first meta-step over the resident size just before it
(includes one-off costs: the first ``torch.func`` transform of a process imports a large
part of torch, which ``bilevel`` and TorchOpt pay and the plain-autograd methods do not;
its size: ``benchmarks/README.md``); ``steady`` = peak RSS
during the later steps over the resident size just before them (the peak is reset with
``/proc/self/clear_refs``).  The children run with glibc's ``MALLOC_MMAP_THRESHOLD_=65536``,
so freed tensors go back to the OS and "resident before the step" is the live state, not
allocator cache.  Without ``/proc`` (not Linux) only ``1st step`` is given, from
``resource.getrusage(...).ru_maxrss``.  *Agreement*: in the first (untimed) round the
meta-gradients of the iMAML methods are compared with ``hand-written``'s (relative
difference ‖g − g_hw‖ / ‖g_hw‖; ``bilevel``'s should be below 1e-3 in float32, and a line
starting with ``!`` says when it is not).  Where CG meets non-positive curvature (λ = 2 is
below the most negative Hessian eigenvalue on small nets) ``bilevel`` and ``hand-written``
stop there and TorchOpt's CG does not, so TorchOpt then differs.  The inner GD of these
batch-norm ReLU nets can also amplify float32 rounding: the vmapped and per-task kernels
round differently, and one task's trajectory may part from the other's at an iterate where
the float32 gradient is ill-conditioned; ``--dtype float64`` tells that apart from a real
mismatch (an example: ``benchmarks/README.md``).

Writes ``metastep.csv`` and ``metastep.png`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (or loaded by path): make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import bilevel
from bilevel.tree import tree_relative_error

LAM = 2.0  # the paper's λ for Omniglot
INNER_LR = 0.1
INNER_STEPS = 16
CG_STEPS = 5

SETTINGS = {"5w1s": (5, 1, 15), "20w5s": (20, 5, 5)}  # ways, shots, query images per class
NETS = ("paper", "app")
METHODS = ("bilevel", "bilevel-vmap", "bilevel-loop", "bilevel-outer-per-task", "bilevel-per-task", "hand-written", "torchopt-cg", "torchopt-doc", "fomaml", "maml")
#: Run only when named in --methods: the compiled inner loop compiles first (benchmarks/README.md).
EXTRA_METHODS = ("bilevel-compiled", "bilevel-fullgraph")
IMPLICIT = ("bilevel", "bilevel-vmap", "bilevel-loop", "bilevel-outer-per-task", "bilevel-per-task", "hand-written", "torchopt-cg", "torchopt-doc",
            "bilevel-compiled", "bilevel-fullgraph")  # same meta-gradient (doc: ≈)
TORCHOPT = ("torchopt-cg", "torchopt-doc")
TOL = 1e-3  # bilevel vs hand-written, float32
NOISY = 1.5  # max/min above this is flagged

QUICK = {"nets": ["paper", "app"], "settings": ["5w1s"], "filters": 8, "meta_batch": 2, "inner_steps": 4, "rounds": 1,
         "warmup": 1, "mem_steps": 1, "mem_methods": ["bilevel"], "jobs": 2}  # defaults under --quick; explicit options still win

Params = dict[str, Tensor]


# --------------------------------------------------------------------------------------
# the one place where the learner is built (fig2b.py and small_problem.py import it)
# --------------------------------------------------------------------------------------
def make_layer(
    inner_loss: Callable[..., Tensor], lam: float, steps: int, lr: float, cg_steps: int, compile: bool = False
) -> bilevel.Proximal:
    """``bilevel.Proximal`` with the paper's protocol: ``steps`` GD steps of ``lr`` (compiled
    with ``compile``) and a fixed budget of ``cg_steps`` CG iterations, as the hand-written
    loops (both fixed budgets end ``COMPLETED``, no warning)."""
    solver = bilevel.solvers.GradientDescent(lr=lr, steps=steps, **({"compile": True} if compile else {}))
    return bilevel.Proximal(inner_loss, lam, solver=solver,
                            linsolve=bilevel.linsolve.CG(steps=cg_steps),
                            # The hand-written CG also stops on non-positive curvature (the tiny
                            # --quick nets have Hessian eigenvalues below -λ): no warning for it.
                            on_failure="ignore")


# --------------------------------------------------------------------------------------
# nets and data
# --------------------------------------------------------------------------------------
def paper_net(ways: int, filters: int) -> nn.Module:
    """4 × [conv3x3(pad 1) → BatchNorm2d (batch statistics) → ReLU → maxpool 2], linear head."""
    layers: list[nn.Module] = []
    cin = 1
    for _ in range(4):
        layers += [nn.Conv2d(cin, filters, 3, padding=1), nn.BatchNorm2d(filters, track_running_stats=False),
                   nn.ReLU(), nn.MaxPool2d(2)]
        cin = filters
    # 28 → 14 → 7 → 3 → 1
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(filters, ways))


def build_net(name: str, ways: int, filters: int) -> nn.Module:
    if name == "paper":
        return paper_net(ways, filters)
    if name == "app":
        from applications.imaml.models import build_model

        return build_model("omniglot", ways, filters=filters, image_shape=(1, 28, 28))
    raise ValueError(f"unknown net {name!r}")


class FewShotProblem:
    """A net used functionally, θ (a dict of leaf tensors), and one random meta-batch of
    Omniglot-shaped episodes."""

    def __init__(self, net: str, setting: str, meta_batch: int, filters: int, *, lam: float = LAM, lr: float = INNER_LR,
                 steps: int = INNER_STEPS, cg_steps: int = CG_STEPS, dtype: str = "float32", seed: int = 0) -> None:
        ways, shots, queries = SETTINGS[setting]
        self.lam, self.lr, self.steps, self.cg_steps = lam, lr, steps, cg_steps
        with torch.random.fork_rng(devices=[]):  # seeded init without moving the caller's RNG
            torch.manual_seed(seed)
            self.net = build_net(net, ways, filters).to(getattr(torch, dtype))
        self.net.requires_grad_(False)  # the parameters live in θ / φ (functional_call)
        self.names = [k for k, _ in self.net.named_parameters()]
        self.theta: Params = {k: v.detach().clone().requires_grad_(True) for k, v in self.net.named_parameters()}
        self.B = meta_batch
        g = torch.Generator().manual_seed(seed + 1)

        def episode(per_class: int) -> tuple[Tensor, Tensor]:
            x = torch.rand(meta_batch, ways * per_class, 1, 28, 28, generator=g).to(getattr(torch, dtype))
            y = torch.arange(ways).repeat_interleave(per_class).expand(meta_batch, -1).clone()
            return x, y

        self.xs, self.ys = episode(shots)
        self.xq, self.yq = episode(queries)
        self.n_params = sum(v.numel() for v in self.theta.values())

    def loss(self, phi: Params, x: Tensor, y: Tensor) -> Tensor:
        """Cross-entropy of the net with parameters ``phi`` on one task's images."""
        return F.cross_entropy(functional_call(self.net, phi, (x,)), y)

    def params(self, flat: Sequence[Tensor]) -> Params:
        return dict(zip(self.names, flat))

    def query_loss(self, phi: Sequence[Tensor], b: int) -> Tensor:
        return self.loss(self.params(phi), self.xq[b], self.yq[b])

    def zeros(self) -> list[Tensor]:
        return [torch.zeros_like(self.theta[k]) for k in self.names]


# --------------------------------------------------------------------------------------
# the methods: build(problem) -> (step, info); step() returns the meta-gradient (list in
# problem.names order); info() a short string about the last step (or "")
# --------------------------------------------------------------------------------------
Step = Callable[[], list[Tensor]]


def _no_info() -> str:
    return ""


def _bilevel(p: FewShotProblem, batched: Any, compile: bool = False) -> tuple[Step, Callable[[], str]]:
    layer = make_layer(p.loss, p.lam, p.steps, p.lr, p.cg_steps, compile=compile)
    th = [p.theta[k] for k in p.names]

    def step() -> list[Tensor]:
        phi = layer(p.theta, p.xs, p.ys, batched=batched)
        loss = sum(p.loss({k: v[b] for k, v in phi.items()}, p.xq[b], p.yq[b]) for b in range(p.B))
        return list(torch.autograd.grad(loss, th))  # type: ignore[arg-type]

    def info() -> str:
        bwd = getattr(getattr(layer, "diagnostics", None), "backward", None)
        if bwd is None:
            return ""
        statuses = getattr(bwd, "task_status", None) or (getattr(bwd, "status", None),)
        names = [getattr(s, "name", str(s)) for s in statuses]
        how = getattr(layer.diagnostics, "strategy", None)
        sec = getattr(layer.diagnostics, "strategy_seconds", None)
        picked = f"batching {how}" + (" (measured: " + ", ".join(f"{k} {v:.3g} s" for k, v in sec.items()) + "); " if sec else "; ")
        return picked + "bilevel CG: " + ", ".join(f"{n} ×{names.count(n)}" for n in sorted(set(names)))

    return step, info


def _bilevel_fullgraph(p: FewShotProblem) -> tuple[Step, Callable[[], str]]:
    """The whole meta-loss -- the batched layer (vmap) and the query losses -- under
    ``torch.compile(fullgraph=True)``: with fixed budgets the layer is traced (its 16 GD
    steps in the forward graph, its CG in the compiled backward; docs/works-with.md)."""
    layer = make_layer(p.loss, p.lam, p.steps, p.lr, p.cg_steps)
    th = [p.theta[k] for k in p.names]

    def meta_loss(theta: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        phi = layer(theta, xs, ys, batched=True)
        return torch.vmap(p.loss)(phi, xq, yq).sum()

    compiled = torch.compile(meta_loss, fullgraph=True)

    def step() -> list[Tensor]:
        return list(torch.autograd.grad(compiled(p.theta, p.xs, p.ys, p.xq, p.yq), th))

    return step, _no_info


def _bilevel_outer_per_task(p: FewShotProblem) -> tuple[Step, Callable[[], str]]:
    """One batched layer call; the query losses one task at a time (their graphs freed in
    turn), then one implicit backward with the stacked query gradients as cotangents."""
    layer = make_layer(p.loss, p.lam, p.steps, p.lr, p.cg_steps)
    th = [p.theta[k] for k in p.names]

    def step() -> list[Tensor]:
        phi = layer(p.theta, p.xs, p.ys, batched=True)
        leaves = [phi[k] for k in p.names]
        cot = [torch.zeros_like(t) for t in leaves]
        for b in range(p.B):
            pb = [t[b].detach().requires_grad_(True) for t in leaves]
            for c, g in zip(cot, torch.autograd.grad(p.query_loss(pb, b), pb)):
                c[b] = g
        return list(torch.autograd.grad(leaves, th, grad_outputs=cot))

    return step, _no_info


def _bilevel_per_task(p: FewShotProblem) -> tuple[Step, Callable[[], str]]:
    """One unbatched layer call and one backward per task, gradients accumulated: the way to
    use ``bilevel`` when memory binds (the outer graph of one task at a time, like the
    hand-written loop), at the price of B small computations instead of one batched one."""
    layer = make_layer(p.loss, p.lam, p.steps, p.lr, p.cg_steps)
    th = [p.theta[k] for k in p.names]

    def step() -> list[Tensor]:
        total = p.zeros()
        for b in range(p.B):
            phi = layer(p.theta, p.xs[b], p.ys[b])
            for acc, gt in zip(total, torch.autograd.grad(p.loss(phi, p.xq[b], p.yq[b]), th)):
                acc.add_(gt)
        return total

    return step, _no_info


def _sgd_steps(p: FewShotProblem, phi: list[Tensor], x: Tensor, y: Tensor, prox: list[Tensor] | None) -> None:
    """K in-place GD steps on phi (leaves requiring grad), on the support loss (+ prox term)."""
    for _ in range(p.steps):
        obj = p.loss(p.params(phi), x, y)
        if prox is not None:
            obj = obj + 0.5 * p.lam * sum(((a - t) ** 2).sum() for a, t in zip(phi, prox))
        g = torch.autograd.grad(obj, phi)
        with torch.no_grad():
            for a, ga in zip(phi, g):
                a.sub_(ga, alpha=p.lr)


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))  # type: ignore[return-value]


def _cg(matvec: Callable[[list[Tensor]], list[Tensor]], b: list[Tensor], iters: int) -> tuple[list[Tensor], bool]:
    """Plain CG from 0; stops early only on non-positive curvature (as bilevel's CG): (x, stopped)."""
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    d = [t.clone() for t in b]
    rs = _dot(r, r)
    for _ in range(iters):
        Ad = matvec(d)
        dAd = _dot(d, Ad)
        if not bool(dAd > 0):
            return x, True
        alpha = rs / dAd
        x = [xi + alpha * di for xi, di in zip(x, d)]
        r = [ri - alpha * ai for ri, ai in zip(r, Ad)]
        rs_new = _dot(r, r)
        d = [ri + (rs_new / rs) * di for ri, di in zip(r, d)]
        rs = rs_new
    return x, False


def _hand_written_task(p: FewShotProblem, th0: list[Tensor], b: int) -> tuple[list[Tensor], bool]:
    """One task: K GD steps, query gradient v, CG on (H + λI) w = v; returns (w, CG stopped early)."""
    phi = [t.clone().requires_grad_(True) for t in th0]
    _sgd_steps(p, phi, p.xs[b], p.ys[b], prox=th0)
    v = torch.autograd.grad(p.query_loss(phi, b), phi)
    g = torch.autograd.grad(p.loss(p.params(phi), p.xs[b], p.ys[b]), phi, create_graph=True)

    def matvec(d: list[Tensor]) -> list[Tensor]:  # (H + λI) d, H d by double backward through g
        hd = torch.autograd.grad(g, phi, grad_outputs=d, retain_graph=True)
        return [h + p.lam * di for h, di in zip(hd, d)]

    return _cg(matvec, list(v), p.cg_steps)  # the graph of g dies with this frame


def _hand_written(p: FewShotProblem) -> tuple[Step, Callable[[], str]]:
    th = [p.theta[k] for k in p.names]
    stopped = [False] * p.B

    def step() -> list[Tensor]:
        total = p.zeros()
        th0 = [t.detach() for t in th]
        for b in range(p.B):
            w, stopped[b] = _hand_written_task(p, th0, b)
            for acc, wi in zip(total, w):
                acc.add_(wi, alpha=p.lam)
        return total

    def info() -> str:
        n = sum(stopped)
        return f"CG stopped on non-positive curvature in {n}/{p.B} tasks" if n else ""

    return step, info


def _fomaml(p: FewShotProblem) -> tuple[Step, Callable[[], str]]:
    def step() -> list[Tensor]:
        total = p.zeros()
        for b in range(p.B):
            phi = [p.theta[k].detach().clone().requires_grad_(True) for k in p.names]
            _sgd_steps(p, phi, p.xs[b], p.ys[b], prox=None)
            for acc, gq in zip(total, torch.autograd.grad(p.query_loss(phi, b), phi)):
                acc.add_(gq)
        return total

    return step, _no_info


def _maml(p: FewShotProblem) -> tuple[Step, Callable[[], str]]:
    th = [p.theta[k] for k in p.names]

    def step() -> list[Tensor]:
        total = p.zeros()
        for b in range(p.B):
            phi = list(th)
            for _ in range(p.steps):
                g = torch.autograd.grad(p.loss(p.params(phi), p.xs[b], p.ys[b]), phi, create_graph=True)
                phi = [a - p.lr * ga for a, ga in zip(phi, g)]
            for acc, gt in zip(total, torch.autograd.grad(p.query_loss(phi, b), th)):
                acc.add_(gt)
        return total

    return step, _no_info


def torchopt_missing() -> str | None:
    """None if TorchOpt imports, else the reason."""
    try:
        import torchopt  # noqa: F401
        from torchopt.diff.implicit import ImplicitMetaGradientModule, custom_root  # noqa: F401
    except Exception as e:  # noqa: BLE001  (ImportError, or a TorchOpt build that does not load with this torch)
        return f"{type(e).__name__}: {e}"
    return None


def _quiet_torchopt(step: Step) -> Step:
    """TorchOpt 0.7 calls ``functorch.vjp``/``grad``, deprecated since torch 2.0 (a FutureWarning each call)."""

    def quiet() -> list[Tensor]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="We've integrated functorch into PyTorch", category=FutureWarning)
            return step()

    return quiet


def _torchopt_cg(p: FewShotProblem) -> tuple[Step, Callable[[], str]]:
    import torchopt
    from torchopt.diff.implicit import custom_root

    def objective(phi: tuple[Tensor, ...], th: tuple[Tensor, ...], x: Tensor, y: Tensor) -> Tensor:
        return p.loss(p.params(phi), x, y) + 0.5 * p.lam * sum(((a - t) ** 2).sum() for a, t in zip(phi, th))

    def optimality(phi: tuple[Tensor, ...], th: tuple[Tensor, ...], x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        return torch.func.grad(objective)(phi, th, x, y)

    @custom_root(optimality, argnums=1, solve=torchopt.linear_solve.solve_cg(maxiter=p.cg_steps))
    def inner_solve(phi0: tuple[Tensor, ...], th: tuple[Tensor, ...], x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        th0 = [t.detach() for t in th]
        with torch.enable_grad():
            phi = [a.detach().clone().requires_grad_(True) for a in phi0]
            _sgd_steps(p, phi, x, y, prox=th0)
        return tuple(a.detach() for a in phi)

    th = tuple(p.theta[k] for k in p.names)

    def step() -> list[Tensor]:
        total = p.zeros()
        for b in range(p.B):
            phi = inner_solve(tuple(t.detach() for t in th), th, p.xs[b], p.ys[b])
            for acc, gt in zip(total, torch.autograd.grad(p.query_loss(phi, b), th)):
                acc.add_(gt)
        return total

    return _quiet_torchopt(step), _no_info


def _torchopt_doc(p: FewShotProblem) -> tuple[Step, Callable[[], str]]:
    """TorchOpt's documented iMAML pattern (examples/iMAML/imaml_omniglot.py), our net and λ."""
    import torchopt
    from torchopt.diff.implicit import ImplicitMetaGradientModule

    class InnerNet(ImplicitMetaGradientModule,  # type: ignore[misc]
                   linear_solve=torchopt.linear_solve.solve_normal_cg(maxiter=p.cg_steps, atol=0)):
        def __init__(self, meta_net: nn.Module, n_inner_iter: int, reg_param: float) -> None:
            super().__init__()
            self.meta_net = meta_net
            self.net = torchopt.module_clone(meta_net, by="deepcopy", detach_buffers=True)
            self.n_inner_iter = n_inner_iter
            self.reg_param = reg_param
            self.reset_parameters()

        def reset_parameters(self) -> None:
            with torch.no_grad():
                for q, m in zip(self.parameters(), self.meta_parameters()):
                    q.data.copy_(m.data)
                    q.detach_().requires_grad_()

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def objective(self, x: Tensor, y: Tensor) -> Tensor:
            reg = sum(0.5 * self.reg_param * torch.sum(torch.square(q - m))
                      for q, m in zip(self.parameters(), self.meta_parameters()))
            return F.cross_entropy(self(x), y) + reg

        def solve(self, x: Tensor, y: Tensor) -> InnerNet:
            params = tuple(self.parameters())
            opt = torchopt.SGD(params, lr=p.lr)
            with torch.enable_grad():
                for _ in range(self.n_inner_iter):
                    loss = self.objective(x, y)
                    opt.zero_grad()
                    loss.backward(inputs=params)
                    opt.step()
            return self

    meta_net = copy.deepcopy(p.net)
    with torch.no_grad():
        for k, q in meta_net.named_parameters():
            q.copy_(p.theta[k])
    meta_net.requires_grad_(True)
    meta_net.train()
    meta_params = [dict(meta_net.named_parameters())[k] for k in p.names]
    inner_nets = [InnerNet(meta_net, p.steps, p.lam) for _ in range(p.B)]

    def step() -> list[Tensor]:
        losses = []
        for b, inner in enumerate(inner_nets):
            inner.reset_parameters()
            adapted = inner.solve(p.xs[b], p.ys[b])
            losses.append(F.cross_entropy(adapted(p.xq[b]), p.yq[b]))
        return list(torch.autograd.grad(torch.stack(losses).sum(), meta_params))

    return _quiet_torchopt(step), _no_info


BUILDERS: dict[str, Callable[[FewShotProblem], tuple[Step, Callable[[], str]]]] = {
    "bilevel": lambda p: _bilevel(p, True),
    "bilevel-vmap": lambda p: _bilevel(p, "vmap"),
    "bilevel-loop": lambda p: _bilevel(p, "loop"),
    "bilevel-outer-per-task": _bilevel_outer_per_task,
    "bilevel-per-task": _bilevel_per_task,
    "hand-written": _hand_written,
    "torchopt-cg": _torchopt_cg,
    "torchopt-doc": _torchopt_doc,
    "fomaml": _fomaml,
    "maml": _maml,
    "bilevel-compiled": lambda p: _bilevel(p, True, compile=True),
    "bilevel-fullgraph": lambda p: _bilevel_fullgraph(p),
}


def rel_err(g: Sequence[Tensor], ref: Sequence[Tensor]) -> float:
    """``‖g − ref‖ / ‖ref‖`` over all the tensors, in float64."""
    return float(tree_relative_error([t.double() for t in g], [t.double() for t in ref]))


# --------------------------------------------------------------------------------------
# memory (fresh child process per measurement)
# --------------------------------------------------------------------------------------
def _proc_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            m = re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.MULTILINE)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_growth(run: Callable[[], None]) -> float | None:
    """Peak RSS growth (MiB) while ``run()`` runs, over the resident size just before it."""
    gc.collect()
    before = _proc_kib("VmRSS")
    if before is None or not _reset_peak():
        return None
    run()
    peak = _proc_kib("VmHWM")
    return None if peak is None else (peak - before) / 1024.0


def step_memory(step: Callable[[], Any], mem_steps: int, threads: int) -> dict:
    """Peak resident-set growth of one meta-step (``first_mb``) and of ``mem_steps`` later ones
    (``steady_mb``), in this (fresh) process."""
    if threads > 0:
        torch.set_num_threads(threads)

    def run(n: int) -> Callable[[], None]:
        def go() -> None:
            for _ in range(n):
                out = step()
                del out

        return go

    gc.collect()
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    first = peak_growth(run(1))
    if first is None:  # no /proc: the cruder high-water mark of the whole process
        return {"first_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss0) / 1024.0, "steady_mb": None}
    return {"first_mb": first, "steady_mb": peak_growth(run(mem_steps))}


def run_memory_child(script: str, cfg: dict, what: str) -> dict:
    """Run ``script --memory-child cfg`` in a fresh process (freed memory returned to the OS)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, script, "--memory-child", json.dumps(cfg)],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_child(cfg: dict) -> dict:
    """Child process body: build (net, setting, method), measure the first and later meta-steps."""
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    p = FewShotProblem(cfg["net"], cfg["setting"], cfg["meta_batch"], cfg["filters"], **cfg["hyper"])
    step, _ = BUILDERS[cfg["method"]](p)
    return step_memory(step, cfg["mem_steps"], cfg["threads"])


def hyper(a: argparse.Namespace) -> dict:
    return {"lam": a.lam, "lr": a.inner_lr, "steps": a.inner_steps, "cg_steps": a.cg_steps, "dtype": a.dtype}


def measure_memory(net: str, setting: str, method: str, a: argparse.Namespace) -> dict:
    cfg = {"net": net, "setting": setting, "method": method, "meta_batch": a.meta_batch, "filters": a.filters,
           "threads": a.threads, "mem_steps": a.mem_steps,
           "hyper": hyper(a)}
    return run_memory_child(str(Path(__file__).resolve()), cfg, f"{net}/{setting}/{method}")


# --------------------------------------------------------------------------------------
# timing (one process, methods interleaved step by step)
# --------------------------------------------------------------------------------------
def time_methods(p: FewShotProblem, methods: Sequence[str], rounds: int, warmup: int) -> tuple[dict, dict, dict]:
    """Returns (times per method, meta-gradients of the first round, info strings)."""
    built = {m: BUILDERS[m](p) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    grads: dict[str, list[Tensor]] = {}
    infos: dict[str, str] = {}
    for r in range(warmup + rounds):
        for m in methods:
            step, info = built[m]
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter()
                g = step()
                dt = time.perf_counter() - t0
            finally:
                gc.enable()
            if r == 0:
                grads[m] = [t.detach() for t in g]
                infos[m] = info()
            del g
            if r >= warmup:
                times[m].append(dt)
    return times, grads, infos


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------
def _csv_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(s: str) -> list[str]:
        vals = [x.strip() for x in s.split(",") if x.strip()]
        bad = [v for v in vals if v not in choices]
        if not vals or bad:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (comma-separated), got {s!r}")
        return vals

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.metastep", description=" ".join((__doc__ or "").split("\n\n")[0].split()),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", type=_csv_list(NETS), default=list(NETS))
    p.add_argument("--settings", type=_csv_list(tuple(SETTINGS)), default=list(SETTINGS))
    p.add_argument("--methods", type=_csv_list(METHODS + EXTRA_METHODS), default=list(METHODS),
                   help=f"default: all but {', '.join(EXTRA_METHODS)} (GradientDescent(compile=True), named explicitly)")
    p.add_argument("--mem-methods", type=_csv_list(METHODS + EXTRA_METHODS), default=None,
                   help="methods whose memory is measured (fresh process each; default: all run methods)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--lam", type=float, default=LAM, help="λ of the proximal term (the paper: 2)")
    p.add_argument("--inner-lr", type=float, default=INNER_LR)
    p.add_argument("--inner-steps", type=int, default=INNER_STEPS, help="K, inner GD steps")
    p.add_argument("--cg-steps", type=int, default=CG_STEPS, help="CG iterations of the backward")
    p.add_argument("--filters", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="float64: to tell rounding from a real mismatch in the gradient check")
    p.add_argument("--rounds", type=int, default=5, help="timed meta-steps per method (interleaved)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (the first also checks gradients)")
    p.add_argument("--mem-steps", type=int, default=2, help="meta-steps after the first in each memory child")
    add_run_options(p, QUICK, "folder for metastep.csv / .png")
    return p


def int_list(minimum: int = 1) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated integers, each ``>= minimum``."""

    def parse(s: str) -> list[int]:
        try:
            vals = [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
        if not vals or min(vals) < minimum:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers >= {minimum}, got {s!r}")
        return vals

    return parse


def add_run_options(p: argparse.ArgumentParser, quick: dict, out_help: str) -> None:
    """Options every timing script shares: --jobs, --threads, --out, --quick, the memory child."""
    p.add_argument("--jobs", type=int, default=1,
                   help="memory subprocesses run at once (default 1; each one's peak RSS is its own either way)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--out", default="benchmarks/results", help=out_help)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for a smoke test (explicit options win): "
                   + ", ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in quick.items()))
    p.add_argument("--memory-child", help=argparse.SUPPRESS)


def parse_run_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None, quick: dict,
                   child: Callable[[dict], dict]) -> argparse.Namespace | None:
    """Parse (``--quick`` sets the quick defaults, explicit options still win); ``None`` when
    this process was a memory child, which has then printed its JSON line."""
    a = parser.parse_args(argv)
    if a.memory_child:
        print(json.dumps(child(json.loads(a.memory_child))))
        return None
    if a.quick:
        parser.set_defaults(**quick)
        a = parser.parse_args(argv)
    return a


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    parsed = parse_run_args(parser, argv, QUICK, memory_child)
    if parsed is None:
        return {}
    a = parsed
    if min(a.meta_batch, a.filters, a.rounds, a.warmup, a.mem_steps, a.inner_steps, a.cg_steps, a.jobs) < 1 or a.threads < 0:
        parser.error("--meta-batch, --filters, --rounds, --warmup, --mem-steps, --inner-steps, --cg-steps must be >= 1, "
                     "--threads >= 0")
    if not (a.lam > 0 and a.inner_lr > 0):
        parser.error("--lam and --inner-lr must be > 0")

    methods = list(a.methods)
    skipped: dict[str, str] = {}
    if any(m in TORCHOPT for m in methods):
        why = torchopt_missing()
        if why:
            for m in TORCHOPT:
                if m in methods:
                    methods.remove(m)
                    skipped[m] = why
            print(f"TorchOpt not available, skipping {', '.join(skipped)}: {why}")
    mem_methods = [m for m in (a.mem_methods or methods) if m in methods] if not a.no_memory else []

    threads_before = torch.get_num_threads()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    try:
        rows, checks = _run(a, methods, mem_methods)
    finally:
        torch.set_num_threads(threads_before)  # main() may run inside a larger process (tests)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "metastep.csv", out / "metastep.png"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _plot(rows, png_path, a)
    print(f"\nwrote {csv_path} and {png_path}")
    return {"rows": rows, "checks": checks, "skipped": skipped, "methods": methods}


def _run(a: argparse.Namespace, methods: list[str], mem_methods: list[str]) -> tuple[list[dict], list[dict]]:
    checks: list[dict] = []
    env = f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.machine()}"
    groups: dict[tuple[str, str], dict] = {}
    for net in a.nets:  # 1. timing and agreement, all in this process
        for setting in a.settings:
            p = FewShotProblem(net, setting, a.meta_batch, a.filters, **hyper(a))
            ways, shots, queries = SETTINGS[setting]
            title = (f"net {net} ({p.n_params:,} parameters), {setting}: {ways}-way {shots}-shot, {queries} query/class, "
                     f"meta-batch {a.meta_batch}, λ={a.lam}, K={a.inner_steps}, lr={a.inner_lr}, CG {a.cg_steps}, {a.dtype}; {env}")
            print(f"\n== {title}", flush=True)
            times, grads, infos = time_methods(p, methods, a.rounds, a.warmup)
            ref = grads.get("hand-written")
            errs = {m: (rel_err(grads[m], ref) if ref is not None and m in IMPLICIT else None) for m in methods}
            if ref is not None:
                if infos.get("hand-written"):
                    print(f"hand-written: {infos['hand-written']}")
                for m in methods:
                    if m in IMPLICIT and m != "hand-written":
                        checks.append({"net": net, "setting": setting, "method": m, "rel_err": errs[m],
                                       "info": infos.get(m, "")})
                        extra = f" ({infos[m]})" if infos.get(m) else ""
                        note = "" if m != "torchopt-doc" else " (CG on the normal equations: not the same solve)"
                        print(f"meta-gradient {m} vs hand-written: relative difference {errs[m]:.2e}{extra}{note}")
                        if m.startswith("bilevel") and errs[m] > TOL:
                            print(f"! {m} differs from hand-written by more than {TOL:g}: the inner GD of a batch-norm "
                                  "ReLU net can amplify float32 rounding (the vmapped and per-task kernels round "
                                  "differently); rerun with --dtype float64 to tell rounding from a real mismatch")
            groups[(net, setting)] = {"title": title, "times": times, "errs": errs, "n_params": p.n_params}
            del p, grads
    # 2. memory: a fresh process per (net, setting, method)
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        futures = {(n, s, m): pool.submit(measure_memory, n, s, m, a) for (n, s) in groups for m in mem_methods}
        mem = {key: f.result() for key, f in futures.items()}
    rows: list[dict] = []
    for (net, setting), gr in groups.items():  # 3. the tables
        times, errs = gr["times"], gr["errs"]
        med = {m: statistics.median(times[m]) for m in methods}
        for m in methods:
            t = times[m]
            mm = mem.get((net, setting, m), {})
            rows.append({
                "net": net, "setting": setting, "method": m, "median_s": med[m], "max_over_min": max(t) / min(t),
                "noisy": max(t) / min(t) > NOISY, "samples": len(t),
                "x_hand_written": med[m] / med["hand-written"] if "hand-written" in med else None,
                "x_fomaml": med[m] / med["fomaml"] if "fomaml" in med else None,
                "mem_steady_mib": mm.get("steady_mb"), "mem_first_step_mib": mm.get("first_mb"),
                "grad_rel_err_vs_hand_written": errs[m], "meta_batch": a.meta_batch, "filters": a.filters,
                "n_params": gr["n_params"], "dtype": a.dtype, "lam": a.lam, "inner_steps": a.inner_steps, "cg_steps": a.cg_steps,
                "threads": torch.get_num_threads(), "torch": torch.__version__,
            })
        print(f"\n{gr['title']}")
        _print_table([r for r in rows if r["net"] == net and r["setting"] == setting])
    return rows, checks


def _fmt(x: Any, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _print_table(rows: list[dict]) -> None:
    print("| method | s / meta-step (median) | max/min | × hand-written | × fomaml | peak MiB steady | "
          "peak MiB 1st step | grad rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        flag = " !" if r["noisy"] else ""
        print(f"| {r['method']} | {r['median_s']:.4f} | {r['max_over_min']:.2f}{flag} | {_fmt(r['x_hand_written'], '.2f')} | "
              f"{_fmt(r['x_fomaml'], '.2f')} | {_fmt(r['mem_steady_mib'], '.1f')} | {_fmt(r['mem_first_step_mib'], '.1f')} | "
              f"{_fmt(r['grad_rel_err_vs_hand_written'], '.1e')} |")
    noisy = [r["method"] for r in rows if r["noisy"]]
    if noisy:
        print(f"! max/min > {NOISY} (noisy timings; rerun with more --rounds or on a quieter machine): {', '.join(noisy)}")


def _plot(rows: list[dict], path: Path, a: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["net"], r["setting"]) for r in rows))
    memory = any(r["mem_steady_mib"] is not None for r in rows)  # no empty panels after --no-memory
    fig, axes = plt.subplots(len(groups), 2 if memory else 1, figsize=(10 if memory else 5.5, 2.2 + 1.9 * len(groups)),
                             squeeze=False)
    try:
        for (net, setting), (ax1, *rest) in zip(groups, axes):
            rs = [r for r in rows if r["net"] == net and r["setting"] == setting]
            names = [r["method"] for r in rs]
            colors = [f"C{(METHODS + EXTRA_METHODS).index(n)}" for n in names]
            ax1.barh(names, [r["median_s"] for r in rs], color=colors)
            ax1.invert_yaxis()
            ax1.set_xlabel("s / meta-step (median)")
            ax1.set_title(f"{net}, {setting}: time", fontsize=9)
            if not rest:
                continue
            ax2 = rest[0]
            ax2.barh(names, [r["mem_steady_mib"] if r["mem_steady_mib"] is not None else 0.0 for r in rs], color=colors)
            ax2.invert_yaxis()
            ax2.set_xlabel("peak RSS growth, steady (MiB)")
            ax2.set_title(f"{net}, {setting}: memory (0: not measured)", fontsize=9)
        fig.suptitle(f"iMAML meta-step (B={a.meta_batch}, λ={a.lam}, K={a.inner_steps}, CG {a.cg_steps}), "
                     f"CPU {rows[0]['threads']} thread(s)", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


if __name__ == "__main__":
    main()
