"""Dataset distillation: learn one synthetic 8×8 image per class of scikit-learn's digits.

    python -m applications.hyperopt distill               # about a minute on a 2-core CPU
    python -m applications.hyperopt distill --init random # start from noise instead of the class means

Inner problem (S: the 10 × 64 synthetic images, one per class c = 0..9; W: 64 × 10
weights, b: 10 biases; α a fixed L2 strength, or learned with ``--learn-alpha``)::

    W*(S), b*(S) = argmin  mean_c CE(S_c W + b, c) + ½ α ‖W‖²

solved tightly in float64 by ``bilevel.solvers.NewtonCG`` inside ``bilevel.Argmin`` (each
solve warm-started from the previous one).  Outer loss: the cross-entropy of that
logistic regression on the **real** training digits, ``mean CE(X_train W* + b*, y_train)``;
its gradient with respect to the images comes from the implicit function theorem (one CG
solve on the inner Hessian per step), and Adam (cosine-decayed step) updates the images.
As in JAXopt's dataset-distillation example, on a smaller data set.

Baselines, each a logistic regression fitted by the same solver, with its α tuned on a
grid (``--grid``) by the cross-entropy on real training images it was not fitted on (the
test set is never used for a choice): ten random real training images per class (100
images; α by the other training images) and one per class (10 images), over ``--draws``
random draws (mean ± std); the ten class means (the default starting point; α by the
training set); and all training images (the ceiling; α by 5-fold cross-validation).
Data: ``load_digits`` (no download), split train/test 75/25 with a
fixed seed, standardised with the training statistics.  Writes ``log.csv`` (one row per
outer step: training loss and accuracy, test loss and accuracy), ``results.json``,
``images.png`` (the distilled images above the class means), ``accuracy.png`` (test
accuracy against outer steps, with the baselines) and ``output.txt`` (the printed lines,
the command at the top) to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import bilevel
from bilevel.linsolve import CG
from bilevel.solvers import NewtonCG

from ..cliargs import OneLineParser, nonneg_int, output_dir, positive_int

DT = torch.float64
CLASSES = 10
SIDE = 8
Params = dict[str, torch.Tensor]


def load(seed: int, limit: int | None = None, test_fraction: float = 0.25) -> dict[str, torch.Tensor]:
    """Standardised train/test tensors of ``load_digits`` (a seeded permutation, 75/25)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    idx = np.random.default_rng(seed).permutation(len(y))
    if limit is not None:
        idx = idx[:limit]
    n_test = int(round(test_fraction * len(idx)))
    tr, te = idx[n_test:], idx[:n_test]
    mu, sd = x[tr].mean(0), x[tr].std(0)
    sd = np.where(sd > 0, sd, 1.0)  # pixels constant in the training set (borders): left at 0
    z = (x - mu) / sd
    return {"x_train": torch.tensor(z[tr], dtype=DT), "y_train": torch.tensor(y[tr], dtype=torch.long),
            "x_test": torch.tensor(z[te], dtype=DT), "y_test": torch.tensor(y[te], dtype=torch.long),
            "mean": torch.tensor(mu, dtype=DT), "std": torch.tensor(sd, dtype=DT)}


def inner_objective(params: Params, images: torch.Tensor, log_alpha: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy on the (synthetic or real) images + ½ α ‖W‖² (biases not penalised)."""
    logits = images @ params["W"] + params["b"]
    return F.cross_entropy(logits, labels) + 0.5 * torch.exp(log_alpha) * (params["W"] ** 2).sum()


def make_layer(rtol: float = 1e-10, maxiter: int = 100) -> bilevel.Argmin:
    """Newton-CG to a relative gradient norm ``rtol`` forward, CG on the Hessian backward."""
    solver = NewtonCG(rtol=rtol, maxiter=maxiter)
    return bilevel.Argmin(inner_objective, solver=solver, linsolve=CG(rtol=1e-10, maxiter=5000))


def zeros(d: int) -> Params:
    return {"W": torch.zeros(d, CLASSES, dtype=DT), "b": torch.zeros(CLASSES, dtype=DT)}


def fit(layer: bilevel.Argmin, x: torch.Tensor, y: torch.Tensor, alpha: float) -> Params:
    """The logistic regression on ``(x, y)`` with L2 strength ``alpha`` (no graph)."""
    with torch.no_grad():
        sol = layer(zeros(x.shape[1]), x, torch.tensor(math.log(alpha), dtype=DT), y)
    return {k: v.detach() for k, v in sol.items()}


def metrics(params: Params, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy)."""
    with torch.no_grad():
        logits = x @ params["W"] + params["b"]
        return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).double().mean())


