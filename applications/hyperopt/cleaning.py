"""Data hyper-cleaning: learn one weight per training example from a clean validation set.

    python -m applications.hyperopt                      # one seed, under a minute
    python -m applications.hyperopt --seeds 0,1,2 --out applications/hyperopt/results/clean

(Franceschi et al. 2017; Shaban et al. 2019.)  Digits (scikit-learn's ``load_digits``) split
900 train / 300 validation / 597 test with a fixed seed, standardised with the training
statistics; a fraction ``--noise`` of the training labels is replaced by a *different* class
drawn at random (which ones is recorded).  Inner problem (W: 64 × 10 weights, b: 10 biases,
w: one logit per training example)::

    W*(w), b*(w) = argmin  Σᵢ σ(wᵢ) CE(xᵢ W + b, ỹᵢ) / n  +  ½ α ‖W‖²

solved in float64 by ``NewtonCG`` inside ``bilevel.Argmin``, warm-started from the previous
hyper-step; the hypergradient of the clean validation cross-entropy with respect to w comes
from the implicit function theorem (CG on the Hessian) and Adam updates w.

Baselines, all with the same solver and an L2 strength α chosen on a grid (``--grid``) by
validation accuracy (ties: validation loss): *noisy* (the noisy training set; α on the
validation set), *validation only* and *noisy + validation* (the validation set is their
training data, so α by ``--folds``-fold cross-validation within it), and two oracles that
know which labels are clean: the clean part of the training set (α on the validation set)
and that part plus the validation set (α by cross-validation).  *Retrained* is a second
stage of hyper-cleaning: the training examples it keeps (σ(wᵢ) ≥ 0.5) plus the validation
set, α by cross-validation.  ``σ(wᵢ) < 0.5`` is scored as a detector of the corrupted labels
(precision, recall, F1).

Writes ``log.csv`` (one row per seed and hyper-step), ``baselines.csv``, ``results.json``,
``weights.png`` (the learned σ(wᵢ) of clean and corrupted examples) and ``accuracy.png``
(test accuracy against hyper-steps and seconds) to ``--out``.  ``--tune-alpha GRID`` instead
chooses the fixed inner α without the test set (see :func:`tune_alpha`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import bilevel
from bilevel.linsolve import CG
from bilevel.solvers import NewtonCG

from ..cliargs import OneLineParser, output_dir, positive_int

DT = torch.float64
Params = dict[str, torch.Tensor]
DEFAULT_GRID = "1e-3,3e-3,1e-2,3e-2,0.1,0.3,1"
#: The inner L2 of hyper-cleaning: chosen by ``--tune-alpha`` on seed 100 (not an evaluation
#: seed), from the validation set only (docs/applications/hyperopt.md, "Choosing α").
DEFAULT_ALPHA = 0.01


@dataclass
class CleaningProblem:
    """One seeded split of digits with corrupted training labels (all tensors float64 / long)."""

    x_train: torch.Tensor
    y_train: torch.Tensor  # the labels the learner sees (a fraction corrupted)
    y_train_true: torch.Tensor
    corrupted: torch.Tensor  # bool, True where y_train != y_train_true
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int


def load(seed: int, noise: float = 0.5, n_train: int = 900, n_val: int = 300) -> CleaningProblem:
    """Digits split ``n_train`` / ``n_val`` / the rest (seeded), standardised with the training
    statistics; ``round(noise · n_train)`` training labels replaced by a different class."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    classes = int(y.max()) + 1
    if not (n_train >= 2 and n_val >= 2 and n_train + n_val <= len(y) - 2):
        raise ValueError(f"--n-train and --n-val must be >= 2 with a sum of at most {len(y) - 2}, got {n_train} and {n_val}")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))
    tr, va, te = idx[:n_train], idx[n_train : n_train + n_val], idx[n_train + n_val :]
    mu, sd = x[tr].mean(0), x[tr].std(0)
    z = (x - mu) / np.where(sd > 0, sd, 1.0)  # constant pixels (the digits' borders) stay 0
    y_true = y[tr].copy()
    bad = rng.permutation(n_train)[: int(round(noise * n_train))]
    y_noisy = y_true.copy()
    y_noisy[bad] = (y_true[bad] + rng.integers(1, classes, size=len(bad))) % classes  # never the true class
    corrupted = np.zeros(n_train, dtype=bool)
    corrupted[bad] = True

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(a, dtype=DT)

    def lab(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(a, dtype=torch.long)

    return CleaningProblem(t(z[tr]), lab(y_noisy), lab(y_true), torch.tensor(corrupted), t(z[va]), lab(y[va]), t(z[te]),
                   lab(y[te]), classes)


def inner_objective(params: Params, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """``Σᵢ σ(wᵢ) CE(xᵢ W + b, yᵢ) / n + ½ α ‖W‖²`` (the biases are not penalised)."""
    ce = F.cross_entropy(x @ params["W"] + params["b"], y, reduction="none")
    return (torch.sigmoid(w) * ce).sum() / x.shape[0] + 0.5 * alpha * (params["W"] ** 2).sum()


def plain_objective(params: Params, x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """The baselines' objective: every weight 1, i.e. mean CE + ½ α ‖W‖²."""
    return F.cross_entropy(x @ params["W"] + params["b"], y) + 0.5 * alpha * (params["W"] ** 2).sum()


def make_solver() -> NewtonCG:
    """The one inner solver of the application: Newton-CG to a gradient norm of 1e-7."""
    return NewtonCG(rtol=1e-7, atol=1e-7, maxiter=100)


def make_layer(linsolve: Any = None) -> bilevel.Argmin:
    # Failures are counted by the caller from the diagnostics (not warned about per step).
    return bilevel.Argmin(inner_objective, solver=make_solver(), linsolve=linsolve or CG(rtol=1e-6, maxiter=500),
                          on_failure="ignore")


def zeros(d: int, c: int) -> Params:
    return {"W": torch.zeros(d, c, dtype=DT), "b": torch.zeros(c, dtype=DT)}


def evaluate(params: Params, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(cross-entropy, accuracy)."""
    with torch.no_grad():
        logits = x @ params["W"] + params["b"]
        return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).double().mean())


def detector(weights: torch.Tensor, corrupted: torch.Tensor) -> dict[str, float]:
    """Precision, recall and F1 of "σ(wᵢ) < 0.5" as a detector of the corrupted labels."""
    flagged = weights < 0.5
    tp = int((flagged & corrupted).sum())
    precision = tp / max(int(flagged.sum()), 1)
    recall = tp / max(int(corrupted.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "flagged": int(flagged.sum())}


# --------------------------------------------------------------------------- baselines


def fit(x: torch.Tensor, y: torch.Tensor, alpha: float, classes: int) -> Params:
    """The baselines' inner problem, solved by the application's solver (``make_solver``)."""
    res = make_solver()(plain_objective, zeros(x.shape[1], classes), x, y, alpha)
    return {k: v.detach() for k, v in res.x.items()}


def _path(x: torch.Tensor, y: torch.Tensor, grid: Sequence[float], classes: int) -> dict[float, Params]:
    """Solutions for every α of the grid, from the largest α down, each warm-starting the next."""
    out: dict[float, Params] = {}
    x0 = zeros(x.shape[1], classes)
    for a in sorted(grid, reverse=True):
        res = make_solver()(plain_objective, x0, x, y, a)
        out[a] = x0 = {k: v.detach() for k, v in res.x.items()}
    return out


def _best(scores: dict[float, tuple[float, float]]) -> float:
    """The α with the highest accuracy; ties to the lower loss.  ``scores[α] = (loss, acc)``."""
    return min(scores, key=lambda a: (-scores[a][1], scores[a][0]))


def tune_on_validation(prob: CleaningProblem, x: torch.Tensor, y: torch.Tensor, grid: Sequence[float]) -> tuple[float, Params]:
    """α chosen on the validation set (which the model does not train on)."""
    sols = _path(x, y, grid, prob.classes)
    scores = {a: evaluate(p, prob.x_val, prob.y_val) for a, p in sols.items()}
    a = _best(scores)
    return a, sols[a]


def tune_by_cv(prob: CleaningProblem, x: torch.Tensor | None, y: torch.Tensor | None, grid: Sequence[float], folds: int,
               seed: int) -> tuple[float, Params]:
    """α by ``folds``-fold cross-validation over the validation set, which is part of the
    training data here: each fold is held out in turn and the model trains on ``x`` (may be
    None) plus the other folds; then the chosen α is refitted on ``x`` plus the whole set."""
    n_val = len(prob.y_val)
    order = torch.from_numpy(np.random.default_rng(seed + 7919).permutation(n_val))
    parts = [order[k::folds] for k in range(folds)]
    totals = {a: [0.0, 0.0] for a in grid}
    for k in range(folds):
        held = parts[k]
        kept = torch.cat([parts[j] for j in range(folds) if j != k])
        xs, ys = prob.x_val[kept], prob.y_val[kept]
        if x is not None and y is not None:
            xs, ys = torch.cat([x, xs]), torch.cat([y, ys])
        for a, p in _path(xs, ys, grid, prob.classes).items():
            loss, acc = evaluate(p, prob.x_val[held], prob.y_val[held])
            totals[a][0] += loss * len(held) / n_val
            totals[a][1] += acc * len(held) / n_val
    a = _best({g: (v[0], v[1]) for g, v in totals.items()})
    xs, ys = prob.x_val, prob.y_val
    if x is not None and y is not None:
        xs, ys = torch.cat([x, xs]), torch.cat([y, ys])
    return a, fit(xs, ys, a, prob.classes)


#: name -> (trained on, how α is chosen); the order of the tables.
BASELINES = {
    "noisy": ("noisy training set", "validation"),
    "validation only": ("validation set", "cross-validation"),
    "noisy + validation": ("noisy training set + validation set", "cross-validation"),
    "oracle: clean train": ("clean part of the training set", "validation"),
    "oracle: clean train + validation": ("clean part of the training set + validation set", "cross-validation"),
}


def run_baselines(prob: CleaningProblem, grid: Sequence[float], folds: int, seed: int) -> dict[str, dict[str, Any]]:
    clean = ~prob.corrupted
    jobs: dict[str, Callable[[], tuple[float, Params]]] = {
        "noisy": lambda: tune_on_validation(prob, prob.x_train, prob.y_train, grid),
        "validation only": lambda: tune_by_cv(prob, None, None, grid, folds, seed),
        "noisy + validation": lambda: tune_by_cv(prob, prob.x_train, prob.y_train, grid, folds, seed),
        "oracle: clean train": lambda: tune_on_validation(prob, prob.x_train[clean], prob.y_train[clean], grid),
        "oracle: clean train + validation": lambda: tune_by_cv(prob, prob.x_train[clean], prob.y_train[clean], grid,
                                                                folds, seed),
    }
    out = {}
    for name, job in jobs.items():
        a, params = job()
        loss, acc = evaluate(params, prob.x_test, prob.y_test)
        out[name] = {"alpha": a, "test_loss": loss, "test_acc": acc}
    return out


# --------------------------------------------------------------------------- hyper-cleaning


@dataclass
class CleaningRun:
    w: torch.Tensor
    params: Params
    rows: list[dict[str, Any]]
    seconds: float
    failures: dict[str, int]


def hyperclean(prob: CleaningProblem, alpha: float, steps: int, lr: float, *, x_outer: torch.Tensor | None = None,
               y_outer: torch.Tensor | None = None, progress: bool = True, desc: str = "hyper-steps",
               evaluate_on: Sequence[tuple[str, torch.Tensor, torch.Tensor]] | None = None) -> CleaningRun:
    """Adam on the example logits w (σ(w) = ½ at the start) for ``steps`` hyper-steps.

    The outer loss is the cross-entropy on ``(x_outer, y_outer)`` (default: the validation
    set).  After every step (outside the clock) the current solution is evaluated on the
    ``evaluate_on`` sets (default validation and test) and the detector is scored."""
    x_outer = prob.x_val if x_outer is None else x_outer
    y_outer = prob.y_val if y_outer is None else y_outer
    sets = list(evaluate_on) if evaluate_on is not None else [("val", prob.x_val, prob.y_val), ("test", prob.x_test, prob.y_test)]
    layer = make_layer()
    n, d = prob.x_train.shape
    w = torch.zeros(n, dtype=DT, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    x0 = zeros(d, prob.classes)
    rows: list[dict[str, Any]] = []
    failures = {"forward": 0, "backward": 0}
    clock = 0.0
    bar = tqdm(range(steps), desc=desc, disable=not progress, file=sys.stderr, leave=False)
    try:
        for step in bar:
            t0 = time.perf_counter()
            sol = layer(x0, w, prob.x_train, prob.y_train, alpha)
            outer = F.cross_entropy(x_outer @ sol["W"] + sol["b"], y_outer)
            opt.zero_grad()
            outer.backward()
            opt.step()
            clock += time.perf_counter() - t0
            diag = layer.diagnostics
            failures["forward"] += diag.forward is None or not diag.forward.status.ok
            failures["backward"] += diag.backward is None or not diag.backward.status.ok
            x0 = {k: v.detach() for k, v in sol.items()}
            sig = torch.sigmoid(w.detach())
            row: dict[str, Any] = {"step": step + 1, "seconds": round(clock, 4), "outer_loss": round(float(outer.detach()), 6)}
            for name, xs, ys in sets:
                loss, acc = evaluate(x0, xs, ys)
                row[f"{name}_loss"], row[f"{name}_acc"] = round(loss, 6), round(acc, 6)
            det = detector(sig, prob.corrupted)
            row.update({k: round(v, 6) for k, v in det.items() if k != "flagged"})
            row["weight_clean"] = round(float(sig[~prob.corrupted].mean()), 6)
            row["weight_corrupted"] = round(float(sig[prob.corrupted].mean()), 6) if prob.corrupted.any() else float("nan")
            rows.append(row)
            bar.set_postfix(outer=f"{float(outer.detach()):.4f}", f1=f"{det['f1']:.3f}", refresh=False)
    finally:
        bar.close()
    with torch.no_grad():  # the classifier at the final weights
        final = layer(x0, w.detach(), prob.x_train, prob.y_train, alpha)
    return CleaningRun(w.detach(), {k: v.detach() for k, v in final.items()}, rows, clock, failures)


def run_seed(seed: int, a: argparse.Namespace, grid: Sequence[float], log: Any) -> dict[str, Any]:
    prob = load(seed, a.noise, a.n_train, a.n_val)
    n = len(prob.y_train)
    log(f"seed {seed}: digits {n} train ({int(prob.corrupted.sum())} labels corrupted) / {len(prob.y_val)} validation / "
        f"{len(prob.y_test)} test")
    t0 = time.perf_counter()
    run = hyperclean(prob, a.alpha, a.hyper_steps, a.outer_lr, progress=not a.no_progress, desc=f"seed {seed} hyper-steps")
    t_hc = time.perf_counter() - t0
    weights = torch.sigmoid(run.w)
    det = detector(weights, prob.corrupted)
    loss, acc = evaluate(run.params, prob.x_test, prob.y_test)
    t0 = time.perf_counter()
    base = run_baselines(prob, grid, a.folds, seed)
    keep = weights >= 0.5
    a_re, p_re = tune_by_cv(prob, prob.x_train[keep], prob.y_train[keep], grid, a.folds, seed)
    re_loss, re_acc = evaluate(p_re, prob.x_test, prob.y_test)
    t_base = time.perf_counter() - t0
    methods = {"hyper-cleaning": {"alpha": a.alpha, "test_loss": loss, "test_acc": acc},
               "hyper-cleaning, retrained": {"alpha": a_re, "test_loss": re_loss, "test_acc": re_acc}, **base}
    log(f"seed {seed}: hyper-cleaning {acc:.4f} (retrained {re_acc:.4f}), detector F1 {det['f1']:.3f}; "
        + ", ".join(f"{k} {v['test_acc']:.4f}" for k, v in base.items())
        + f"  [{a.hyper_steps} hyper-steps {t_hc:.1f} s, baselines {t_base:.1f} s]")
    return {"seed": seed, "methods": methods, "detector": det, "rows": run.rows, "weights": weights.tolist(),
            "corrupted": prob.corrupted.tolist(), "failures": run.failures, "kept": int(keep.sum()),
            "seconds_hyper_steps": run.seconds, "seconds_hyper_cleaning": t_hc, "seconds_baselines": t_base}


# --------------------------------------------------------------------------- choosing α


def tune_alpha(seed: int, a: argparse.Namespace, grid: Sequence[float], log: Any) -> tuple[float, list[dict[str, Any]]]:
    """The inner α of hyper-cleaning chosen without the test set: the validation set is split
    in two halves, hyper-cleaning runs with the first half as its outer objective, and the α
    whose final classifier has the best accuracy on the second half (ties: loss) wins."""
    prob = load(seed, a.noise, a.n_train, a.n_val)
    order = torch.from_numpy(np.random.default_rng(seed + 104729).permutation(len(prob.y_val)))
    first, second = order[: len(order) // 2], order[len(order) // 2 :]
    xa, ya, xb, yb = prob.x_val[first], prob.y_val[first], prob.x_val[second], prob.y_val[second]
    table = []
    for alpha in grid:
        run = hyperclean(prob, alpha, a.hyper_steps, a.outer_lr, x_outer=xa, y_outer=ya, progress=not a.no_progress,
                         desc=f"alpha {alpha:g}", evaluate_on=[("held", xb, yb)])
        loss, acc = evaluate(run.params, xb, yb)
        det = detector(torch.sigmoid(run.w), prob.corrupted)
        table.append({"alpha": alpha, "held_out_loss": loss, "held_out_acc": acc, "f1": det["f1"]})
        log(f"alpha {alpha:g}: held-out half of the validation set: accuracy {acc:.4f}, loss {loss:.4f} "
            f"(detector F1 {det['f1']:.3f})")
    best = _best({r["alpha"]: (r["held_out_loss"], r["held_out_acc"]) for r in table})
    return best, table


# --------------------------------------------------------------------------- command line


def _floats(text: str, name: str, parser: argparse.ArgumentParser) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        parser.error(f"{name} must be comma-separated numbers, got {text!r}")
    if not vals or not all(math.isfinite(v) and v > 0 for v in vals):
        parser.error(f"{name} must hold finite numbers > 0, got {text!r}")
    return vals


def _seeds(text: str, parser: argparse.ArgumentParser) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {text!r}")
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        parser.error(f"--seeds must be distinct integers >= 0, got {text!r}")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m applications.hyperopt [clean]", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--seeds", default="0", help="comma-separated seeds (split, corruption); the tables give the mean")
    p.add_argument("--noise", type=float, default=0.5, help="fraction of training labels corrupted, in [0, 1)")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="the fixed inner L2 strength of hyper-cleaning")
    p.add_argument("--hyper-steps", type=positive_int, default=150, help="Adam steps on the example weights")
    p.add_argument("--outer-lr", type=float, default=0.3, help="Adam learning rate on the example logits w")
    p.add_argument("--grid", default=DEFAULT_GRID, help="comma-separated L2 strengths for the baselines")
    p.add_argument("--folds", type=int, default=3, help="cross-validation folds within the validation set")
    p.add_argument("--n-train", type=int, default=900)
    p.add_argument("--n-val", type=int, default=300, help="the test set is the rest of the 1797 digits")
    p.add_argument("--tune-alpha", default=None, metavar="GRID",
                   help="instead of the experiment: choose the inner alpha from GRID on the validation set only")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="output folder (default runs/hyperopt-clean)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None, *, log: Any = print) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    seeds = _seeds(a.seeds, parser)
    grid = _floats(a.grid, "--grid", parser)
    if not (0 <= a.noise < 1):
        parser.error(f"--noise must be in [0, 1), got {a.noise}")
    if not (a.hyper_steps >= 1 and a.folds >= 2 and a.outer_lr > 0 and math.isfinite(a.outer_lr)
            and a.alpha > 0 and math.isfinite(a.alpha)):
        parser.error("--hyper-steps must be >= 1, --folds >= 2, and --outer-lr and --alpha finite and > 0")
    if a.folds > a.n_val:
        parser.error(f"--folds ({a.folds}) cannot exceed --n-val ({a.n_val})")
    try:
        load(0, a.noise, a.n_train, a.n_val)
    except ValueError as e:
        parser.error(str(e))
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    out = Path(a.out or "runs/hyperopt-clean")
    out = output_dir(parser, out)
    started = time.perf_counter()

    if a.tune_alpha is not None:
        alphas = _floats(a.tune_alpha, "--tune-alpha", parser)
        best, table = tune_alpha(seeds[0], a, alphas, log)
        (out / "tune_alpha.json").write_text(json.dumps({"seed": seeds[0], "hyper_steps": a.hyper_steps,
                                                          "alpha": best, "table": table}, indent=2) + "\n")
        log(f"chosen alpha: {best:g} (seed {seeds[0]}; {time.perf_counter() - started:.0f} s)")
        return 0

    log(f"data hyper-cleaning: digits, {a.noise:.0%} of the training labels corrupted, inner L2 alpha {a.alpha:g}, "
        f"{a.hyper_steps} hyper-steps, seeds {','.join(map(str, seeds))}; outputs in {out}")
    runs = [run_seed(s, a, grid, log) for s in seeds]
    write_outputs(runs, a, out)
    report(runs, log)
    log(f"wall time {time.perf_counter() - started:.1f} s")
    mean = {k: statistics.fmean(r["methods"][k]["test_acc"] for r in runs) for k in runs[0]["methods"]}
    log(f"test accuracy: {mean['hyper-cleaning']:.3f} (hyper-cleaning; noisy {mean['noisy']:.3f}, validation only "
        f"{mean['validation only']:.3f}, noisy+validation {mean['noisy + validation']:.3f}, oracle "
        f"{mean['oracle: clean train']:.3f} / {mean['oracle: clean train + validation']:.3f} with validation; "
        f"retrained {mean['hyper-cleaning, retrained']:.3f})")
    return 0


def _mean_std(vals: Sequence[float]) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.4f}"
    return f"{statistics.fmean(vals):.4f} ± {statistics.stdev(vals):.4f}"


TRAINED_ON = {"hyper-cleaning": ("noisy training set, weighted by σ(w)", "fixed (--alpha)"),
              "hyper-cleaning, retrained": ("kept training examples (σ(w) ≥ 0.5) + validation set", "cross-validation"),
              **BASELINES}


def report(runs: list[dict[str, Any]], log: Any) -> None:
    n = len(runs)
    log("")
    log(f"| method | trained on | L2 α chosen by | α (seed {runs[0]['seed']}) | test accuracy{' (mean ± sd)' if n > 1 else ''} |")
    log("|---|---|---|---|---|")
    for name in runs[0]["methods"]:
        on, how = TRAINED_ON[name]
        accs = [r["methods"][name]["test_acc"] for r in runs]
        log(f"| {name} | {on} | {how} | {runs[0]['methods'][name]['alpha']:g} | {_mean_std(accs)} |")
    log("")
    det = {k: [r["detector"][k] for r in runs] for k in ("precision", "recall", "f1")}
    log("detector σ(wᵢ) < 0.5 of the corrupted labels: precision " + _mean_std(det["precision"]) + ", recall "
        + _mean_std(det["recall"]) + ", F1 " + _mean_std(det["f1"]))
    clean = [statistics.fmean(w for w, c in zip(r["weights"], r["corrupted"]) if not c) for r in runs]
    bad = [statistics.fmean(w for w, c in zip(r["weights"], r["corrupted"]) if c) for r in runs if any(r["corrupted"])]
    if bad:
        log(f"mean learned weight σ(wᵢ): clean {statistics.fmean(clean):.3f}, corrupted {statistics.fmean(bad):.3f}")
    hc = statistics.fmean(r["methods"]["hyper-cleaning"]["test_acc"] for r in runs)
    best_name = max(("noisy", "validation only", "noisy + validation"),
                    key=lambda k: statistics.fmean(r["methods"][k]["test_acc"] for r in runs))
    best = statistics.fmean(r["methods"][best_name]["test_acc"] for r in runs)
    re = statistics.fmean(r["methods"]["hyper-cleaning, retrained"]["test_acc"] for r in runs)
    log(f"hyper-cleaning minus the best baseline without an oracle ({best_name}): {100 * (hc - best):+.1f} points; "
        f"retrained: {100 * (re - best):+.1f} points")
    fails = {k: sum(r["failures"][k] for r in runs) for k in ("forward", "backward")}
    steps = sum(len(r["rows"]) for r in runs)
    log(f"solves that missed their tolerance: {fails['forward']} inner, {fails['backward']} backward, of {steps} "
        f"hyper-steps; seconds per hyper-step {statistics.fmean(r['seconds_hyper_steps'] / len(r['rows']) for r in runs):.3f}")


def write_outputs(runs: list[dict[str, Any]], a: argparse.Namespace, out: Path) -> None:
    with open(out / "log.csv", "w", newline="") as f:
        fields = ["seed", *runs[0]["rows"][0]]
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in runs:
            for row in r["rows"]:
                w.writerow({"seed": r["seed"], **row})
    with open(out / "baselines.csv", "w", newline="") as f:
        out_csv = csv.writer(f)
        out_csv.writerow(["seed", "method", "trained_on", "alpha_chosen_by", "alpha", "test_loss", "test_acc"])
        for r in runs:
            for name, m in r["methods"].items():
                out_csv.writerow([r["seed"], name, *TRAINED_ON[name], m["alpha"], f"{m['test_loss']:.6g}", f"{m['test_acc']:.6g}"])
    names = list(runs[0]["methods"])
    summary = {
        "command_options": {k: v for k, v in vars(a).items() if k not in ("out",)},
        "seeds": [r["seed"] for r in runs],
        "test_acc_mean": {k: statistics.fmean(r["methods"][k]["test_acc"] for r in runs) for k in names},
        "detector_mean": {k: statistics.fmean(r["detector"][k] for r in runs) for k in ("precision", "recall", "f1")},
        "per_seed": [{k: v for k, v in r.items() if k not in ("rows", "weights", "corrupted")} for r in runs],
        "weights": {str(r["seed"]): {"sigma_w": [round(x, 5) for x in r["weights"]], "corrupted": r["corrupted"]}
                    for r in runs},
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_weights(runs, out / "weights.png")
    plot_accuracy(runs, out / "accuracy.png")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_weights(runs: list[dict[str, Any]], path: Path) -> None:
    plt = _plt()
    clean = [w for r in runs for w, c in zip(r["weights"], r["corrupted"]) if not c]
    bad = [w for r in runs for w, c in zip(r["weights"], r["corrupted"]) if c]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    try:
        bins = np.linspace(0, 1, 41)
        ax.hist(clean, bins=bins, alpha=0.6, label=f"clean labels ({len(clean)})", color="tab:blue", log=True)
        if bad:
            ax.hist(bad, bins=bins, alpha=0.6, label=f"corrupted labels ({len(bad)})", color="tab:red", log=True)
        ax.axvline(0.5, color="k", lw=1, ls="--")
        ax.set_xlabel("learned weight σ(wᵢ)")
        ax.set_ylabel("training examples (log)")
        seeds = ",".join(str(r["seed"]) for r in runs)
        ax.set_title(f"hyper-cleaning: learned weights (seed{'s' if len(runs) > 1 else ''} {seeds})")
        ax.legend(loc="upper center")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def plot_accuracy(runs: list[dict[str, Any]], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    try:
        for r in runs:
            steps = [row["step"] for row in r["rows"]]
            secs = [row["seconds"] for row in r["rows"]]
            accs = [row["test_acc"] for row in r["rows"]]
            axes[0].plot(steps, accs, lw=1.2, label=f"hyper-cleaning, seed {r['seed']}")
            axes[1].plot(secs, accs, lw=1.2)
        styles = {"noisy": "tab:red", "validation only": "tab:green", "noisy + validation": "tab:purple",
                  "oracle: clean train": "tab:gray", "oracle: clean train + validation": "k"}
        for name, color in styles.items():
            m = statistics.fmean(r["methods"][name]["test_acc"] for r in runs)
            for ax in axes:
                ax.axhline(m, color=color, lw=1, ls="--", label=f"{name} (mean)" if ax is axes[0] else None)
        axes[0].set_xlabel("hyper-step")
        axes[1].set_xlabel("seconds (hyper-steps only)")
        axes[0].set_ylabel("test accuracy")
        lo = min(min(row["test_acc"] for row in r["rows"]) for r in runs)
        axes[0].set_ylim(max(0.0, min(lo, statistics.fmean(r["methods"]["noisy"]["test_acc"] for r in runs)) - 0.02), 1.0)
        axes[0].legend(fontsize=7, loc="lower right")
        fig.suptitle("test accuracy of the inner solution during hyper-cleaning (dashed: baselines)", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
