"""Learn one L2 strength per feature of a multinomial logistic regression on real data.

    python -m applications.hyperopt l2                       # digits (its time: docs/applications/hyperopt.md)
    python -m applications.hyperopt l2 --dataset breast_cancer --outer-steps 40

Inner problem (W: d × C weights, b: C biases, ρ: d log-strengths)::

    W*(ρ), b*(ρ) = argmin  mean CE(X_train W + b, y_train) + ½ Σ_j exp(ρ_j) ‖W_j‖²

solved by ``bilevel.solvers.ScipyMinimize("L-BFGS-B")`` -- a solver outside PyTorch --
inside ``bilevel.Argmin``; the hypergradient of the validation loss ``mean CE(X_val W* +
b*, y_val)`` with respect to ρ comes from the implicit function theorem (CG on the
Hessian), and Adam updates ρ.  The baseline is the best single strength on a grid
(``--grid``), chosen by the same validation loss and solved by the same solver; both are
then reported on train, validation and test.  Data: scikit-learn's bundled sets (no
download), standardised with the training statistics, split train/val/test 50/25/25 with
a fixed seed.  Writes ``log.csv``, ``results.json`` and ``strengths.png`` (for digits the
learned strengths as the 8×8 image they belong to) to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import bilevel
from bilevel.linsolve import CG
from bilevel.solvers import ScipyMinimize

from ..cliargs import OneLineParser, nonneg_int, output_dir, positive_int

DT = torch.float64
#: The smallest --limit: 50/25/25 splits of fewer leave classes out of the validation or test set.
MIN_LIMIT = 100


def load(dataset: str, seed: int, limit: int | None = None) -> dict[str, torch.Tensor]:
    """Standardised train/val/test tensors of a scikit-learn data set (50/25/25, seeded)."""
    from sklearn import datasets

    loaders = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer}
    if dataset not in loaders:
        raise ValueError(f"--dataset must be one of {sorted(loaders)}, got {dataset!r}")
    x, y = loaders[dataset](return_X_y=True)
    idx = np.random.default_rng(seed).permutation(len(y))
    if limit is not None:
        idx = idx[:limit]
    n = len(idx)
    tr, va = idx[: n // 2], idx[n // 2 : (3 * n) // 4]
    te = idx[(3 * n) // 4 :]
    mu, sd = x[tr].mean(0), x[tr].std(0)
    sd = np.where(sd > 0, sd, 1.0)  # constant pixels (digits' borders): left at 0
    z = (x - mu) / sd
    out = {}
    for name, part in (("train", tr), ("val", va), ("test", te)):
        out[f"x_{name}"] = torch.tensor(z[part], dtype=DT)
        out[f"y_{name}"] = torch.tensor(y[part], dtype=torch.long)
    out["classes"] = torch.tensor(int(y.max()) + 1)
    return out


def inner_objective(params: dict[str, torch.Tensor], rho: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy + ½ Σ_j exp(ρ_j) ‖W_j‖² (the biases are not penalised)."""
    logits = x @ params["W"] + params["b"]
    return F.cross_entropy(logits, y) + 0.5 * (torch.exp(rho)[:, None] * params["W"] ** 2).sum()


def metrics(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = x @ params["W"] + params["b"]
        return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).double().mean())


def make_layer(maxiter: int) -> bilevel.Argmin:
    # L-BFGS-B from scipy (outside PyTorch; its gradients come from autograd), CG backward.
    solver = ScipyMinimize("L-BFGS-B", options={"maxiter": maxiter, "gtol": 1e-9, "ftol": 0.0})
    return bilevel.Argmin(inner_objective, solver=solver, linsolve=CG(rtol=1e-10, maxiter=2000))