def tuned_fit(layer: bilevel.Argmin, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
              grid: Sequence[float]) -> tuple[float, Params]:
    """The fit on ``(x, y)`` whose α on the grid gives the lowest cross-entropy on ``(x_val,
    y_val)``: real training images the fit has not seen (the test set plays no part)."""
    best: tuple[float, float, Params] | None = None
    for a in grid:
        params = fit(layer, x, y, a)
        loss = metrics(params, x_val, y_val)[0]
        if best is None or loss < best[0]:
            best = (loss, a, params)
    assert best is not None
    return best[1], best[2]


def cross_validated_fit(layer: bilevel.Argmin, x: torch.Tensor, y: torch.Tensor, grid: Sequence[float],
                        folds: int, seed: int) -> tuple[float, Params]:
    """The fit on all of ``(x, y)`` with the α of the lowest ``folds``-fold cross-validated
    cross-entropy (the ceiling: every training image, α tuned without the test set)."""
    parts = np.array_split(np.random.default_rng(seed).permutation(len(y)), folds)
    losses = []
    for a in grid:
        loss = 0.0
        for k in range(folds):
            keep = np.concatenate([parts[j] for j in range(folds) if j != k])
            loss += metrics(fit(layer, x[keep], y[keep], a), x[parts[k]], y[parts[k]])[0] * len(parts[k])
        losses.append(loss / len(y))
    alpha = grid[int(np.argmin(losses))]
    return alpha, fit(layer, x, y, alpha)


def random_real(layer: bilevel.Argmin, data: dict[str, torch.Tensor], per_class: int, draws: int,
                grid: Sequence[float], seed: int) -> dict[str, Any]:
    """``per_class`` random training images of each class, ``draws`` times, α tuned each time."""
    rng = np.random.default_rng(seed)
    y = data["y_train"].numpy()
    accs, alphas = [], []
    for _ in range(draws):
        pick = np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in range(CLASSES)])
        rest = np.setdiff1d(np.arange(len(y)), pick)
        alpha, params = tuned_fit(layer, data["x_train"][pick], data["y_train"][pick],
                                  data["x_train"][rest], data["y_train"][rest], grid)
        accs.append(metrics(params, data["x_test"], data["y_test"])[1])
        alphas.append(alpha)
    return {"images": per_class * CLASSES, "draws": draws, "test_acc": accs, "alpha": alphas,
            "test_acc_mean": float(np.mean(accs)), "test_acc_std": float(np.std(accs))}


