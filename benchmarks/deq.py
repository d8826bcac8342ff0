"""The deep-equilibrium classifier of ``applications/deq`` against torchdeq and unrolling.

    python -m benchmarks.deq                       # the full run (about 8 minutes on 2 CPU cores)
    python -m benchmarks.deq --quick               # tiny sizes, a smoke test (the test suite's)
    python benchmarks/deq.py --train-seconds 30 --seeds 0,1 --threads 1 --out benchmarks/results

The same DEQ block and data for every method: :mod:`applications.deq.model` (``z* =
tanh(W z* + U x + b)`` with the recurrent weight ``W`` at spectral norm ρ, scikit-learn's
digits, 1297 train / 500 test), mini-batches of 64, Adam, and the application's defaults
(``python -m applications.deq --help``; the header of the output prints them) for the
model (width, ρ, ``--weight`` parametrisation, ``--input-gain``) and for every setting the
libraries share: forward tolerance 1e-5 (relative), forward cap 200, Anderson memory
m = 5, backward tolerance 1e-6, backward cap 200, phantom gradient k = 5 steps with
damping τ = 0.8. Every method starts from the same initialisation (``init_params(width,
seed, input_gain)``) and sees the same batches. The bilevel layers are built by
``applications.deq.app.make_layer`` from the solver and backward names. One process,
``--threads`` torch threads (default 1); the methods take turns step by step; medians with
max/min (flagged ``!`` above 1.5). The garbage collector stays on while timing, as in a
training loop (``--gc-off`` switches it off, the other scripts' convention): the methods
differ in the reference cycles they leave behind, which only the cyclic collector frees,
and collecting them is part of their cost. torchdeq's rows are skipped, with a one-line
message, when ``import torchdeq`` fails.

Parameter sets: ``init`` (the initialisation) and ``trained`` (after ``--pretrain-epochs``
epochs, default 2, of bilevel Anderson + GMRES training inside the benchmark).

1. **Forward evaluations to a tolerance.** Plain iteration, Anderson and Broyden of both
   libraries (bilevel's ``FixedPointIteration`` / ``Anderson(m)`` / ``Broyden(memory=m)``;
   torchdeq's ``fixed_point_iter`` / ``anderson(m=m)`` / ``broyden(LBFGS_thres=m)``, and
   ``anderson(m=m, lam=1e-8)``: torchdeq's Anderson regularises its Gram matrix by an
   absolute ``lam = 1e-4``, bilevel's by ``1e-8`` times the mean squared residual) on
   ``--fwd-batches`` training mini-batches at each parameter set. Every solver's map is
   wrapped by ``applications.deq.model.residual_recorder``, which records the relative
   residual ``‖f(z) − z‖ / ‖f(z)‖`` of the whole mini-batch at every evaluation, so the
   count of evaluations to reach ``--rtol`` is taken the same way for every solver (the
   solvers run with a tolerance they cannot reach, ``--curve-maxiter`` evaluations).
   Then each solver is timed with its own stopping test at ``--rtol`` (bilevel: the
   mini-batch as one problem, ``‖f(z) − z‖ ≤ rtol ‖z‖``; torchdeq: each sample its own
   problem, stop when the largest per-sample relative residual is below ``tol``), with
   the evaluations it used. Target: Anderson's evaluations ≤ 1/3 of plain iteration's.
2. **Time per training step** (forward + backward + Adam step, mini-batch 64), at both
   parameter sets (restored before every step, so all methods solve the same problems):
   ``bilevel gmres`` (Anderson + GMRES, the application's default), ``bilevel adjoint-iter``
   (Anderson + ``Neumann(alpha=1, rtol)``: the adjoint fixed-point iteration
   ``w ← Jᵀw + v``) against ``torchdeq ift`` (``get_deq(f_solver='anderson',
   b_solver='fixed_point_iter', ift=True)``, the same tolerances, caps and m, stop modes
   ``'rel'``); ``bilevel phantom`` (``Neumann(alpha=τ, steps=k)``) against ``torchdeq
   phantom`` (``get_deq(f_solver='anderson', grad=k, tau=τ, ift=False)``); each torchdeq
   method also with ``lam=1e-8`` (``… lam=1e-8``, as in part 1); ``unrolled``
   (the weight-tied network, K = ``--unroll`` or, by default, the median forward
   evaluations of bilevel Anderson at the trained parameters). Target: bilevel's time ≤
   torchdeq's for the same solver and backward. Gradient checks at the same parameters and
   the same fixed point z* (bilevel's layer started at z*, torchdeq's own gradient function
   ``torchdeq.grad.backward_factory`` applied to z*): bilevel's phantom gradient against
   torchdeq's, the adjoint iterations against each other, in float32 and float64; and the
   phantom gradient's bias against the exact implicit gradient (GMRES to 1e-10, float64)
   for k ∈ ``--bias-ks`` and τ ∈ ``--bias-taus``: relative error and cosine, over the
   parameters the equilibrium depends on (V, U, b; the head's gradient is exact in all).
3. **Memory against forward iterations** ``--mem-iters`` (5, 10, 20, 30, 50): the implicit
   layer with a fixed number of Anderson iterations (``Anderson(rtol=1e-30, maxiter=K)``,
   ``on_failure="ignore"``) and torchdeq's IFT (``f_max_iter=K``) against the unrolled
   network of K iterations, on a mini-batch of ``--mem-batch`` (1024: at 64 the whole graph
   is a few hundred KiB, below what a process's RSS resolves). Bytes kept for backward: the tensors saved by autograd during
   the forward to the loss, still alive after it, each storage counted once (the meter of
   ``benchmarks/backward_cost.py``). Peak RSS growth of a training step in a fresh
   subprocess per (method, K) (``benchmarks/metastep.py``'s probe: ``steady`` = peak over
   ``--mem-steps`` steps after a warm-up step, over the resident size before them; skip
   with ``--no-rss``). Target: the implicit columns flat within 10 % from 5 to 50
   iterations while the unrolled one grows.
4. **Test accuracy after the same training time**: bilevel Anderson + GMRES, bilevel
   Anderson + phantom, torchdeq Anderson + IFT, and the unrolled network (K as above),
   each ``--train-seconds`` of its own clock (forward + backward + Adam step; evaluation
   not counted), interleaved step by step (the method with the least time so far steps
   next), from the same initialisation and batch order, for each seed of ``--seeds``. All
   are evaluated on the test set at the equilibrium (bilevel Anderson to ``--rtol``; the
   unrolled network also with its own K-step forward) when their clock passes each of
   ``--eval-at`` (0.25, 0.5, 1, 2, 5, 10 s) and at the end; a second table gives the
   accuracy at those times, averaged over the seeds. Target: the implicit models within 1
   point of the unrolled network, or better.

Writes to ``--out`` (default ``benchmarks/results``): ``deq_forward.csv``,
``deq_residuals.csv``, ``deq_step.csv``, ``deq_gradcheck.csv``, ``deq_bias.csv``,
``deq_memory.csv``, ``deq_accuracy.csv``, ``deq.png`` (residual against evaluations, time
per step, memory against iterations, accuracy against seconds) and ``deq.txt`` (this
printed output, the command at the top).
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (or loaded by path): make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F
from torch import Tensor

import bilevel
from applications.deq import app
from applications.deq import model as M
from benchmarks.backward_cost import SavedTensorMeter
from benchmarks.metastep import (
    add_run_options,
    int_list,
    parse_run_args,
    run_memory_child,
    step_memory,
)
from bilevel import linsolve, solvers

NOISY = 1.5
FLAT = 1.10  # the implicit memory's max/min target over the iteration counts
TARGET_ANDERSON = 1 / 3
TD_LAM = 1e-8  # the torchdeq variants with Anderson's regularisation near bilevel's (torchdeq's default: 1e-4)
STEP_METHODS = ("bilevel gmres", "bilevel adjoint-iter", "torchdeq ift", "torchdeq ift lam=1e-8", "bilevel phantom",
                "torchdeq phantom", "torchdeq phantom lam=1e-8", "unrolled")
RACE_METHODS = ("bilevel gmres", "bilevel phantom", "torchdeq ift", "unrolled")
MEM_METHODS = ("bilevel implicit", "torchdeq ift", "unrolled")
PAIRS = (("bilevel adjoint-iter", "torchdeq ift"), ("bilevel adjoint-iter", "torchdeq ift lam=1e-8"),
         ("bilevel phantom", "torchdeq phantom"), ("bilevel phantom", "torchdeq phantom lam=1e-8"))
FWD_SOLVERS = {"bilevel": ("iteration", "anderson", "broyden"),
               "torchdeq": ("iteration", "anderson", "anderson lam=1e-8", "broyden")}
EQ_NAMES = ("V", "U", "b")  # the parameters the equilibrium depends on

QUICK = {"width": 16, "pretrain_epochs": 1, "fwd_batches": 2, "curve_maxiter": 60, "rounds": 2, "warmup": 1,
         "mem_iters": [2, 4], "mem_batch": 64, "mem_steps": 1, "rss_methods": ["bilevel implicit"], "train_seconds": 1.0,
         "eval_at": [0.25, 0.5], "seeds": [0], "bias_ks": [1, 20], "bias_taus": [1.0]}


# --------------------------------------------------------------------------------------
# torchdeq (optional)
# --------------------------------------------------------------------------------------
def torchdeq_missing() -> str | None:
    """Why torchdeq cannot be used here (``None``: it can)."""
    try:
        import torchdeq  # noqa: F401
        from torchdeq.solver import get_solver  # noqa: F401
    except Exception as e:  # noqa: BLE001 (any import failure means: skip its rows)
        return f"{type(e).__name__}: {e}"
    return None


# --------------------------------------------------------------------------------------
# configuration shared with the application
# --------------------------------------------------------------------------------------
def app_cfg(a: argparse.Namespace, **over: Any) -> argparse.Namespace:
    """The application's configuration with this run's settings (for ``app.make_layer``)."""
    cfg = app.make_parser().parse_args([])
    for k in ("width", "rho", "weight", "input_gain", "memory", "rtol", "maxiter", "backward_rtol", "backward_maxiter",
              "phantom_steps", "phantom_damping", "lr", "batch_size"):
        setattr(cfg, k, getattr(a, k))
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    """The application's data order: a permutation per epoch from (seed, epoch)."""
    g = torch.Generator().manual_seed(1_000_003 * seed + epoch)
    return list(torch.randperm(n, generator=g).split(batch_size))


