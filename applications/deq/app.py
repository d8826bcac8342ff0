"""Train a deep-equilibrium classifier on scikit-learn's digits with ``bilevel.FixedPoint``.

    python -m applications.deq                                    # Anderson forward, exact (GMRES) backward
    python -m applications.deq --backward phantom --phantom-steps 5 --phantom-damping 0.8
    python -m applications.deq --method unrolled --unroll 30      # the weight-tied network, unrolled
    python -m applications.deq --out runs/deq --resume            # continue a stopped run exactly

The model and the data are in :mod:`applications.deq.model`. Each training step solves
``z* = tanh(W z* + U x + b)`` for a mini-batch with the chosen inner solver (``--solver``:
Anderson acceleration, Broyden, or plain iteration), classifies ``z*`` with a linear head,
and backpropagates through ``z*`` by the implicit function theorem with the chosen
backward (``--backward``): GMRES, BiCGSTAB or Broyden on the adjoint system ``(I − J)ᵀ w = v``
(exact), plain adjoint iteration ``w ← Jᵀ w + v`` to a tolerance (torchdeq's default, also
exact), or ``--phantom-steps`` damped adjoint steps (the phantom gradient, inexact). No
iteration of the forward solve is kept for the backward.

Writes to ``--out``: ``log.csv`` (one row per epoch: losses, accuracies, forward and
backward iterations, solves that missed their tolerance, seconds), ``config.json``,
``checkpoint.pt`` (atomic; every ``--checkpoint-every`` steps and at each epoch's end, with
the position inside the epoch, so ``--resume`` continues exactly), ``results.json``,
``curves.png`` (accuracy, loss and forward/backward iterations per epoch) and
``residuals.png`` (the residual of each inner solver against function evaluations at the
trained model). Progress is a tqdm bar; a solve that misses its tolerance is counted in
the log and reported at the end of its epoch, never silently dropped.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

import bilevel
from bilevel import linsolve, solvers

from ..cliargs import refuse_file_out
from ..imaml.checkpoint import (
    atomic_torch_save,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from ..imaml.rundir import RunLock, RunLockedError
from . import model as M

LOG_COLUMNS = (
    "epoch", "step", "seconds", "train_loss", "train_acc", "test_acc", "fwd_iters_mean", "fwd_iters_max",
    "fwd_not_converged", "bwd_iters_mean", "bwd_not_converged", "test_fwd_iters",
)
SOLVERS = ("anderson", "broyden", "iteration")
#: The relative residuals at which results.json counts each solver's function evaluations.
RESIDUAL_LEVELS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-8)
BACKWARDS = ("gmres", "bicgstab", "broyden", "iteration", "phantom")
#: What changes the computation: a resumed run must agree on all of these.
SEMANTIC = ("method", "width", "rho", "weight", "input_gain", "solver", "memory", "rtol", "maxiter", "backward", "backward_rtol",
            "backward_maxiter", "phantom_steps", "phantom_damping", "unroll", "lr", "batch_size", "seed", "data_seed")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m applications.deq", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out", default="runs/deq", help="run folder (default runs/deq)")
    a("--method", choices=("implicit", "unrolled"), default="implicit")
    a("--epochs", type=int, default=8)
    a("--batch-size", type=int, default=64)
    a("--lr", type=float, default=3e-3, help="Adam's learning rate")
    a("--width", type=int, default=100, help="size of z")
    a("--rho", type=float, default=0.95, help="spectral norm of the recurrent weight, in (0, 1)")
    a("--weight", choices=M.WEIGHTS, default="symmetric", help="parametrisation of the recurrent weight")
    a("--input-gain", type=float, default=0.3, help="scale of U's initialisation")
    a("--solver", choices=SOLVERS, default="anderson", help="forward (inner) solver")
    a("--memory", type=int, default=5, help="Anderson's or Broyden's memory")
    a("--rtol", type=float, default=1e-5, help="forward tolerance: ||f(z) - z|| <= rtol max(1, ||z||)")
    a("--maxiter", type=int, default=200, help="forward iteration cap")
    a("--backward", choices=BACKWARDS, default="gmres",
      help="gmres/bicgstab/broyden/iteration: exact adjoint to --backward-rtol; phantom: damped adjoint steps")
    a("--backward-rtol", type=float, default=1e-6)
    a("--backward-maxiter", type=int, default=200)
    a("--phantom-steps", type=int, default=5, help="k of the phantom gradient")
    a("--phantom-damping", type=float, default=0.8, help="τ of the phantom gradient, in (0, 1]")
    a("--unroll", type=int, default=30, help="iterations of the unrolled network (--method unrolled)")
    a("--seed", type=int, default=0)
    a("--data-seed", type=int, default=0, help="the train/test split")
    a("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a("--checkpoint-every", type=int, default=50, help="steps between checkpoints inside an epoch")
    a("--time-limit", type=float, default=None, help="stop (with a checkpoint) after this many training seconds")
    a("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    a("--overwrite", action="store_true", help="delete the run in --out and start again")
    a("--no-plots", action="store_true")
    return p


def validate(cfg: argparse.Namespace) -> None:
    checks = [
        (cfg.epochs >= 1, "--epochs must be >= 1"), (cfg.batch_size >= 1, "--batch-size must be >= 1"),
        (cfg.width >= 1, "--width must be >= 1"), (math.isfinite(cfg.input_gain) and cfg.input_gain > 0, "--input-gain must be a finite number > 0"), (0 < cfg.rho < 1, "--rho must be in (0, 1)"),
        (math.isfinite(cfg.lr) and cfg.lr > 0, "--lr must be a positive number"),
        (0 < cfg.rtol < 1, "--rtol must be in (0, 1)"), (0 < cfg.backward_rtol < 1, "--backward-rtol must be in (0, 1)"),
        (cfg.maxiter >= 1 and cfg.backward_maxiter >= 1, "--maxiter and --backward-maxiter must be >= 1"),
        (cfg.memory >= 1, "--memory must be >= 1"), (cfg.phantom_steps >= 1, "--phantom-steps must be >= 1"),
        (0 < cfg.phantom_damping <= 1, "--phantom-damping must be in (0, 1]"), (cfg.unroll >= 1, "--unroll must be >= 1"),
        (cfg.checkpoint_every >= 1, "--checkpoint-every must be >= 1"),
        (not (cfg.resume and cfg.overwrite), "--resume and --overwrite exclude each other"),
        (cfg.threads is None or cfg.threads >= 1, "--threads must be >= 1"),
        (cfg.time_limit is None or (math.isfinite(cfg.time_limit) and cfg.time_limit > 0),
         "--time-limit must be a finite number of seconds > 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


def make_layer(cfg: argparse.Namespace) -> bilevel.FixedPoint:
    """The implicit layer of a configuration: inner solver and backward by name."""
    inner = {
        "anderson": lambda: solvers.Anderson(m=cfg.memory, rtol=cfg.rtol, maxiter=cfg.maxiter),
        "broyden": lambda: solvers.Broyden(memory=cfg.memory, rtol=cfg.rtol, maxiter=cfg.maxiter),
        "iteration": lambda: solvers.FixedPointIteration(rtol=cfg.rtol, maxiter=cfg.maxiter),
    }[cfg.solver]()
    back = {
        "gmres": lambda: linsolve.GMRES(rtol=cfg.backward_rtol, maxiter=cfg.backward_maxiter),
        "bicgstab": lambda: linsolve.BiCGSTAB(rtol=cfg.backward_rtol, maxiter=cfg.backward_maxiter),
        "broyden": lambda: linsolve.Broyden(rtol=cfg.backward_rtol, maxiter=cfg.backward_maxiter),
        # Richardson on (I − Jᵀ) w = v with step 1 is the adjoint fixed-point iteration w ← Jᵀw + v.
        "iteration": lambda: linsolve.Neumann(alpha=1.0, rtol=cfg.backward_rtol, maxiter=cfg.backward_maxiter),
        # k damped steps w ← (1 − τ) w + τ (Jᵀ w + v) from w = 0: the phantom gradient (Geng et al. 2021).
        "phantom": lambda: linsolve.Neumann(alpha=cfg.phantom_damping, steps=cfg.phantom_steps),
    }[cfg.backward]()
    # Non-convergence is counted per step and reported per epoch (a warning per step would
    # flood a training); a NaN still raises.
    return bilevel.FixedPoint(M.block, solver=inner, linsolve=back, on_failure="ignore")


class Trainer:
    """One training run: parameters, optimiser, data order, log and checkpoints."""

    def __init__(self, cfg: argparse.Namespace, data: dict[str, torch.Tensor]) -> None:
        self.cfg, self.data = cfg, data
        self.out = Path(cfg.out)
        self.params = {k: v.requires_grad_() for k, v in M.init_params(cfg.width, seed=cfg.seed, input_gain=cfg.input_gain).items()}
        self.opt = torch.optim.Adam(self.params.values(), lr=cfg.lr)
        self.layer = make_layer(cfg) if cfg.method == "implicit" else None
        self.eval_layer = make_layer(cfg)  # the unrolled network is evaluated at its equilibrium too
        self.epoch, self.step_in_epoch, self.step, self.seconds = 0, 0, 0, 0.0
        self.sums: dict[str, float] = {}

    # -- the data order: a permutation per epoch from (seed, epoch), so a resume replays it
    def batches(self, epoch: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(1_000_003 * self.cfg.seed + epoch)
        perm = torch.randperm(len(self.data["y_train"]), generator=g)
        return list(perm.split(self.cfg.batch_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if self.layer is None:
            return M.unrolled_forward(self.params, x, c.rho, c.unroll, c.weight)
        return M.implicit_forward(self.layer, self.params, x, c.rho, c.weight)

    def train_step(self, idx: torch.Tensor) -> dict[str, float]:
        x, y = self.data["x_train"][idx], self.data["y_train"][idx]
        t0 = time.perf_counter()
        logits = M.classify(self.params, self.forward(x))
        loss = F.cross_entropy(logits, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        stats = {"loss": loss.item() * len(idx), "correct": float((logits.argmax(-1) == y).sum()), "n": len(idx)}
        if self.layer is not None:
            fwd, bwd = self.layer.diagnostics.forward, self.layer.diagnostics.backward
            stats |= {"fwd_iters": float(fwd.iterations), "fwd_fail": float(not fwd.success),
                      "bwd_iters": float(bwd.iterations), "bwd_fail": float(not bwd.success)}
        else:
            stats |= {"fwd_iters": float(self.cfg.unroll), "fwd_fail": 0.0, "bwd_iters": 0.0, "bwd_fail": 0.0}
        stats["seconds"] = time.perf_counter() - t0
        stats["fwd_iters_max"] = stats["fwd_iters"]
        return stats

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Test accuracy at the equilibrium (both methods), and the forward iterations it took."""
        c = self.cfg
        z = M.implicit_forward(self.eval_layer, self.params, self.data["x_test"], c.rho, c.weight)
        return M.accuracy(M.classify(self.params, z), self.data["y_test"]), float(self.eval_layer.diagnostics.forward.iterations)

    # -- checkpoints -----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "format": 1, "program": "applications.deq", "config": vars(self.cfg) | {"out": str(self.cfg.out)},
            "params": {k: v.detach().clone() for k, v in self.params.items()}, "optimizer": self.opt.state_dict(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "step": self.step, "seconds": self.seconds,
            "sums": dict(self.sums), "rng": capture_rng_state(),
        }

    def save(self) -> None:
        atomic_torch_save(self.state(), self.out / "checkpoint.pt")

    def load(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        if ckpt.get("program") != "applications.deq":
            raise ValueError(f"{str(path)!r} is not a checkpoint of applications.deq")
        changed = [k for k in SEMANTIC if ckpt["config"].get(k) != getattr(self.cfg, k)]
        if changed:
            raise ValueError(f"--resume with changed settings {changed}: the checkpoint has "
                             + ", ".join(f"{k}={ckpt['config'].get(k)!r}" for k in changed))
        with torch.no_grad():
            for k, v in ckpt["params"].items():
                self.params[k].copy_(v)
        self.opt.load_state_dict(ckpt["optimizer"])
        self.epoch, self.step_in_epoch, self.step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["step"]
        self.seconds, self.sums = ckpt["seconds"], dict(ckpt["sums"])
        restore_rng_state(ckpt["rng"])

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> bool:
        """Train until ``--epochs`` (True) or the time limit (False, with a checkpoint)."""
        c = self.cfg
        log_path = self.out / "log.csv"
        if not log_path.exists():
            with open(log_path, "w", newline="") as f:
                csv.writer(f).writerow(LOG_COLUMNS)
        n_batches = len(self.batches(0))
        bar = tqdm(total=c.epochs * n_batches, initial=self.epoch * n_batches + self.step_in_epoch,
                   desc=f"deq {c.method}", unit="step", dynamic_ncols=True, file=sys.stderr)
        try:
            while self.epoch < c.epochs:
                batches = self.batches(self.epoch)
                while self.step_in_epoch < len(batches):
                    if c.time_limit is not None and self.seconds >= c.time_limit:
                        self.save()
                        return False
                    s = self.train_step(batches[self.step_in_epoch])
                    for k, v in s.items():
                        self.sums[k] = max(self.sums.get(k, 0.0), v) if k == "fwd_iters_max" else self.sums.get(k, 0.0) + v
                    self.seconds += s["seconds"]
                    self.step_in_epoch += 1
                    self.step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{s['loss'] / s['n']:.3f}", fwd=int(s["fwd_iters"]), bwd=int(s["bwd_iters"]))
                    if self.step % c.checkpoint_every == 0:
                        self.save()
                self.end_epoch(log_path, len(batches))
        finally:
            bar.close()
        return True

    def end_epoch(self, log_path: Path, n_batches: int) -> None:
        s, n = self.sums, self.sums["n"]
        test_acc, test_iters = self.evaluate()
        row = {
            "epoch": self.epoch + 1, "step": self.step, "seconds": round(self.seconds, 3),
            "train_loss": s["loss"] / n, "train_acc": s["correct"] / n, "test_acc": test_acc,
            "fwd_iters_mean": s["fwd_iters"] / n_batches, "fwd_iters_max": s["fwd_iters_max"],
            "fwd_not_converged": int(s["fwd_fail"]), "bwd_iters_mean": s["bwd_iters"] / n_batches,
            "bwd_not_converged": int(s["bwd_fail"]), "test_fwd_iters": test_iters,
        }
        with open(log_path, "a", newline="") as f:
            csv.writer(f).writerow([f"{row[k]:.6g}" if isinstance(row[k], float) else row[k] for k in LOG_COLUMNS])
        missed = [f"{row[k]} of {n_batches} {what} solves missed their tolerance"
                  for k, what in (("fwd_not_converged", "forward"), ("bwd_not_converged", "backward")) if row[k]]
        tqdm.write(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}, test accuracy {test_acc:.4f}, "
                   f"forward iterations {row['fwd_iters_mean']:.1f} (max {row['fwd_iters_max']:.0f}), "
                   f"backward {row['bwd_iters_mean']:.1f}" + ("; " + "; ".join(missed) if missed else ""),
                   file=sys.stderr)
        self.epoch += 1
        self.step_in_epoch = 0
        self.sums = {}
        self.save()