def class_means(data: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([data["x_train"][data["y_train"] == c].mean(0) for c in range(CLASSES)])


def distill(layer: bilevel.Argmin, data: dict[str, torch.Tensor], init: torch.Tensor, alpha: float, *,
            steps: int, lr: float, learn_alpha: bool = False, progress: bool = False) -> tuple[torch.Tensor, float, list[dict[str, Any]]]:
    """Adam on the images (and log α with ``learn_alpha``) through the implicit gradient of
    the training cross-entropy; returns the images, α and one row per step (row 0: the start,
    row ``steps``: the end)."""
    images = init.clone().to(DT).requires_grad_(True)
    log_alpha = torch.tensor(math.log(alpha), dtype=DT, requires_grad=learn_alpha)
    labels = torch.arange(CLASSES)
    opt = torch.optim.Adam([images, *([log_alpha] if learn_alpha else [])], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    x0 = zeros(images.shape[1])
    rows: list[dict[str, Any]] = []
    bar = tqdm(range(steps + 1), desc="distill", disable=not progress, file=sys.stderr)
    try:
        for step in bar:
            sol = layer(x0, images, log_alpha, labels)
            loss = F.cross_entropy(data["x_train"] @ sol["W"] + sol["b"], data["y_train"])
            x0 = {k: v.detach().clone() for k, v in sol.items()}  # warm start of the next solve
            forward = layer.diagnostics.forward
            train_loss, train_acc = metrics(x0, data["x_train"], data["y_train"])
            test_loss, test_acc = metrics(x0, data["x_test"], data["y_test"])
            row = {"step": step, "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss,
                   "test_acc": test_acc, "alpha": float(log_alpha.detach().exp()),
                   "inner_iters": forward.iterations if forward is not None else -1, "lr": opt.param_groups[0]["lr"]}
            rows.append(row)
            bar.set_postfix(loss=f"{train_loss:.4f}", test_acc=f"{test_acc:.3f}", refresh=False)
            if step < steps:  # the last row only measures the final images
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    finally:
        bar.close()
    return images.detach(), float(log_alpha.detach().exp()), rows


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m applications.hyperopt distill",
                                description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--init", default="means", choices=("means", "random"),
                   help="start from the class means of the training images or from N(0, 1) noise")
    p.add_argument("--outer-steps", type=positive_int, default=300, help="Adam steps on the images")
    p.add_argument("--outer-lr", type=float, default=0.02, help="Adam's first step (cosine-decayed to 0)")
    p.add_argument("--alpha", type=float, default=0.01, help="L2 strength of the inner problem (the start with --learn-alpha)")
    p.add_argument("--learn-alpha", action="store_true", help="learn log α with the images")
    p.add_argument("--grid", type=str, default="1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1,3e-1,1,3",
                   help="comma-separated L2 strengths the baselines are tuned on")
    p.add_argument("--draws", type=int, default=10, help="random draws of real images for the baselines")
    p.add_argument("--per-class", type=int, default=10, help="real images per class of the main baseline")
    p.add_argument("--inner-maxiter", type=positive_int, default=100, help="Newton-CG iterations per inner solve")
    p.add_argument("--limit", type=int, default=None, help="use only this many digits (a quick run)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="runs/hyperopt-distill", help="output folder")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None, *, log: Callable[[str], Any] = print) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    a = parser.parse_args(argv)

    def fail(msg: str) -> NoReturn:
        parser.exit(2, f"{parser.prog}: error: {msg}\n")

    try:
        grid = [float(g) for g in a.grid.split(",")]
    except ValueError:
        fail(f"--grid must be comma-separated numbers, got {a.grid!r}")
    if not all(g > 0 and math.isfinite(g) for g in grid):
        fail(f"--grid strengths must be finite and > 0, got {a.grid!r}")
    if a.outer_steps < 1 or a.draws < 1 or a.per_class < 1 or a.inner_maxiter < 1:
        fail("--outer-steps, --draws, --per-class and --inner-maxiter must be >= 1")
    if not (a.outer_lr > 0 and math.isfinite(a.outer_lr) and a.alpha > 0 and math.isfinite(a.alpha)):
        fail(f"--outer-lr and --alpha must be finite and > 0, got {a.outer_lr} and {a.alpha}")
    if a.limit is not None and a.limit < 4 * CLASSES:
        fail(f"--limit must be at least {4 * CLASSES}, got {a.limit}")
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    data = load(a.seed, a.limit)
    counts = torch.bincount(data["y_train"], minlength=CLASSES)
    if int(counts.min()) < a.per_class:
        fail(f"--per-class {a.per_class} exceeds the smallest class of the training set ({int(counts.min())} images)")
    out = Path(a.out)
    out = output_dir(parser, out)
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        log(line)

    t0 = time.perf_counter()
    d = data["x_train"].shape[1]
    say(f"digits: {len(data['y_train'])} train / {len(data['y_test'])} test, {d} pixels, {CLASSES} classes; "
        f"outputs in {out}")
    layer = make_layer(maxiter=a.inner_maxiter)

    # Baselines: real images, α tuned on real training images each fit has not seen.
    many = random_real(layer, data, a.per_class, a.draws, grid, a.seed + 1)
    one = random_real(layer, data, 1, a.draws, grid, a.seed + 2)
    means = class_means(data)
    means_alpha, means_fit = tuned_fit(layer, means, torch.arange(CLASSES), data["x_train"], data["y_train"], grid)
    full_alpha, full_fit = cross_validated_fit(layer, data["x_train"], data["y_train"], grid, 5, a.seed + 3)
    baselines = {f"random_{a.per_class}_per_class": many, "random_1_per_class": one,
                 "class_means": {"images": CLASSES, "alpha": means_alpha, "test_acc": metrics(means_fit, data["x_test"], data["y_test"])[1]},
                 "all_training_images": {"images": len(data["y_train"]), "alpha": full_alpha,
                                         "test_acc": metrics(full_fit, data["x_test"], data["y_test"])[1]}}
    say(f"baselines (α tuned on held-out training images): {a.per_class} random real images per class "
        f"{many['test_acc_mean']:.3f} ± {many['test_acc_std']:.3f} over {a.draws} draws; 1 per class "
        f"{one['test_acc_mean']:.3f} ± {one['test_acc_std']:.3f}; class means {baselines['class_means']['test_acc']:.3f}; "
        f"all {len(data['y_train'])} training images {baselines['all_training_images']['test_acc']:.3f}")

    init = means if a.init == "means" else torch.randn(CLASSES, d, dtype=DT, generator=torch.Generator().manual_seed(a.seed))
    say(f"distilling {CLASSES} images from the {'class means' if a.init == 'means' else 'N(0, 1) noise'}: "
        f"{a.outer_steps} Adam steps (lr {a.outer_lr:g}, cosine), α {a.alpha:g}{' learned' if a.learn_alpha else ' fixed'}")
    images, alpha, rows = distill(layer, data, init, a.alpha, steps=a.outer_steps, lr=a.outer_lr,
                                  learn_alpha=a.learn_alpha, progress=not a.no_progress)
    first, last = rows[0], rows[-1]
    seconds = time.perf_counter() - t0

    with open(out / "log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    results = {"command": "python -m applications.hyperopt distill " + shlex.join(argv),
               "config": {k: v for k, v in vars(a).items() if k not in ("no_progress", "out")},
               "train_images": len(data["y_train"]), "test_images": len(data["y_test"]),
               "distilled": {"images": CLASSES, "alpha": alpha, "test_acc": last["test_acc"], "test_loss": last["test_loss"],
                             "train_loss_start": first["train_loss"], "train_loss_end": last["train_loss"],
                             "train_acc": last["train_acc"], "test_acc_start": first["test_acc"]},
               "baselines": baselines, "target_met": last["test_acc"] > many["test_acc_mean"],
               "seconds": round(seconds, 1), "images": images.tolist()}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_images(images, means, out / "images.png")
    plot_accuracy(rows, baselines, a.per_class, out / "accuracy.png")

    say(f"outer (training) loss {first['train_loss']:.4f} -> {last['train_loss']:.4f}; "
        f"training accuracy {first['train_acc']:.3f} -> {last['train_acc']:.3f}")
    say("| training images of the logistic regression | test accuracy |")
    say("|---|---|")
    say(f"| {CLASSES} distilled (start: {a.init}) | {last['test_acc']:.3f} |")
    say(f"| {CLASSES} at the start of the distillation ({a.init}, α {a.alpha:g}) | {first['test_acc']:.3f} |")
    say(f"| {a.per_class * CLASSES} random real, {a.per_class} per class ({a.draws} draws, α tuned) | "
        f"{many['test_acc_mean']:.3f} ± {many['test_acc_std']:.3f} |")
    say(f"| {CLASSES} random real, 1 per class ({a.draws} draws, α tuned) | {one['test_acc_mean']:.3f} ± {one['test_acc_std']:.3f} |")
    say(f"| {CLASSES} class means (α {means_alpha:g} tuned) | {baselines['class_means']['test_acc']:.3f} |")
    say(f"| all {len(data['y_train'])} training images (α {full_alpha:g} tuned) | {baselines['all_training_images']['test_acc']:.3f} |")
    verdict = "beats" if results["target_met"] else "does not beat"
    say(f"distillation {verdict} {a.per_class} random real images per class; {seconds:.0f} s; "
        f"pictures: {out / 'images.png'}, {out / 'accuracy.png'}")
    say(f"test accuracy: {last['test_acc']:.3f} ({CLASSES} distilled images; {a.per_class} random real images per class: "
        f"{many['test_acc_mean']:.3f} ± {many['test_acc_std']:.3f}; 1 per class: {one['test_acc_mean']:.3f})")
    (out / "output.txt").write_text(f"$ {results['command']}\n" + "\n".join(lines) + "\n")
    return 0


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_images(images: torch.Tensor, means: torch.Tensor, path: Path) -> None:
    """Distilled images (top) above the class means (bottom), in the standardised pixel units
    the model sees, each on its own symmetric colour scale (red > 0 > blue)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, CLASSES, figsize=(CLASSES * 0.9, 2.3))
    try:
        for row, (name, imgs) in enumerate((("distilled", images), ("class mean", means))):
            for c in range(CLASSES):
                ax = axes[row, c]
                v = float(imgs[c].abs().max()) or 1.0
                ax.imshow(imgs[c].reshape(SIDE, SIDE).numpy(), cmap="RdBu_r", vmin=-v, vmax=v)
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(str(c), fontsize=9)
                if c == 0:
                    ax.set_ylabel(name, fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def plot_accuracy(rows: list[dict[str, Any]], baselines: dict[str, Any], per_class: int, path: Path) -> None:
    """Test accuracy of the distilled images against outer steps, with the baselines."""
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    try:
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["test_acc"] for r in rows], color="C0", label="10 distilled images")
        many = baselines[f"random_{per_class}_per_class"]
        m, s = many["test_acc_mean"], many["test_acc_std"]
        ax.axhline(m, color="C1", label=f"{per_class} random real / class (mean ± std)")
        ax.axhspan(m - s, m + s, color="C1", alpha=0.2)
        one = baselines["random_1_per_class"]
        ax.axhline(one["test_acc_mean"], color="C2", ls="--", label="1 random real / class (mean)")
        ax.axhline(baselines["all_training_images"]["test_acc"], color="k", ls=":", label="all training images")
        ax.set_xlabel("outer step")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(max(0.0, min(one["test_acc_mean"], min(r["test_acc"] for r in rows)) - 0.05), 1.0)
        ax.legend(fontsize=7, loc="lower right")
        ax2.plot(steps, [r["train_loss"] for r in rows], color="C0")
        ax2.set_yscale("log")
        ax2.set_xlabel("outer step")
        ax2.set_ylabel("outer loss (training cross-entropy)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
