"""Hypergradient estimators side by side on the data hyper-cleaning problem.

    python -m applications.hyperopt compare                 # two seeds, about three minutes
    python -m applications.hyperopt compare --methods cg5,unrolled100 --hyper-steps 20

The problem is :mod:`applications.hyperopt.cleaning`'s (digits, half the training labels
corrupted, one weight σ(wᵢ) per training example, inner L2 α = 0.01, Adam on w).  Methods,
each with its own w, Adam state, warm start and clock (``--methods``, comma-separated):

* ``cgK`` / ``cg-tol``: implicit, Newton-CG inner solve to a tolerance, backward
  ``CG(steps=K)`` / ``CG(rtol=1e-6)``;
* ``neumannK``: implicit, backward ``Neumann(alpha=η, steps=K)`` (K terms of the series);
* ``first-order``: implicit with the identity in place of the inverse Hessian, i.e.
  ``Neumann(alpha=η, steps=1)``: the hypergradient ``−η ∂²L_in/∂w∂θ · ∇_θ L_val`` at the
  solution θ*, which is backpropagation through one gradient step taken from θ*;
* ``unrolledT``: no implicit function theorem: T differentiable gradient steps
  ``θ ← θ − η ∇_θ L_in(θ, w)`` from a warm start (the previous hyper-step's end point), and
  reverse-mode backpropagation through them.

η = 1/λ_max of the inner Hessian (all weights 1, at the first solution; Lanczos).  The
methods take turns hyper-step by hyper-step; test accuracy is read after each step off the
method's own classifier (the Newton-CG solution for the implicit ones, the T-th iterate for
the unrolled ones), outside the clocks.  Memory: the peak bytes of the tensors autograd
keeps for backward (distinct storages, ``torch.autograd.graph.saved_tensors_hooks``) during
one hyper-step -- inner solve included -- measured on an extra, untimed pass at the start
state, where each estimator's relative error against a tight CG solve is also recorded.
Writes ``log.csv``, ``table.csv``, ``results.json`` and ``compare.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

import bilevel
from bilevel.linsolve import CG, Neumann

from ..cliargs import OneLineParser, output_dir, positive_int
from .cleaning import (
    DEFAULT_ALPHA,
    DT,
    CleaningProblem,
    Params,
    _seeds,
    evaluate,
    inner_objective,
    load,
    make_layer,
)

DEFAULT_METHODS = "cg5,cg20,cg-tol,neumann20,first-order,unrolled20,unrolled100"
_METHOD = re.compile(r"^(cg(\d+)|cg-tol|neumann(\d+)|first-order|unrolled(\d+))$")


def method_label(key: str, eta: float | None = None) -> str:
    m = _METHOD.match(key)
    assert m is not None
    e = "η" if eta is None else f"{eta:.3g}"
    if m.group(2):
        return f"implicit, CG(steps={int(m.group(2))})"
    if key == "cg-tol":
        return "implicit, CG(rtol=1e-6)"
    if m.group(3):
        return f"implicit, Neumann({e}, steps={int(m.group(3))})"
    if key == "first-order":
        return f"first-order, Neumann({e}, steps=1)"
    return f"unrolled, T={int(m.group(4))}"


def parse_methods(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if not _METHOD.match(k) or any(int(g) < 1 for g in _METHOD.match(k).groups()[1:] if g)]  # type: ignore[union-attr]
    if not keys or bad or len(set(keys)) != len(keys):
        raise ValueError(f"--methods must be distinct names among cgK, cg-tol, neumannK, first-order, unrolledT "
                         f"(K, T >= 1), got {text!r}")
    return keys


class SavedBytes:
    """Peak bytes of the distinct tensor storages autograd holds for backward while active.

    A pack hook counts a storage when the first graph saves it and the count drops when the
    last saved reference to it is freed (the graph is released)."""

    def __init__(self) -> None:
        self.refs: dict[int, list[int]] = {}
        self.current = 0
        self.peak = 0

    def pack(self, t: torch.Tensor) -> Any:
        try:
            key, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (a transform's wrapper)
            key, nbytes = id(t), t.numel() * t.element_size()
        entry = self.refs.setdefault(key, [0, nbytes])
        if entry[0] == 0:
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        return _Saved(self, key, t)

    def release(self, key: int) -> None:
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.refs[key]

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda s: s.tensor)


class _Saved:
    __slots__ = ("owner", "key", "tensor")

    def __init__(self, owner: SavedBytes, key: int, tensor: torch.Tensor) -> None:
        self.owner, self.key, self.tensor = owner, key, tensor

    def __del__(self) -> None:
        self.owner.release(self.key)


@dataclass
class Method:
    key: str
    prob: CleaningProblem
    alpha: float
    eta: float
    lr: float
    start: Params
    w: torch.Tensor = field(init=False)
    opt: torch.optim.Optimizer = field(init=False)
    x0: Params = field(init=False)
    clock: float = 0.0
    layer: bilevel.Argmin | None = None
    failures: int = 0

    def __post_init__(self) -> None:
        self.w = torch.zeros(len(self.prob.y_train), dtype=DT, requires_grad=True)
        self.opt = torch.optim.Adam([self.w], lr=self.lr)
        self.x0 = {k: v.clone() for k, v in self.start.items()}
        m = _METHOD.match(self.key)
        assert m is not None
        if m.group(2):
            self.layer = make_layer(CG(steps=int(m.group(2))))
        elif self.key == "cg-tol":
            self.layer = make_layer(CG(rtol=1e-6, maxiter=500))
        elif m.group(3):
            self.layer = make_layer(Neumann(alpha=self.eta, steps=int(m.group(3))))
        elif self.key == "first-order":
            self.layer = make_layer(Neumann(alpha=self.eta, steps=1))
        self.unroll = int(m.group(4)) if m.group(4) else 0

    def solution(self, w: torch.Tensor) -> Params:
        """The inner solution as a function of w (differentiable), from the warm start."""
        p = self.prob
        if self.layer is not None:
            return self.layer(self.x0, w, p.x_train, p.y_train, self.alpha)
        theta = {k: v.detach().requires_grad_() for k, v in self.x0.items()}
        for _ in range(self.unroll):
            g = torch.autograd.grad(inner_objective(theta, w, p.x_train, p.y_train, self.alpha), list(theta.values()),
                                    create_graph=True)
            theta = {k: v - self.eta * gk for (k, v), gk in zip(theta.items(), g)}
        return theta

    def hypergradient(self) -> tuple[torch.Tensor, Params]:
        """∂L_val/∂w at the current state (no update)."""
        sol = self.solution(self.w)
        outer = F.cross_entropy(self.prob.x_val @ sol["W"] + sol["b"], self.prob.y_val)
        (g,) = torch.autograd.grad(outer, self.w)
        return g, {k: v.detach() for k, v in sol.items()}

    def step(self) -> float:
        """One timed hyper-step; returns the validation loss."""
        t0 = time.perf_counter()
        sol = self.solution(self.w)
        outer = F.cross_entropy(self.prob.x_val @ sol["W"] + sol["b"], self.prob.y_val)
        self.opt.zero_grad()
        outer.backward()
        self.opt.step()
        self.x0 = {k: v.detach() for k, v in sol.items()}
        self.clock += time.perf_counter() - t0
        if self.layer is not None:
            d = self.layer.diagnostics
            ok = d.forward is not None and d.backward is not None and d.forward.status.ok and d.backward.status.ok
            self.failures += not ok
        return float(outer.detach())


def reference_hypergradient(prob: CleaningProblem, alpha: float, start: Params) -> torch.Tensor:
    layer = make_layer(CG(rtol=1e-10, maxiter=5000))
    w = torch.zeros(len(prob.y_train), dtype=DT, requires_grad=True)
    sol = layer(start, w, prob.x_train, prob.y_train, alpha)
    (g,) = torch.autograd.grad(F.cross_entropy(prob.x_val @ sol["W"] + sol["b"], prob.y_val), w)
    return g


def run_seed(seed: int, keys: list[str], a: argparse.Namespace, log: Any) -> dict[str, Any]:
    prob = load(seed, a.noise, a.n_train, a.n_val)
    d = prob.x_train.shape[1]
    with torch.no_grad():
        start = make_layer()({"W": torch.zeros(d, prob.classes, dtype=DT), "b": torch.zeros(prob.classes, dtype=DT)},
                             torch.zeros(len(prob.y_train), dtype=DT), prob.x_train, prob.y_train, a.alpha)
    start = {k: v.detach() for k, v in start.items()}
    ones = torch.full((len(prob.y_train),), 40.0, dtype=DT)  # σ = 1: an upper bound of the curvature
    lam_max = float(bilevel.hessian_extremes(inner_objective, start, ones, prob.x_train, prob.y_train, a.alpha)[1])
    eta = 1.0 / lam_max
    methods = [Method(k, prob, a.alpha, eta, a.outer_lr, start) for k in keys]
    ref = reference_hypergradient(prob, a.alpha, start)
    at_start: dict[str, dict[str, float]] = {}
    for m in methods:  # the untimed pass at the start state: memory and hypergradient error
        meter = SavedBytes()
        with meter.hooks():
            g, _ = m.hypergradient()
        at_start[m.key] = {"peak_saved_bytes": meter.peak,
                           "rel_error": float((g - ref).norm() / ref.norm()),
                           "cosine": float(g @ ref / (g.norm() * ref.norm()))}
    log(f"seed {seed}: η = 1/λ_max = {eta:.4g}; start test accuracy {evaluate(start, prob.x_test, prob.y_test)[1]:.4f}")
    rows: list[dict[str, Any]] = []
    bar = tqdm(range(a.hyper_steps), desc=f"seed {seed} rounds", disable=a.no_progress, file=sys.stderr, leave=False)
    try:
        for step in bar:
            for m in methods:
                val_loss = m.step()
                loss, acc = evaluate(m.x0, prob.x_test, prob.y_test)
                rows.append({"seed": seed, "method": m.key, "step": step + 1, "seconds": round(m.clock, 4),
                             "val_loss": round(val_loss, 6), "test_loss": round(loss, 6), "test_acc": round(acc, 6)})
    finally:
        bar.close()
    summary = {}
    for m in methods:
        last = [r for r in rows if r["method"] == m.key][-1]
        summary[m.key] = {"label": method_label(m.key, eta), "test_acc": last["test_acc"], "val_loss": last["val_loss"],
                          "seconds": m.clock, "seconds_per_step": m.clock / a.hyper_steps, "failures": m.failures,
                          **at_start[m.key]}
    return {"seed": seed, "eta": eta, "methods": summary, "rows": rows}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m applications.hyperopt compare", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated: cgK, cg-tol, neumannK, first-order, unrolledT")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--hyper-steps", type=positive_int, default=100, help="hyper-steps per method (they take turns)")
    p.add_argument("--outer-lr", type=float, default=0.3)
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="the fixed inner L2 strength")
    p.add_argument("--noise", type=float, default=0.5)
    p.add_argument("--n-train", type=int, default=900)
    p.add_argument("--n-val", type=int, default=300)
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--out", default=None, help="output folder (default runs/hyperopt-compare)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None, *, log: Any = print) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        keys = parse_methods(a.methods)
    except ValueError as e:
        parser.error(str(e))
    seeds = _seeds(a.seeds, parser)
    if not (a.hyper_steps >= 1 and a.outer_lr > 0 and math.isfinite(a.outer_lr) and a.alpha > 0 and math.isfinite(a.alpha)
            and 0 <= a.noise < 1):
        parser.error("--hyper-steps must be >= 1, --outer-lr and --alpha finite and > 0, --noise in [0, 1)")
    try:
        load(0, a.noise, a.n_train, a.n_val)
    except ValueError as e:
        parser.error(str(e))
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    out = Path(a.out or "runs/hyperopt-compare")
    out = output_dir(parser, out)
    started = time.perf_counter()
    log(f"hypergradient estimators on data hyper-cleaning: {len(keys)} methods, {a.hyper_steps} interleaved hyper-steps, "
        f"seeds {','.join(map(str, seeds))}; outputs in {out}")
    runs = [run_seed(s, keys, a, log) for s in seeds]
    table = summarise(runs, keys)
    write_outputs(runs, table, a, out)
    log("")
    log("| method | test accuracy | seconds / hyper-step | peak saved for backward | hypergradient rel. error at start |")
    log("|---|---|---|---|---|")
    for t in table:
        log(f"| {t['label']} | {t['test_acc']:.4f} | {t['seconds_per_step']:.4f} | {_mb(t['peak_saved_bytes'])} | "
            f"{t['rel_error']:.2g} |")
    log("")
    etas = ", ".join(f"{r['eta']:.3g}" for r in runs)
    log(f"means over seeds {','.join(map(str, seeds))} after {a.hyper_steps} hyper-steps; η = 1/λ_max = {etas}")
    fails = sum(t["failures"] for t in table)
    if fails:
        log(f"implicit hyper-steps with a solve that missed its tolerance: {fails}")
    log(f"wall time {time.perf_counter() - started:.1f} s; figure: {out / 'compare.png'}")
    return 0


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def summarise(runs: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    table = []
    for k in keys:
        per = [r["methods"][k] for r in runs]
        table.append({"method": k, "label": method_label(k),
                      **{f: statistics.fmean(p[f] for p in per) for f in
                         ("test_acc", "val_loss", "seconds_per_step", "peak_saved_bytes", "rel_error", "cosine")},
                      "failures": sum(p["failures"] for p in per)})
    return table


def write_outputs(runs: list[dict[str, Any]], table: list[dict[str, Any]], a: argparse.Namespace, out: Path) -> None:
    with open(out / "log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(runs[0]["rows"][0]))
        w.writeheader()
        for r in runs:
            w.writerows(r["rows"])
    with open(out / "table.csv", "w", newline="") as f:
        out_csv = csv.writer(f)
        out_csv.writerow(["method", "label", "test_acc", "val_loss", "seconds_per_step", "peak_saved_bytes", "rel_error_at_start",
                    "cosine_at_start", "failures"])
        for t in table:
            out_csv.writerow([t["method"], t["label"], f"{t['test_acc']:.6g}", f"{t['val_loss']:.6g}", f"{t['seconds_per_step']:.6g}",
                        int(t["peak_saved_bytes"]), f"{t['rel_error']:.4g}", f"{t['cosine']:.6g}", t["failures"]])
    res = {"command_options": {k: v for k, v in vars(a).items() if k != "out"}, "table": table,
           "per_seed": [{k: v for k, v in r.items() if k != "rows"} for r in runs]}
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(runs, table, out / "compare.png")


def plot(runs: list[dict[str, Any]], table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.2))
    try:
        colors = plt.get_cmap("tab10")
        for i, t in enumerate(table):
            for j, r in enumerate(runs):
                rows = [x for x in r["rows"] if x["method"] == t["method"]]
                ax0.plot([x["seconds"] for x in rows], [x["test_acc"] for x in rows], color=colors(i % 10), lw=1.2,
                         ls="-" if j == 0 else ":", label=t["label"] if j == 0 else None)
            ax1.scatter([max(t["peak_saved_bytes"], 1) / 2**20], [t["test_acc"]], color=colors(i % 10), s=40)
            ax1.annotate(t["label"], (max(t["peak_saved_bytes"], 1) / 2**20, t["test_acc"]), fontsize=7,
                         xytext=(5, 9 * (i % 3) - 9), textcoords="offset points", color=colors(i % 10))
        ax0.set_xlabel("seconds (each method's own clock)")
        ax0.set_ylabel("test accuracy")
        ax0.set_title(f"test accuracy against time (seed {runs[0]['seed']} solid"
                      + (f", seed {runs[1]['seed']} dotted)" if len(runs) > 1 else ")"), fontsize=9)
        ax0.legend(fontsize=7, loc="lower right")
        ax1.set_xscale("log")
        ax1.set_xlabel("peak bytes saved for backward per hyper-step (MiB, log)")
        ax1.set_ylabel("final test accuracy (mean over seeds)")
        ax1.set_title("final accuracy against memory", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