def evaluate(params: dict[str, torch.Tensor], data: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    for part in ("train", "val", "test"):
        loss, acc = metrics(params, data[f"x_{part}"], data[f"y_{part}"])
        out[f"{part}_loss"], out[f"{part}_acc"] = loss, acc
    return out


def grid_search(data: dict[str, torch.Tensor], grid: Sequence[float], layer: bilevel.Argmin) -> tuple[float, dict, dict]:
    """The single strength α (all ρ_j = log α) with the lowest validation loss."""
    d, c = data["x_train"].shape[1], int(data["classes"])
    best: tuple[float, float, dict[str, torch.Tensor]] | None = None
    x0 = {"W": torch.zeros(d, c, dtype=DT), "b": torch.zeros(c, dtype=DT)}
    for a in grid:
        with torch.no_grad():
            sol = layer(x0, torch.full((d,), math.log(a), dtype=DT), data["x_train"], data["y_train"])
        val = metrics(sol, data["x_val"], data["y_val"])[0]
        if best is None or val < best[1]:
            best = (a, val, {k: v.detach() for k, v in sol.items()})
    assert best is not None
    return best[0], best[2], evaluate(best[2], data)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m applications.hyperopt l2", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--dataset", default="digits", choices=("digits", "breast_cancer"))
    p.add_argument("--outer-steps", type=positive_int, default=60, help="Adam steps on the log-strengths")
    p.add_argument("--outer-lr", type=float, default=0.1)
    p.add_argument("--inner-maxiter", type=positive_int, default=500, help="L-BFGS-B iterations per inner solve")
    p.add_argument("--grid", type=str, default="1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1,3e-1,1",
                   help="comma-separated single strengths for the baseline")
    p.add_argument("--limit", type=int, default=None, help="use only this many examples (a quick run)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="output folder (default runs/hyperopt-<dataset>)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None, *, log: Any = print) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        grid = [float(g) for g in a.grid.split(",")]
    except ValueError:
        parser.exit(2, f"{parser.prog}: error: --grid must be comma-separated numbers, got {a.grid!r}\n")
    if not (a.outer_steps >= 1 and a.outer_lr > 0 and math.isfinite(a.outer_lr) and all(g > 0 and math.isfinite(g) for g in grid)):
        parser.exit(2, f"{parser.prog}: error: --outer-steps must be >= 1 and --outer-lr and the grid finite and > 0\n")
    if a.limit is not None and a.limit < MIN_LIMIT:
        parser.error(f"--limit must be at least {MIN_LIMIT} (a quarter of them is the test set, and every split "
                     f"needs examples of each class), got {a.limit}")
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    out = Path(a.out or f"runs/hyperopt-{a.dataset}")
    out = output_dir(parser, out)
    data = load(a.dataset, a.seed, a.limit)
    d, c = data["x_train"].shape[1], int(data["classes"])
    log(f"{a.dataset}: {len(data['y_train'])} train / {len(data['y_val'])} validation / {len(data['y_test'])} test, "
        f"{d} features, {c} classes; outputs in {out}")
    layer = make_layer(a.inner_maxiter)

    alpha, grid_params, grid_res = grid_search(data, grid, layer)
    log(f"grid: best single strength {alpha:g} (validation loss {grid_res['val_loss']:.4f})")

    # Per-feature log-strengths, started at the grid's best, learned on the validation loss.
    rho = torch.full((d,), math.log(alpha), dtype=DT, requires_grad=True)
    opt = torch.optim.Adam([rho], lr=a.outer_lr)
    x0 = {k: v.clone() for k, v in grid_params.items()}  # warm start from the previous solution
    rows = []
    bar = tqdm(range(a.outer_steps), desc="hyper-steps", disable=a.no_progress, file=sys.stderr)
    try:
        for step in bar:
            sol = layer(x0, rho, data["x_train"], data["y_train"])
            x0 = {k: v.detach().clone() for k, v in sol.items()}
            # One row describes one state: the solution and the strengths it was solved with
            # (before this step's update of ρ).
            res = evaluate(x0, data)
            rows.append({"step": step, **{k: f"{v:.6g}" for k, v in res.items()},
                         "strength_min": f"{float(torch.exp(rho.detach()).min()):.4g}",
                         "strength_max": f"{float(torch.exp(rho.detach()).max()):.4g}"})
            val_loss = F.cross_entropy(data["x_val"] @ sol["W"] + sol["b"], data["y_val"])
            opt.zero_grad()
            val_loss.backward()
            opt.step()
            bar.set_postfix(val=f"{res['val_loss']:.4f}", refresh=False)
    finally:
        bar.close()
    with torch.no_grad():
        final = layer(x0, rho.detach(), data["x_train"], data["y_train"])
    learned = evaluate({k: v.detach() for k, v in final.items()}, data)
    with open(out / "log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    results = {"dataset": a.dataset, "grid_best_strength": alpha, "grid": grid_res, "learned": learned,
               "outer_steps": a.outer_steps, "strengths": torch.exp(rho.detach()).tolist(),
               "val_loss_start": grid_res["val_loss"], "val_loss_end": learned["val_loss"]}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_strengths(torch.exp(rho.detach()), a.dataset, alpha, out / "strengths.png")
    log("| | train loss | train acc | val loss | val acc | test loss | test acc |")
    log("|---|---|---|---|---|---|---|")
    for name, r in ((f"best single strength {alpha:g} (grid)", grid_res), ("learned per-feature strengths", learned)):
        log(f"| {name} | {r['train_loss']:.4f} | {r['train_acc']:.4f} | {r['val_loss']:.4f} | {r['val_acc']:.4f} | "
            f"{r['test_loss']:.4f} | {r['test_acc']:.4f} |")
    better = "lower" if learned["test_loss"] < grid_res["test_loss"] else "not lower"
    log(f"test loss with the learned strengths is {better} than with the best single strength "
        f"({learned['test_loss']:.4f} vs {grid_res['test_loss']:.4f}); picture: {out / 'strengths.png'}")
    return 0


def plot_strengths(strengths: torch.Tensor, dataset: str, alpha: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.6) if dataset == "digits" else (7, 3))
    try:
        if dataset == "digits":
            im = ax.imshow(torch.log10(strengths).reshape(8, 8).numpy(), cmap="viridis")
            fig.colorbar(im, ax=ax, label="log10 strength")
            ax.set_title(f"learned L2 strength per pixel\n(grid best: {alpha:g})")
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            ax.bar(range(len(strengths)), strengths.numpy())
            ax.axhline(alpha, color="k", lw=1, ls="--", label=f"grid best {alpha:g}")
            ax.set_yscale("log")
            ax.set_xlabel("feature")
            ax.set_ylabel("L2 strength")
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