def residual_curves(cfg: argparse.Namespace, params: dict[str, torch.Tensor], x: torch.Tensor,
                    maxiter: int = 150) -> dict[str, list[float]]:
    """Relative residual against function evaluations of each inner solver at these parameters.

    In float64, so that the curves show each solver's rate down to 1e-12 instead of
    flattening at float32's rounding level (about 1e-7).
    """
    p64 = {k: v.detach().double() for k, v in params.items()}
    W = M.recurrent_weight(p64["V"], cfg.rho, cfg.weight)
    inj = M.injection(p64, x.double())
    curves = {}
    tight = dict(rtol=1e-12, maxiter=maxiter)
    for name, solver in (("iteration", solvers.FixedPointIteration(**tight)),
                         ("anderson", solvers.Anderson(m=cfg.memory, **tight)),
                         ("broyden", solvers.Broyden(memory=cfg.memory, **tight))):
        fn, hist = M.residual_recorder(M.block)
        solver(fn, torch.zeros_like(inj), W, inj)
        curves[name] = hist
    return curves


def evaluations_to(history: Sequence[float], rtol: float) -> int | None:
    """Function evaluations until the relative residual first falls to ``rtol`` (None: never)."""
    return next((i + 1 for i, r in enumerate(history) if r <= rtol), None)