def cast(params: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: v.detach().to(dtype) for k, v in params.items()}


# --------------------------------------------------------------------------------------
# the methods: one training step each
# --------------------------------------------------------------------------------------
class Learner:
    """A method's own parameters and Adam; ``step(x, y)`` is one timed training step."""

    def __init__(self, key: str, a: argparse.Namespace, params0: dict[str, Tensor], unroll: int) -> None:
        self.key, self.a, self.unroll = key, a, unroll
        self.params = {k: v.detach().clone().requires_grad_() for k, v in params0.items()}
        self.opt = torch.optim.Adam(self.params.values(), lr=a.lr)
        self.layer: bilevel.FixedPoint | None = None
        self.deq: Any = None
        self.fwd = 0
        self.bwd = 0
        if key.startswith("bilevel"):
            backward = {"bilevel gmres": "gmres", "bilevel adjoint-iter": "iteration", "bilevel phantom": "phantom"}[key]
            self.layer = app.make_layer(app_cfg(a, solver="anderson", backward=backward))
        elif key.startswith("torchdeq"):
            from torchdeq import get_deq

            common = dict(f_solver="anderson", f_max_iter=a.maxiter, f_tol=a.rtol, f_stop_mode="rel")
            self.solver_kwargs = {"m": a.memory} | ({"lam": TD_LAM} if key.endswith("lam=1e-8") else {})
            if key.startswith("torchdeq ift"):
                self.deq = get_deq(**common, b_solver="fixed_point_iter", ift=True, b_max_iter=a.backward_maxiter,
                                   b_tol=a.backward_rtol, b_stop_mode="rel")
            else:
                self.deq = get_deq(**common, ift=False, grad=a.phantom_steps, tau=a.phantom_damping)
        elif key != "unrolled":
            raise ValueError(f"unknown method {key!r}")

    def load(self, params: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for k, v in params.items():
                self.params[k].copy_(v)

    def forward(self, x: Tensor) -> Tensor:
        a, p = self.a, self.params
        if self.layer is not None:
            z = M.implicit_forward(self.layer, p, x, a.rho, a.weight)
            self.fwd = int(self.layer.diagnostics.forward.n_fun)
            return z
        if self.deq is not None:
            W, inj = M.recurrent_weight(p["V"], a.rho, a.weight), M.injection(p, x)
            count = [0]

            def f(z: Tensor) -> Tensor:
                if not torch.is_grad_enabled():  # the solver's evaluations (it runs under no_grad)
                    count[0] += 1
                return M.block(z, W, inj)

            z_out, _ = self.deq(f, torch.zeros_like(inj), solver_kwargs=self.solver_kwargs, backward_writer=self._writer)
            self.fwd = count[0]
            return z_out[-1]
        self.fwd = self.unroll
        return M.unrolled_forward(p, x, a.rho, self.unroll, a.weight)

    def _writer(self, info: dict[str, Tensor]) -> None:
        self.bwd = int(info["nstep"].max())

    def step(self, x: Tensor, y: Tensor) -> None:
        loss = F.cross_entropy(M.classify(self.params, self.forward(x)), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.layer is not None:
            self.bwd = int(self.layer.diagnostics.backward.iterations)
        elif self.deq is not None and self.key.startswith("torchdeq phantom"):
            self.bwd = self.a.phantom_steps
        elif self.deq is None:
            self.bwd = 0


#: Whether the garbage collector is switched off while timing (``--gc-off``). Off by default
#: here, unlike the other scripts: a training loop runs with it on, and the methods differ in
#: the cyclic garbage they leave (collected by the cyclic collector only), whose collection is
#: part of their cost.
GC_OFF = {"value": False}


def timed(fn: Callable[[], Any]) -> float:
    gc_on = gc.isenabled()
    if GC_OFF["value"]:
        gc.disable()
    try:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    finally:
        if gc_on:
            gc.enable()


def eval_layer(a: argparse.Namespace) -> bilevel.FixedPoint:
    """The equilibrium every method is evaluated at: bilevel Anderson to ``--rtol``."""
    return app.make_layer(app_cfg(a, solver="anderson", backward="gmres"))


@torch.no_grad()
def test_accuracy(a: argparse.Namespace, params: dict[str, Tensor], data: dict[str, Tensor],
                  layer: bilevel.FixedPoint, unroll: int | None = None) -> float:
    p = {k: v.detach() for k, v in params.items()}
    if unroll is None:
        z = M.implicit_forward(layer, p, data["x_test"], a.rho, a.weight)
    else:
        z = M.unrolled_forward(p, data["x_test"], a.rho, unroll, a.weight)
    return M.accuracy(M.classify(p, z), data["y_test"])


def pretrain(a: argparse.Namespace, data: dict[str, Tensor], params0: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
    """``--pretrain-epochs`` epochs of bilevel Anderson + GMRES from ``params0`` (the 'trained' set)."""
    lr = Learner("bilevel gmres", a, params0, 0)
    n, t, steps = len(data["y_train"]), 0.0, 0
    for epoch in range(a.pretrain_epochs):
        for idx in batch_order(n, a.batch_size, a.seed, epoch):
            t += timed(lambda idx=idx: lr.step(data["x_train"][idx], data["y_train"][idx]))
            steps += 1
    acc = test_accuracy(a, lr.params, data, eval_layer(a))
    return {k: v.detach().clone() for k, v in lr.params.items()}, {"steps": steps, "seconds": t, "test_acc": acc}


# --------------------------------------------------------------------------------------
# 1. forward evaluations to a tolerance
# --------------------------------------------------------------------------------------
def forward_solver(lib: str, name: str, a: argparse.Namespace, tol: float, cap: int) -> Callable[[Callable, Tensor], Any]:
    """``solve(f, z0)`` of one library's solver, at most about ``cap`` evaluations."""
    m = a.memory
    if lib == "bilevel":
        s = {"iteration": lambda: solvers.FixedPointIteration(rtol=tol, maxiter=cap - 1),
             "anderson": lambda: solvers.Anderson(m=m, rtol=tol, maxiter=cap - 1),
             "broyden": lambda: solvers.Broyden(memory=m, rtol=tol, maxiter=cap - 1)}[name]()
        return lambda f, z0: s(f, z0)
    from torchdeq.solver import get_solver

    fn = get_solver({"iteration": "fixed_point_iter", "anderson": "anderson", "anderson lam=1e-8": "anderson",
                     "broyden": "broyden"}[name])
    kw: dict[str, Any] = {"anderson": {"m": m}, "anderson lam=1e-8": {"m": m, "lam": TD_LAM},
                          "broyden": {"LBFGS_thres": m}}.get(name, {})
    return lambda f, z0: fn(f, z0, max_iter=cap, tol=tol, stop_mode="rel", **kw)


def evaluations_to(history: Sequence[float], tol: float) -> int | None:
    return next((i + 1 for i, r in enumerate(history) if r <= tol), None)


def part_forward(a: argparse.Namespace, libs: list[str], psets: dict[str, dict[str, Tensor]],
                 data: dict[str, Tensor]) -> tuple[list[dict], list[dict], dict]:
    batches = batch_order(len(data["y_train"]), a.batch_size, a.seed, 0)[: a.fwd_batches]
    rows, curves, first_curves = [], [], {}
    for pname, params in psets.items():
        W = M.recurrent_weight(params["V"], a.rho, a.weight)
        probs = [(W, M.injection(params, data["x_train"][idx])) for idx in batches]
        evals: dict[tuple[str, str], list[int | None]] = {}
        times: dict[tuple[str, str], list[float]] = {}
        used: dict[tuple[str, str], list[int]] = {}
        final: dict[tuple[str, str], list[float]] = {}
        keys = [(lib, s) for lib in libs for s in FWD_SOLVERS[lib]]
        for b, (W_, inj) in enumerate(probs):
            for key in keys:  # the residual history: a tolerance no solver reaches, a fixed budget
                f, hist = M.residual_recorder(lambda z, W_=W_, inj=inj: M.block(z, W_, inj))
                with torch.no_grad():
                    forward_solver(*key, a, 1e-12, a.curve_maxiter)(f, torch.zeros_like(inj))
                hist = hist[: a.curve_maxiter]
                evals.setdefault(key, []).append(evaluations_to(hist, a.rtol))
                if b == 0:
                    first_curves[(pname, *key)] = hist
                    curves += [{"params": pname, "library": key[0], "solver": key[1], "evaluation": i + 1,
                                "residual": r} for i, r in enumerate(hist)]
        for r in range(a.warmup + a.rounds):  # the solvers with their own stopping test, timed in turn
            W_, inj = probs[r % len(probs)]
            for key in keys:
                f, hist = M.residual_recorder(lambda z, W_=W_, inj=inj: M.block(z, W_, inj))
                solve = forward_solver(*key, a, a.rtol, a.maxiter)
                with torch.no_grad():
                    dt = timed(lambda solve=solve, f=f, inj=inj: solve(f, torch.zeros_like(inj)))
                if r >= a.warmup:
                    times.setdefault(key, []).append(dt)
                    used.setdefault(key, []).append(len(hist))
                    final.setdefault(key, []).append(min((h for h in hist if h == h), default=float("nan")))
        for lib in libs:
            plain = _median_or_none(evals[(lib, "iteration")])
            for s in FWD_SOLVERS[lib]:
                e, t = evals[(lib, s)], times[(lib, s)]
                med = _median_or_none(e)
                rows.append({
                    "params": pname, "library": lib, "solver": s, "evals_to_tol_median": med,
                    "evals_to_tol_min": _min_or_none(e), "evals_to_tol_max": _max_or_none(e),
                    "never_reached": sum(v is None for v in e), "batches": len(e),
                    "ratio_to_plain": None if med is None or plain is None else med / plain,
                    "own_stop_ms_median": 1e3 * statistics.median(t), "own_stop_max_over_min": max(t) / min(t),
                    "own_stop_evals_median": statistics.median(used[(lib, s)]),
                    "own_stop_best_residual_median": statistics.median(final[(lib, s)]),
                })
    return rows, curves, first_curves


def _median_or_none(v: Sequence[int | None]) -> float | None:
    return None if any(x is None for x in v) else float(statistics.median([x for x in v if x is not None]))


def _min_or_none(v: Sequence[int | None]) -> int | None:
    vals = [x for x in v if x is not None]
    return min(vals) if vals else None


def _max_or_none(v: Sequence[int | None]) -> int | None:
    return None if any(x is None for x in v) else max(x for x in v if x is not None)


# --------------------------------------------------------------------------------------
# 2. time per training step; gradient checks; the phantom gradient's bias
# --------------------------------------------------------------------------------------
def part_step(a: argparse.Namespace, methods: list[str], psets: dict[str, dict[str, Tensor]],
              data: dict[str, Tensor], unroll: int) -> list[dict]:
    base = next(iter(psets.values()))
    learners = {m: Learner(m, a, base, unroll) for m in methods}
    batches = batch_order(len(data["y_train"]), a.batch_size, a.seed, 0)
    t: dict[tuple[str, str], list[float]] = {}
    fwd: dict[tuple[str, str], list[int]] = {}
    bwd: dict[tuple[str, str], list[int]] = {}
    for r in range(a.warmup + a.rounds):
        idx = batches[r % len(batches)]
        x, y = data["x_train"][idx], data["y_train"][idx]
        for pname, params in psets.items():
            for m, lr in learners.items():
                lr.load(params)
                dt = timed(lambda lr=lr, x=x, y=y: lr.step(x, y))
                if r >= a.warmup:
                    t.setdefault((pname, m), []).append(dt)
                    fwd.setdefault((pname, m), []).append(lr.fwd)
                    bwd.setdefault((pname, m), []).append(lr.bwd)
    rows = []
    for pname in psets:
        for m in methods:
            ts = t[(pname, m)]
            rows.append({"params": pname, "method": m, "median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts),
                         "max_over_min": max(ts) / min(ts), "noisy": max(ts) / min(ts) > NOISY, "samples": len(ts),
                         "fwd_evals_median": statistics.median(fwd[(pname, m)]),
                         "bwd_iters_median": statistics.median(bwd[(pname, m)])})
    return rows


def fixed_point(params: dict[str, Tensor], x: Tensor, a: argparse.Namespace, rtol: float) -> tuple[Tensor, Tensor, Tensor]:
    """(W, injection, z*) in the parameters' dtype, z* by bilevel Anderson to ``rtol``."""
    W, inj = M.recurrent_weight(params["V"], a.rho, a.weight), M.injection(params, x)
    with torch.no_grad():
        z = solvers.Anderson(m=a.memory, rtol=rtol, maxiter=1000)(M.block, torch.zeros_like(inj), W.detach(),
                                                                   inj.detach()).x
    return W, inj, z


def bilevel_grad(params: dict[str, Tensor], x: Tensor, y: Tensor, a: argparse.Namespace, z_star: Tensor,
                 back: Any, start_tol: float) -> list[Tensor]:
    """dL/d(V, U, b) through a bilevel layer started at ``z_star`` (its solver stops at once)."""
    p = {k: v.detach().clone().requires_grad_(k in EQ_NAMES) for k, v in params.items()}
    layer = bilevel.FixedPoint(M.block, solver=solvers.Anderson(m=a.memory, rtol=start_tol, maxiter=1000),
                               linsolve=back, on_failure="ignore")
    W, inj = M.recurrent_weight(p["V"], a.rho, a.weight), M.injection(p, x)
    z = layer(z_star, W, inj)
    loss = F.cross_entropy(M.classify(p, z), y)
    return list(torch.autograd.grad(loss, [p[k] for k in EQ_NAMES]))


def torchdeq_grad(params: dict[str, Tensor], x: Tensor, y: Tensor, a: argparse.Namespace, z_star: Tensor,
                  grad_type: Any, tau: float = 1.0) -> list[Tensor]:
    """dL/d(V, U, b) by torchdeq's own gradient function (``backward_factory``) applied at ``z_star``."""
    from torchdeq.grad import backward_factory
    from torchdeq.solver import get_solver
    from torchdeq.utils.layer_utils import deq_decorator

    p = {k: v.detach().clone().requires_grad_(k in EQ_NAMES) for k, v in params.items()}
    W, inj = M.recurrent_weight(p["V"], a.rho, a.weight), M.injection(p, x)
    func, _ = deq_decorator(lambda z: M.block(z, W, inj), z_star)
    if grad_type == "ift":
        gf = backward_factory("ift", b_solver=get_solver("fixed_point_iter"),
                              b_solver_kwargs=dict(max_iter=a.backward_maxiter, tol=a.backward_rtol, stop_mode="rel"))
    else:
        gf = backward_factory(grad_type=grad_type, tau=tau)
    z = gf(None, func, z_star.detach())[-1]
    loss = F.cross_entropy(M.classify(p, z), y)
    return list(torch.autograd.grad(loss, [p[k] for k in EQ_NAMES]))


def rel_diff(g: Sequence[Tensor], ref: Sequence[Tensor]) -> float:
    num = sum(float(((u.double() - v.double()) ** 2).sum()) for u, v in zip(g, ref))
    den = sum(float((v.double() ** 2).sum()) for v in ref)
    return (num / den) ** 0.5


def cosine(g: Sequence[Tensor], ref: Sequence[Tensor]) -> float:
    u = torch.cat([t.double().flatten() for t in g])
    v = torch.cat([t.double().flatten() for t in ref])
    return float(u @ v / (u.norm() * v.norm()))


def part_gradients(a: argparse.Namespace, have_td: bool, psets: dict[str, dict[str, Tensor]],
                   data: dict[str, Tensor]) -> tuple[list[dict], list[dict]]:
    idx = batch_order(len(data["y_train"]), a.batch_size, a.seed, 0)[0]
    x, y = data["x_train"][idx], data["y_train"][idx]
    k, tau = a.phantom_steps, a.phantom_damping
    checks, bias = [], []
    for pname, params in psets.items():
        p64 = cast(params, torch.float64)
        _, _, z64 = fixed_point(p64, x.double(), a, 1e-13)
        exact = bilevel_grad(p64, x.double(), y, a, z64, linsolve.GMRES(rtol=1e-10, maxiter=1000), 1e-12)
        for dtype, z_tol, start_tol in ((torch.float32, 2e-7, 1e-5), (torch.float64, 1e-13, 1e-12)):
            p, xd = cast(params, dtype), x.to(dtype)
            _, _, z = fixed_point(p, xd, a, z_tol)
            dn = str(dtype).replace("torch.", "")
            bl_ph = bilevel_grad(p, xd, y, a, z, linsolve.Neumann(alpha=tau, steps=k), start_tol)
            bl_it = bilevel_grad(p, xd, y, a, z, linsolve.Neumann(alpha=1.0, rtol=a.backward_rtol,
                                                                   maxiter=a.backward_maxiter), start_tol)
            bl_gm = bilevel_grad(p, xd, y, a, z, linsolve.GMRES(rtol=a.backward_rtol, maxiter=a.backward_maxiter),
                                 start_tol)
            rows = [("bilevel phantom vs exact", bl_ph, exact), ("bilevel adjoint-iter vs exact", bl_it, exact),
                    ("bilevel gmres vs exact", bl_gm, exact)]
            if have_td:
                td_ph = torchdeq_grad(p, xd, y, a, z, k, tau)
                td_it = torchdeq_grad(p, xd, y, a, z, "ift")
                rows = [(f"bilevel phantom vs torchdeq phantom (k={k}, τ={tau})", bl_ph, td_ph),
                        ("bilevel adjoint-iter vs torchdeq ift", bl_it, td_it)] + rows + [
                    ("torchdeq phantom vs exact", td_ph, exact), ("torchdeq ift vs exact", td_it, exact)]
            for what, g, ref in rows:
                checks.append({"params": pname, "dtype": dn, "comparison": what, "rel_diff": rel_diff(g, ref),
                               "cosine": cosine(g, ref)})
        for kk in a.bias_ks:
            for tt in a.bias_taus:
                g = bilevel_grad(p64, x.double(), y, a, z64, linsolve.Neumann(alpha=tt, steps=kk), 1e-12)
                bias.append({"params": pname, "k": kk, "tau": tt, "rel_error": rel_diff(g, exact),
                             "cosine": cosine(g, exact)})
    return checks, bias


# --------------------------------------------------------------------------------------
# 3. memory against forward iterations
# --------------------------------------------------------------------------------------
def memory_step(method: str, K: int, a: argparse.Namespace, params: dict[str, Tensor]) -> tuple[Callable[[Tensor], Tensor], Any]:
    """``forward(x) -> z`` with exactly K forward iterations, and the object it uses."""
    if method == "bilevel implicit":
        layer = bilevel.FixedPoint(M.block, solver=solvers.Anderson(m=a.memory, rtol=1e-30, maxiter=K),
                                   linsolve=linsolve.GMRES(rtol=a.backward_rtol, maxiter=a.backward_maxiter),
                                   on_failure="ignore")
        return lambda x: M.implicit_forward(layer, params, x, a.rho, a.weight), layer
    if method == "torchdeq ift":
        from torchdeq import get_deq

        deq = get_deq(f_solver="anderson", b_solver="fixed_point_iter", ift=True, f_max_iter=K, f_tol=1e-30,
                      f_stop_mode="rel", b_max_iter=a.backward_maxiter, b_tol=a.backward_rtol, b_stop_mode="rel")

        def fwd(x: Tensor) -> Tensor:
            W, inj = M.recurrent_weight(params["V"], a.rho, a.weight), M.injection(params, x)
            return deq(lambda z: M.block(z, W, inj), torch.zeros_like(inj), solver_kwargs={"m": a.memory})[0][-1]

        return fwd, deq
    if method == "unrolled":
        return lambda x: M.unrolled_forward(params, x, a.rho, K, a.weight), None
    raise ValueError(f"unknown memory method {method!r}")


def saved_bytes(method: str, K: int, a: argparse.Namespace, params0: dict[str, Tensor], x: Tensor, y: Tensor) -> int:
    params = {k: v.detach().clone().requires_grad_() for k, v in params0.items()}
    fwd, _ = memory_step(method, K, a, params)
    with SavedTensorMeter() as meter:
        loss = F.cross_entropy(M.classify(params, fwd(x)), y)
    out = meter.live()["bytes"]
    del loss
    return out


def _child_args(cfg: dict) -> argparse.Namespace:
    return argparse.Namespace(**cfg["a"])


def memory_child(cfg: dict) -> dict:
    """Fresh process: peak RSS growth of a training step of (method, K)."""
    a = _child_args(cfg)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    data = M.load_digits(a.data_seed)
    params = {k: v.requires_grad_() for k, v in M.init_params(a.width, seed=a.seed, input_gain=a.input_gain).items()}
    opt = torch.optim.Adam(params.values(), lr=a.lr)
    idx = batch_order(len(data["y_train"]), a.mem_batch, a.seed, 0)[0]
    x, y = data["x_train"][idx], data["y_train"][idx]
    fwd, _ = memory_step(cfg["method"], cfg["K"], a, params)

    def step() -> None:
        loss = F.cross_entropy(M.classify(params, fwd(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step_memory(step, a.mem_steps, a.threads)


def part_memory(a: argparse.Namespace, methods: list[str], rss_methods: list[str], params: dict[str, Tensor],
                data: dict[str, Tensor]) -> list[dict]:
    idx = batch_order(len(data["y_train"]), a.mem_batch, a.seed, 0)[0]
    x, y = data["x_train"][idx], data["y_train"][idx]
    child_a = {k: v for k, v in vars(a).items() if isinstance(v, (int, float, str, bool, list, type(None)))}
    rows = []
    for K in a.mem_iters:
        for m in methods:
            rss: dict = {}
            if m in rss_methods:
                rss = run_memory_child(str(Path(__file__).resolve()), {"method": m, "K": K, "a": child_a}, f"{m}/K={K}")
            rows.append({"iterations": K, "method": m, "saved_bytes": saved_bytes(m, K, a, params, x, y),
                         "rss_steady_mib": rss.get("steady_mb"), "rss_first_mib": rss.get("first_mb")})
    return rows


def memory_summary(rows: list[dict]) -> dict[str, dict]:
    """Per method: saved bytes and steady RSS at the fewest and the most iterations, max/min."""
    s: dict[str, dict] = {}
    for m in MEM_METHODS:
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["iterations"])
        if len(rs) < 2:
            continue
        b = [r["saved_bytes"] for r in rs]
        s[m] = {"saved_first": b[0], "saved_last": b[-1], "saved_max_over_min": max(b) / min(b)}
        rss = [r["rss_steady_mib"] for r in rs if r["rss_steady_mib"] is not None]
        if len(rss) >= 2:
            s[m] |= {"rss_first": rss[0], "rss_last": rss[-1], "rss_min": min(rss), "rss_max": max(rss),
                     "rss_max_over_min": max(rss) / min(rss) if min(rss) > 0 else None}
    return s


# --------------------------------------------------------------------------------------
# 4. test accuracy after the same training time
# --------------------------------------------------------------------------------------
def part_race(a: argparse.Namespace, methods: list[str], data: dict[str, Tensor], unroll: int) -> list[dict]:
    layer = eval_layer(a)
    n = len(data["y_train"])
    rows = []
    for seed in a.seeds:
        params0 = M.init_params(a.width, seed=seed, input_gain=a.input_gain)
        learners = {m: Learner(m, a, params0, unroll) for m in methods}
        clock = dict.fromkeys(methods, 0.0)
        steps = dict.fromkeys(methods, 0)
        checkpoints = sorted(t for t in a.eval_at if t < a.train_seconds)
        next_eval = dict.fromkeys(methods, 0)  # index into checkpoints
        acc0 = test_accuracy(a, params0, data, layer)
        for m in methods:
            rows.append({"seed": seed, "method": m, "checkpoint": 0.0, "seconds": 0.0, "steps": 0, "test_acc": acc0,
                         "final": False,
                         "fwd_evals_median": None, "unrolled_own_forward_acc": None})
        fwd_hist: dict[str, list[int]] = {m: [] for m in methods}
        nb = -(-n // a.batch_size)
        while True:
            running = [m for m in methods if clock[m] < a.train_seconds]
            if not running:
                break
            m = min(running, key=lambda k: clock[k])
            lr = learners[m]
            epoch, j = divmod(steps[m], nb)
            idx = batch_order(n, a.batch_size, seed, epoch)[j]
            x, y = data["x_train"][idx], data["y_train"][idx]
            clock[m] += timed(lambda lr=lr, x=x, y=y: lr.step(x, y))
            steps[m] += 1
            fwd_hist[m].append(lr.fwd)
            done = clock[m] >= a.train_seconds
            passed = next_eval[m] < len(checkpoints) and clock[m] >= checkpoints[next_eval[m]]
            if passed or done:
                while next_eval[m] < len(checkpoints) and clock[m] >= checkpoints[next_eval[m]]:
                    next_eval[m] += 1
                rows.append({"seed": seed, "method": m, "checkpoint": checkpoints[next_eval[m] - 1] if passed else None,
                             "seconds": clock[m], "steps": steps[m],
                             "test_acc": test_accuracy(a, lr.params, data, layer), "final": done,
                             "fwd_evals_median": statistics.median(fwd_hist[m]),
                             "unrolled_own_forward_acc": test_accuracy(a, lr.params, data, layer, unroll)
                             if m == "unrolled" else None})
    return rows


# --------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------
class _Tee(io.TextIOBase):
    def __init__(self, *streams: Any) -> None:
        self.streams = streams

    def write(self, s: str) -> int:
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self) -> None:
        for st in self.streams:
            st.flush()


@contextmanager
def captured() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    old = sys.stdout
    sys.stdout = _Tee(old, buf)  # type: ignore[assignment]
    try:
        yield buf
    finally:
        sys.stdout = old


def _f(x: Any, fmt: str = "{:.3g}") -> str:
    return "—" if x is None else fmt.format(x)


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def print_forward(rows: list[dict], a: argparse.Namespace) -> None:
    print(f"\n## 1. Forward: function evaluations to a relative residual of {a.rtol:g} (median over {a.fwd_batches} "
          f"mini-batches of {a.batch_size}; min..max), and each solver with its own stopping test at {a.rtol:g}")
    print("| params | library | solver | evals to tol | min..max | / plain iteration | own stop: ms (median) | max/min "
          "| own stop: evals | own stop: best residual |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        never = f" ({r['never_reached']} never)" if r["never_reached"] else ""
        print(f"| {r['params']} | {r['library']} | {r['solver']} | {_f(r['evals_to_tol_median'], '{:.0f}')}{never} | "
              f"{_f(r['evals_to_tol_min'], '{}')}..{_f(r['evals_to_tol_max'], '{}')} | {_f(r['ratio_to_plain'], '{:.2f}')} | "
              f"{r['own_stop_ms_median']:.2f} | {r['own_stop_max_over_min']:.2f}{' !' if r['own_stop_max_over_min'] > NOISY else ''} | "
              f"{r['own_stop_evals_median']:.0f} | {r['own_stop_best_residual_median']:.1e} |")


def print_step(rows: list[dict], a: argparse.Namespace, unroll: int) -> None:
    print(f"\n## 2. Time per training step (forward + backward + Adam, mini-batch {a.batch_size}; median of {a.rounds} "
          f"after {a.warmup} warm-up; unrolled K = {unroll})")
    print("| params | method | ms / step (median) | min ms | max/min | forward evals | backward iters |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['params']} | {r['method']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | "
              f"{r['max_over_min']:.2f}{' !' if r['noisy'] else ''} | {r['fwd_evals_median']:.0f} | {r['bwd_iters_median']:.0f} |")
    for pname in dict.fromkeys(r["params"] for r in rows):
        med = {r["method"]: r["median_ms"] for r in rows if r["params"] == pname}
        for bl, td in PAIRS:
            if bl in med and td in med:
                ratio = med[bl] / med[td]
                print(f"{pname}: {bl} / {td} = {ratio:.2f} ({'meets' if ratio <= 1 else 'misses'} the target ≤ 1)")


def print_gradients(checks: list[dict], bias: list[dict]) -> None:
    print("\n## 2b. Gradients at the same parameters and fixed point z* (d loss / d(V, U, b), one mini-batch)")
    print("| params | dtype | comparison | relative difference | cosine |")
    print("|---|---|---|---|---|")
    for r in checks:
        print(f"| {r['params']} | {r['dtype']} | {r['comparison']} | {r['rel_diff']:.2e} | {r['cosine']:.6f} |")
    print("\n## 2c. Phantom gradient's bias against the exact implicit gradient (GMRES to 1e-10, float64)")
    print("| params | k | τ | relative error | cosine |")
    print("|---|---|---|---|---|")
    for r in bias:
        print(f"| {r['params']} | {r['k']} | {r['tau']} | {r['rel_error']:.3f} | {r['cosine']:.4f} |")


def print_memory(rows: list[dict], summary: dict[str, dict], a: argparse.Namespace) -> None:
    print(f"\n## 3. Memory against forward iterations (mini-batch {a.mem_batch}; bytes kept for backward after the "
          "forward to the loss; peak RSS growth of a training step, fresh process)")
    print("| iterations | method | saved for backward (KiB) | RSS steady (MiB) | RSS 1st step (MiB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['iterations']} | {r['method']} | {r['saved_bytes'] / 1024:.1f} | {_f(r['rss_steady_mib'], '{:.2f}')} | "
              f"{_f(r['rss_first_mib'], '{:.2f}')} |")
    for m, s in summary.items():
        line = (f"{m}: saved for backward {s['saved_first'] / 1024:.1f} → {s['saved_last'] / 1024:.1f} KiB, "
                f"max/min {s['saved_max_over_min']:.3f}")
        if m != "unrolled":
            line += f" ({'flat' if s['saved_max_over_min'] <= FLAT else 'NOT flat'} within {100 * (FLAT - 1):.0f} %)"
        if "rss_first" in s:
            line += f"; RSS steady {s['rss_first']:.1f} → {s['rss_last']:.1f} MiB (range {s['rss_min']:.1f} .. {s['rss_max']:.1f}"
            r = s["rss_max_over_min"]
            line += "" if r is None else f", max/min {r:.2f}"
            line += ")" if m == "unrolled" or r is None else \
                f", {'flat' if r <= FLAT else 'NOT flat'} within {100 * (FLAT - 1):.0f} %)"
        print(line)


def race_final(rows: list[dict]) -> list[dict]:
    order = {m: i for i, m in enumerate(RACE_METHODS)}
    return sorted((r for r in rows if r["final"]), key=lambda r: (r["seed"], order[r["method"]]))


def race_checkpoints(rows: list[dict]) -> dict[str, dict[float, float]]:
    """Mean test accuracy over the seeds when each method's clock passed each checkpoint."""
    acc: dict[str, dict[float, list[float]]] = {}
    for r in rows:
        if r["checkpoint"] is not None:
            acc.setdefault(r["method"], {}).setdefault(r["checkpoint"], []).append(r["test_acc"])
    return {m: {t: statistics.fmean(v) for t, v in sorted(d.items())} for m, d in acc.items()}


def print_race(rows: list[dict], a: argparse.Namespace, unroll: int) -> None:
    print(f"\n## 4. Test accuracy after {a.train_seconds:g} s of training per method (own clock, interleaved step by "
          f"step; evaluated at the equilibrium; unrolled K = {unroll})")
    print("| seed | method | steps | seconds | test accuracy | forward evals / step (median) | unrolled, own K-step forward |")
    print("|---|---|---|---|---|---|---|")
    final = race_final(rows)
    for r in final:
        print(f"| {r['seed']} | {r['method']} | {r['steps']} | {r['seconds']:.1f} | {r['test_acc']:.4f} | "
              f"{_f(r['fwd_evals_median'], '{:.0f}')} | {_f(r['unrolled_own_forward_acc'], '{:.4f}')} |")
    for seed in a.seeds:
        acc = {r["method"]: r["test_acc"] for r in final if r["seed"] == seed}
        if "unrolled" not in acc:
            continue
        for m, v in acc.items():
            if m != "unrolled":
                d = 100 * (v - acc["unrolled"])
                print(f"seed {seed}: {m} − unrolled = {d:+.1f} points "
                      f"({'meets' if d >= -1 else 'misses'} the target ≥ −1)")
    cp = race_checkpoints(rows)
    times = sorted({t for d in cp.values() for t in d})
    if times:
        print(f"\nTest accuracy when a method's clock first passed t seconds (mean over seeds {', '.join(map(str, a.seeds))}):")
        print("| method | " + " | ".join(f"{t:g} s" for t in times) + " |")
        print("|---|" + "---|" * len(times))
        for m in (m for m in RACE_METHODS if m in cp):
            print(f"| {m} | " + " | ".join(_f(cp[m].get(t), "{:.3f}") for t in times) + " |")


def _legend(ax: Any, fontsize: int) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize)


def plot(path: Path, curves: dict, step_rows: list[dict], mem_rows: list[dict], race_rows: list[dict],
         a: argparse.Namespace, unroll: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    try:
        a0 = ax[0, 0]
        colors = {"iteration": "C0", "anderson": "C1", "broyden": "C2", "anderson lam=1e-8": "C3"}
        pname = "trained" if any(k[0] == "trained" for k in curves) else "init"
        for (pn, lib, s), hist in curves.items():
            if pn != pname:
                continue
            a0.semilogy(range(1, len(hist) + 1), hist, color=colors[s], ls="-" if lib == "bilevel" else "--",
                        label=f"{lib} {s}")
        a0.axhline(a.rtol, color="grey", ls=":", label=f"tolerance {a.rtol:g}")
        a0.set_ylim(1e-8, 10)  # torchdeq's Broyden, run past convergence, can blow up: clipped
        a0.set(xlabel="function evaluations", ylabel="‖f(z) − z‖ / ‖f(z)‖ (mini-batch)",
               title=f"1. forward residual ({pname} parameters, one mini-batch)")
        _legend(a0, 7)
        a1 = ax[0, 1]
        psets = list(dict.fromkeys(r["params"] for r in step_rows))
        methods = list(dict.fromkeys(r["method"] for r in step_rows))
        wbar = 0.8 / max(len(psets), 1)
        for i, pn in enumerate(psets):
            rs = {r["method"]: r for r in step_rows if r["params"] == pn}
            xs = [j + i * wbar for j in range(len(methods))]
            med = [rs[m]["median_ms"] for m in methods]
            lo = [rs[m]["median_ms"] - rs[m]["min_ms"] for m in methods]
            a1.bar(xs, med, width=wbar, yerr=[lo, [0] * len(lo)], label=f"{pn} parameters", color=f"C{i}")
        a1.set_xticks([j + wbar * (len(psets) - 1) / 2 for j in range(len(methods))])
        a1.set_xticklabels(methods, rotation=25, ha="right", fontsize=8)
        a1.set(ylabel="ms / training step (median; bar to min)", title=f"2. time per step (unrolled K = {unroll})")
        _legend(a1, 8)
        a2 = ax[1, 0]
        for i, m in enumerate(MEM_METHODS):
            rs = [r for r in mem_rows if r["method"] == m]
            if not rs:
                continue
            a2.plot([r["iterations"] for r in rs], [r["saved_bytes"] / 2**20 for r in rs], "o-", color=f"C{i}",
                    label=f"{m}: saved for backward")
            rss = [r for r in rs if r["rss_steady_mib"] is not None]
            if rss:
                a2.plot([r["iterations"] for r in rss], [r["rss_steady_mib"] for r in rss], "s--", color=f"C{i}",
                        label=f"{m}: peak RSS growth of a step")
        a2.set(xlabel="forward iterations", ylabel="MiB", title="3. memory against forward iterations")
        a2.set_ylim(bottom=0)
        _legend(a2, 7)
        a3 = ax[1, 1]
        for i, m in enumerate(RACE_METHODS):
            for seed in a.seeds:
                rs = [r for r in race_rows if r["method"] == m and r["seed"] == seed and r["seconds"] > 0]
                if rs:
                    a3.plot([r["seconds"] for r in rs], [r["test_acc"] for r in rs], "o-", ms=3, color=f"C{i}",
                            alpha=1.0 if seed == a.seeds[0] else 0.5, label=m if seed == a.seeds[0] else None)
        a3.set_xscale("log")
        a3.set(xlabel="training seconds (own clock, log scale)", ylabel="test accuracy (at the equilibrium)",
               title=f"4. accuracy against training time (seeds {', '.join(map(str, a.seeds))})")
        _legend(a3, 8)
        for axx in ax.flat:
            axx.grid(alpha=0.3)
        fig.suptitle(f"DEQ on digits (width {a.width}, ρ={a.rho}, {a.weight}): bilevel vs torchdeq vs unrolled; "
                     f"CPU, {torch.get_num_threads()} thread(s)", fontsize=11)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------


def _float_list(s: str) -> list[float]:
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not vals or not all(0 < v <= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected numbers in (0, 1], got {s!r}")
    return vals


def _float_list_pos(s: str) -> list[float]:
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not vals or not all(v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {s!r}")
    return vals


def _mem_methods(s: str) -> list[str]:
    vals = [x.strip() for x in s.split(",") if x.strip()]
    if any(v not in MEM_METHODS for v in vals):
        raise argparse.ArgumentTypeError(f"choose from {', '.join(MEM_METHODS)}, got {s!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    d = app.make_parser().parse_args([])
    p = argparse.ArgumentParser(prog="python -m benchmarks.deq", description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--width", type=int, default=d.width)
    a("--rho", type=float, default=d.rho)
    a("--weight", choices=M.WEIGHTS, default=d.weight)
    a("--input-gain", type=float, default=d.input_gain, help="scale of U's initialisation")
    a("--memory", type=int, default=d.memory, help="Anderson's m and Broyden's memory, both libraries")
    a("--rtol", type=float, default=d.rtol, help="forward tolerance (relative), both libraries")
    a("--maxiter", type=int, default=d.maxiter, help="forward cap, both libraries")
    a("--backward-rtol", type=float, default=d.backward_rtol)
    a("--backward-maxiter", type=int, default=d.backward_maxiter)
    a("--phantom-steps", type=int, default=d.phantom_steps, help="k of the phantom gradient")
    a("--phantom-damping", type=float, default=d.phantom_damping, help="τ of the phantom gradient")
    a("--lr", type=float, default=d.lr)
    a("--batch-size", type=int, default=d.batch_size)
    a("--seed", type=int, default=0, help="initialisation and data order of parts 1-3")
    a("--data-seed", type=int, default=0, help="the train/test split")
    a("--pretrain-epochs", type=int, default=2, help="epochs of bilevel Anderson+GMRES for the 'trained' parameters (0: none)")
    a("--fwd-batches", type=int, default=10, help="mini-batches of part 1")
    a("--curve-maxiter", type=int, default=150, help="evaluations of the residual histories of part 1")
    a("--rounds", type=int, default=30, help="timed rounds of parts 1 and 2")
    a("--warmup", type=int, default=3)
    a("--unroll", type=int, default=None, help="K of the unrolled network (default: bilevel Anderson's median "
      "forward evaluations at the trained parameters)")
    a("--bias-ks", type=int_list(0), default=[1, 2, 5, 10, 20])
    a("--bias-taus", type=_float_list, default=[0.5, 0.8, 1.0])
    a("--mem-iters", type=int_list(0), default=[5, 10, 20, 30, 50])
    a("--mem-batch", type=int, default=1024, help="mini-batch of part 3 (large enough for RSS to see the graph)")
    a("--mem-steps", type=int, default=3, help="training steps after the warm-up one in each RSS child")
    a("--rss-methods", type=_mem_methods, default=list(MEM_METHODS), help="methods whose peak RSS is measured")
    a("--no-rss", action="store_true", help="skip the RSS subprocesses")
    a("--train-seconds", type=float, default=20.0, help="training time per method in part 4")
    a("--eval-at", type=_float_list_pos, default=[0.25, 0.5, 1.0, 2.0, 5.0, 10.0],
      help="seconds of a method's clock at which it is evaluated on the test set (and at the end)")
    a("--seeds", type=int_list(0), default=[0, 1], help="seeds of part 4")
    a("--gc-off", action="store_true", help="switch the garbage collector off while timing (default: on, as in training)")
    a("--parts", type=int_list(0), default=[1, 2, 3, 4], help="which parts to run")
    add_run_options(p, QUICK, "folder for deq*.csv, deq.png, deq.txt")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    parsed = parse_run_args(parser, argv, QUICK, memory_child)
    if parsed is None:
        return {}
    a = parsed
    if min(a.width, a.memory, a.maxiter, a.backward_maxiter, a.phantom_steps, a.batch_size, a.mem_batch, a.fwd_batches,
           a.curve_maxiter, a.rounds, a.mem_steps) < 1 or a.warmup < 0 or a.threads < 0 or a.pretrain_epochs < 0:
        parser.error("sizes, counts and caps must be >= 1 (--warmup, --pretrain-epochs >= 0, --threads >= 0)")
    if not (0 < a.rho < 1 and 0 < a.rtol < 1 and 0 < a.backward_rtol < 1 and 0 < a.phantom_damping <= 1):
        parser.error("--rho, --rtol, --backward-rtol must be in (0, 1), --phantom-damping in (0, 1]")
    if min(a.mem_iters) < 1 or min(a.bias_ks) < 1 or a.train_seconds <= 0:
        parser.error("--mem-iters, --bias-ks must be >= 1, --train-seconds > 0")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    GC_OFF["value"] = a.gc_off
    threads_before = torch.get_num_threads()
    command = "python -m benchmarks.deq " + " ".join(shlex.quote(s) for s in (sys.argv[1:] if argv is None else argv))
    with captured() as buf, torch.random.fork_rng(devices=[]):
        if a.threads > 0:
            torch.set_num_threads(a.threads)
        try:
            print(f"$ {command}")
            res = _run(a, out)
        finally:
            torch.set_num_threads(threads_before)
        print(f"\nwrote {', '.join(res['files'])}")
    (out / "deq.txt").write_text(buf.getvalue())
    return res


def _run(a: argparse.Namespace, out: Path) -> dict[str, Any]:
    why = torchdeq_missing()
    have_td = why is None
    libs = ["bilevel", "torchdeq"] if have_td else ["bilevel"]
    t_start = time.perf_counter()
    print(f"DEQ on digits: width {a.width}, ρ={a.rho}, {a.weight} weight, input gain {a.input_gain}, Anderson m={a.memory}, forward rtol {a.rtol:g} "
          f"(cap {a.maxiter}), backward rtol {a.backward_rtol:g} (cap {a.backward_maxiter}), phantom k={a.phantom_steps} "
          f"τ={a.phantom_damping}, batch {a.batch_size}, Adam lr {a.lr:g}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {platform.machine()}, {os.cpu_count()} CPUs")
    if have_td:
        import torchdeq

        try:
            from importlib.metadata import version

            td_version = version("torchdeq")
        except Exception:  # noqa: BLE001 (the version is only printed)
            td_version = getattr(torchdeq, "__version__", "(version unknown)")
        print(f"torchdeq {td_version} from {Path(torchdeq.__file__).parent}")
    else:
        print(f"torchdeq not available, skipping its rows: {why}")
    data = M.load_digits(a.data_seed)
    init = M.init_params(a.width, seed=a.seed, input_gain=a.input_gain)
    psets = {"init": init}
    info: dict[str, Any] = {}
    if a.pretrain_epochs:
        trained, info = pretrain(a, data, init)
        psets["trained"] = trained
        print(f"'trained' parameters: {a.pretrain_epochs} epoch(s), {info['steps']} steps of bilevel Anderson+GMRES "
              f"({info['seconds']:.1f} s), test accuracy {info['test_acc']:.4f}")
    res: dict[str, Any] = {"pretrain": info, "files": []}

    fwd_rows, curves_rows, first_curves = [], [], {}
    if 1 in a.parts or a.unroll is None:
        fwd_rows, curves_rows, first_curves = part_forward(a, libs, psets, data)
    ref = "trained" if "trained" in psets else "init"
    if a.unroll is None:
        unroll = int(round(next(r["own_stop_evals_median"] for r in fwd_rows
                                if r["params"] == ref and r["library"] == "bilevel" and r["solver"] == "anderson")))
    else:
        unroll = a.unroll
    res["unroll"] = unroll
    if 1 in a.parts:
        print_forward(fwd_rows, a)
        for pn in psets:
            r = {x["solver"]: x for x in fwd_rows if x["params"] == pn and x["library"] == "bilevel"}
            ratio = r["anderson"]["ratio_to_plain"]
            if ratio is not None:
                print(f"{pn}: bilevel Anderson / plain iteration = {ratio:.2f} evaluations "
                      f"({'meets' if ratio <= TARGET_ANDERSON else 'misses'} the target ≤ 1/3)")
        res["forward"] = fwd_rows
        write_csv(out / "deq_forward.csv", fwd_rows)
        write_csv(out / "deq_residuals.csv", curves_rows)
        res["files"] += ["deq_forward.csv", "deq_residuals.csv"]
    print(f"unrolled network: K = {unroll} iterations"
          + (" (bilevel Anderson's median forward evaluations at the "
             f"{ref} parameters)" if a.unroll is None else " (--unroll)"), flush=True)

    step_rows: list[dict] = []
    if 2 in a.parts:
        methods = [m for m in STEP_METHODS if have_td or not m.startswith("torchdeq")]
        step_rows = part_step(a, methods, psets, data, unroll)
        print_step(step_rows, a, unroll)
        checks, bias = part_gradients(a, have_td, psets, data)
        print_gradients(checks, bias)
        res |= {"step": step_rows, "gradcheck": checks, "bias": bias}
        write_csv(out / "deq_step.csv", step_rows)
        write_csv(out / "deq_gradcheck.csv", checks)
        write_csv(out / "deq_bias.csv", bias)
        res["files"] += ["deq_step.csv", "deq_gradcheck.csv", "deq_bias.csv"]

    mem_rows: list[dict] = []
    if 3 in a.parts:
        mem_methods = [m for m in MEM_METHODS if have_td or not m.startswith("torchdeq")]
        rss_methods = [] if a.no_rss else [m for m in a.rss_methods if m in mem_methods]
        mem_rows = part_memory(a, mem_methods, rss_methods, init, data)
        summary = memory_summary(mem_rows)
        print_memory(mem_rows, summary, a)
        res |= {"memory": mem_rows, "memory_summary": summary}
        write_csv(out / "deq_memory.csv", mem_rows)
        res["files"].append("deq_memory.csv")

    race_rows: list[dict] = []
    if 4 in a.parts:
        methods = [m for m in RACE_METHODS if have_td or not m.startswith("torchdeq")]
        race_rows = part_race(a, methods, data, unroll)
        print_race(race_rows, a, unroll)
        res["race"] = race_rows
        write_csv(out / "deq_accuracy.csv", race_rows)
        res["files"].append("deq_accuracy.csv")

    plot(out / "deq.png", first_curves, step_rows, mem_rows, race_rows, a, unroll)
    res["files"].append("deq.png")
    res["files"] = [str(out / f) for f in res["files"]] + [str(out / "deq.txt")]
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return res


if __name__ == "__main__":
    main()