def plot(out: Path, curves: dict[str, list[float]], rtol: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    ep = [int(r["epoch"]) for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
    ax[0].plot(ep, [float(r["train_acc"]) for r in rows], "o-", label="train")
    ax[0].plot(ep, [float(r["test_acc"]) for r in rows], "s-", label="test")
    ax[0].set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax[0].legend()
    ax[1].plot(ep, [float(r["train_loss"]) for r in rows], "o-")
    ax[1].set(xlabel="epoch", ylabel="cross-entropy", title="training loss", yscale="log")
    ax[2].plot(ep, [float(r["fwd_iters_mean"]) for r in rows], "o-", label="forward (train, mean)")
    ax[2].plot(ep, [float(r["test_fwd_iters"]) for r in rows], "s-", label="forward (test set)")
    ax[2].plot(ep, [float(r["bwd_iters_mean"]) for r in rows], "^-", label="backward (mean)")
    ax[2].set(xlabel="epoch", ylabel="iterations", title="solver iterations per step")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, hist in curves.items():
        ax.semilogy(range(1, len(hist) + 1), hist, label=name)
    ax.axhline(rtol, color="grey", ls=":", label=f"training tolerance {rtol:g}")
    ax.set(xlabel="function evaluations", ylabel="||f(z) − z|| / ||f(z)||",
           title="inner solvers at the trained model (test set, float64)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "residuals.png", dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = make_parser().parse_args(argv)
    try:
        validate(cfg)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        out = refuse_file_out(cfg.out)
        if cfg.resume and not (out / "checkpoint.pt").exists():  # before the lock creates the folder
            raise ValueError(f"--resume: no checkpoint in {str(out)!r}")
        with RunLock(out):
            ckpt = out / "checkpoint.pt"
            if cfg.overwrite:
                for name in ("checkpoint.pt", "log.csv", "config.json", "results.json"):
                    (out / name).unlink(missing_ok=True)
            elif ckpt.exists() and not cfg.resume:
                raise ValueError(f"{str(out)!r} holds a run: pass --resume to continue it or --overwrite to replace it")
            elif cfg.resume and not ckpt.exists():
                raise ValueError(f"--resume: no checkpoint in {str(out)!r}")
            data = M.load_digits(cfg.data_seed)
            trainer = Trainer(cfg, data)
            if cfg.resume:
                trainer.load(ckpt)
                print(f"resumed from {ckpt}: epoch {trainer.epoch + 1}, step {trainer.step}", file=sys.stderr)
            else:
                torch.manual_seed(cfg.seed)
                (out / "config.json").write_text(json.dumps(vars(cfg), indent=2))
            try:
                finished = trainer.run()
            except KeyboardInterrupt:
                trainer.save()
                print(f"\ninterrupted: checkpoint at {ckpt}; continue with: python -m applications.deq --out {out} "
                      "--resume (and the same settings)", file=sys.stderr)
                return 130
            if not finished:
                print(f"time limit reached after {trainer.seconds:.1f} s of training; checkpoint at {ckpt} "
                      f"(continue with --resume)", file=sys.stderr)
                return 0
            test_acc, test_iters = trainer.evaluate()
            curves = residual_curves(cfg, trainer.params, data["x_test"])
            to_tol = {k: evaluations_to(h, cfg.rtol) for k, h in curves.items()}
            levels = {f"{t:g}": {k: evaluations_to(h, t) for k, h in curves.items()} for t in RESIDUAL_LEVELS}
            results = {"test_accuracy": test_acc, "test_forward_iterations": test_iters,
                       "training_seconds": round(trainer.seconds, 3), "steps": trainer.step,
                       "evaluations_to_rtol_at_trained_model": to_tol, "rtol": cfg.rtol,
                       "evaluations_to_residual_at_trained_model_float64": levels,
                       "config": {k: getattr(cfg, k) for k in SEMANTIC}}
            (out / "results.json").write_text(json.dumps(results, indent=2))
            if not cfg.no_plots:
                plot(out, curves, cfg.rtol)
            print("function evaluations to reach a relative residual at the trained model (test set, float64):")
            print("  residual  " + "  ".join(f"{k:>9}" for k in curves) + "  anderson/iteration")
            for t, row in levels.items():
                ratio = (f"{row['anderson'] / row['iteration']:.2f}" if row["anderson"] and row["iteration"] else "-")
                print(f"  {t:>8}  " + "  ".join(f"{(v if v is not None else 'never'):>9}" for v in row.values())
                      + f"  {ratio:>18}")
            print(f"saved {out / 'log.csv'}, {out / 'results.json'}" + ("" if cfg.no_plots else
                  f", {out / 'curves.png'}, {out / 'residuals.png'}"))
            print(f"test accuracy: {test_acc:.4f} ({cfg.method}, {trainer.step} steps, {trainer.seconds:.1f} s of training)")
            return 0
    except (ValueError, RunLockedError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
