"""Command line: ``python -m applications.imaml [train|evaluate|plot] ...``.

Each subcommand's parser names its handler (``set_defaults(func=...)``): :func:`main`
parses and dispatches, and turns the expected errors into one-line messages.

With no arguments: meta-train iMAML-GD on 5-shot sinusoid regression (generated, no
download) with the settings of :data:`DEFAULT_RUN` (1000 meta-steps) and evaluate on 600
test tasks, writing learning curves and fits (its time on the development machine: the
application's page, docs/applications/imaml.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..cliargs import nonneg_int, positive_float, positive_int, refuse_file_out
from . import plot
from .algorithms import ALGORITHMS
from .checkpoint import CHECKPOINT_NAME
from .config import resolve_config
from .distributed import setup_from_env, shutdown
from .elastic import plan_restart, restart_count
from .evaluate import evaluate_checkpoint
from .tasks import DATASETS
from .train import TrainingInterrupted, train

__all__ = ["DEFAULT_RUN", "build_parser", "main"]

#: The embedded default run (no arguments).
DEFAULT_RUN = dict(dataset="sinusoid", algorithm="imaml", shots=5, meta_steps=1000, meta_batch=16, outer_lr=3e-3,
                   device="cpu", out="runs/sinusoid-imaml", eval_every=100)
# device="cpu" even where CUDA exists: the 1.7k-parameter MLP is launch-bound on a GPU
# (the times: docs/applications/imaml.md, "Quick start").


def _defaults_help(what: int) -> str:
    """The per-algorithm, per-dataset default of the inner steps (0), the inner step size (1)
    or the backward's Krylov steps (2), read from the registry the configuration uses (a
    hand-written list went stale when the Omniglot defaults changed)."""
    parts = []
    for name, alg in ALGORITHMS.items():
        if what == 2 and not alg.implicit:
            continue
        cells = []
        for dataset, d in alg.inner_defaults.items():
            five, twenty = d.for_ways(5), d.for_ways(20)
            if what == 2:
                cells.append(f"{dataset} {d.cg_steps}")
            elif dataset == "sinusoid" or five[what] == twenty[what]:
                cells.append(f"{dataset} {five[what]:g}")
            else:
                cells.append(f"{dataset} {five[what]:g} ({twenty[what]:g} above 5-way)")
        parts.append(f"{name}: {', '.join(cells)}")
    return "; ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m applications.imaml",
        description="Few-shot meta-learning with implicit MAML (and MAML, first-order MAML, Reptile baselines). "
        "With no arguments: train iMAML-GD on sinusoid regression, evaluate it and draw its pictures (its time: the "
        "docs/applications/imaml.md, 'Quick start').",
    )
    sub = p.add_subparsers(dest="command", metavar="{train,evaluate,plot}")

    t = sub.add_parser("train", help="meta-train a model")
    g = t.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, required=True)
    g.add_argument("--data-root", default=None, help="data folder (Omniglot/Mini-ImageNet); env BILEVEL_OMNIGLOT / BILEVEL_MINIIMAGENET")
    g.add_argument("--download", action="store_true", help="Omniglot: download the official zips into --data-root if absent")
    g.add_argument("--ways", type=positive_int, default=None, help="classes per episode (default 5; ignored for sinusoid)")
    g.add_argument("--shots", type=positive_int, default=None, help="support examples per class (default 1; sinusoid 5)")
    g.add_argument("--queries", type=positive_int, default=None, help="query examples per class (default 15; sinusoid 10)")
    g.add_argument("--split-scheme", choices=("maml", "vinyals"), default=None, help="Omniglot character split (default maml)")
    g = t.add_argument_group("algorithm")
    g.add_argument("--algorithm", choices=tuple(ALGORITHMS), default="imaml")
    g.add_argument("--meta-steps", type=nonneg_int, default=None, help="meta-iterations (default 30000; sinusoid 70000)")
    g.add_argument("--meta-batch", type=positive_int, default=None, help="tasks per meta-iteration (default 32 Omniglot 5-way, 16 20-way / sinusoid, 4 Mini-ImageNet)")
    g.add_argument("--inner-steps", type=nonneg_int, default=None, help="inner GD/SGD steps, iMAML-HF: Newton iterations "
                   f"(default {_defaults_help(0)}; docs/applications/imaml.md, 'Algorithms and defaults')")
    g.add_argument("--inner-lr", type=positive_float, default=None, help=f"inner step size (default {_defaults_help(1)})")
    g.add_argument("--lam", type=positive_float, default=None, help="proximal weight λ of iMAML, initial value if learned (default: Omniglot 0.1, sinusoid 1, Mini-ImageNet 0.5; "
                   "2 with --recipe imaml-dev)")
    g.add_argument("--learn-lam", action="store_true", default=None, help="learn one λ per parameter tensor (iMAML)")
    g.add_argument("--lam-min", type=float, default=None, help="floor of a learned λ: λ = lam_min + softplus(ρ) (default 0.1)")
    g.add_argument("--lam-lr", type=positive_float, default=None, help="Adam lr of the λ parameters ρ (default 0.01)")
    g.add_argument("--cg-steps", type=positive_int, default=None, help="Krylov (CG/MINRES) iterations of the iMAML backward solve (default "
                   f"{_defaults_help(2)}; 5 with --recipe imaml-dev)")
    g.add_argument("--cg-tol", type=positive_float, default=None, help="relative CG tolerance (stop early; default dtype's)")
    g.add_argument("--linsolve", choices=("cg", "minres"), default=None,
                   help="Krylov solver of iMAML's backward (default minres for Omniglot/Mini-ImageNet, whose batch-norm Hessians are "
                   "indefinite; cg for sinusoid; cg is the paper's)")
    g.add_argument("--hvp", choices=("reverse", "forward"), default=None,
                   help="Hessian-vector products of the iMAML backward: reverse-over-reverse (default) or forward-over-reverse")
    g.add_argument("--recipe", choices=("proximal", "imaml-dev"), default=None,
                   help="iMAML-GD procedure: proximal (default: GD on support loss + λ/2‖φ−θ‖², exact implicit gradient) or "
                   "imaml-dev (the official code: plain SGD, one pull-back step, damped backward ((1+c)I + H/(λ+δ)), "
                   "evaluation without the proximal term, Adam eps 1e-3)")
    g.add_argument("--cg-damping", type=float, default=None, help="c of --recipe imaml-dev (default 1)")
    g.add_argument("--lam-damping", type=float, default=None, help="δ of --recipe imaml-dev (default 10)")
    g.add_argument("--batching", choices=("auto", "vmap", "loop"), default=None,
                   help="how iMAML runs the meta-batch: vmap over tasks (auto, default) or one task at a time (loop: less "
                   "memory, slower with few examples per task)")
    g.add_argument("--inner-optimizer", choices=("gd", "momentum", "nesterov", "adam"), default=None,
                   help="iMAML-GD's inner method: gd (default, the paper's), momentum (heavy ball) or nesterov with "
                   "--inner-momentum, or adam (step --inner-lr)")
    g.add_argument("--inner-momentum", type=float, default=None, help="momentum coefficient of --inner-optimizer momentum/nesterov (default 0.9)")
    g.add_argument("--compile", choices=("off", "default", "reduce-overhead"), default=None,
                   help="torch.compile each step of iMAML-GD's inner loop, health statistics included (default off; "
                   "reduce-overhead: CUDA graphs on a GPU); the first meta-step of each batch shape compiles")
    g.add_argument("--query-batching", choices=("auto", "vmap", "loop"), default=None,
                   help="how every algorithm runs its query pass over the tasks: vmap, a loop, or auto (default: the faster, "
                   "measured once per shape)")
    g.add_argument("--power-iters", type=nonneg_int, default=None,
                   help="Lanczos steps (bilevel.hessian_extremes) per meta-step estimating inner_lr·(H_max+λ) for the log (default 0: off)")
    g.add_argument("--hf-cg-steps", type=positive_int, default=None, help="at most this many CG iterations per Newton step of iMAML-HF, NewtonCG(linsolve=CG(maxiter=N)) (default 5)")
    g.add_argument("--outer-lr", type=positive_float, default=None, help="Adam learning rate of the meta-parameters (default 0.001)")
    g.add_argument("--adam-eps", type=positive_float, default=None, help="Adam eps of the outer optimiser (default 1e-8; 1e-3 with --recipe imaml-dev)")
    g.add_argument("--filters", type=positive_int, default=None, help="conv filters (default 64 Omniglot, 32 Mini-ImageNet)")
    g = t.add_argument_group("run")
    g.add_argument("--seed", type=nonneg_int, default=None, help="seed of the initialisation and the training tasks (default 0)")
    g.add_argument("--device", default=None, help="default cuda if available else cpu")
    g.add_argument("--dtype", choices=("float32", "float64"), default=None, help="default float32")
    g.add_argument("--out", default=None, help="output folder (default runs/<dataset>-<algorithm>-...)")
    g.add_argument("--checkpoint-every", type=positive_int, default=None, help="meta-steps between checkpoints (default 500)")
    g.add_argument("--time-limit", type=positive_float, default=None,
                   help="stop training after this many seconds (at a step boundary, with a checkpoint): a compute budget")
    g.add_argument("--time-budget", type=positive_float, default=None,
                   help="stop once the run has trained this many seconds (log.csv's elapsed_seconds: meta-steps only, "
                   "validation excluded, counted across --resume): equal-time comparisons of algorithms")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt exactly")
    g.add_argument("--overwrite", action="store_true", help="start over even if OUT/checkpoint.pt exists")
    g.add_argument("--evaluate", action="store_true", help="evaluate on the test episodes after training")
    g.add_argument("--eval-episodes", type=positive_int, default=None, help="test episodes (default 600)")
    g.add_argument("--eval-batch", type=positive_int, default=None, help="episodes per batched evaluation step")
    g.add_argument("--eval-seed", type=nonneg_int, default=None, help="seed of the test and validation episodes (default 0)")
    g.add_argument("--eval-every", type=nonneg_int, default=None,
                   help="validate every N meta-steps on the validation split (val.csv, best.pt); Omniglot then trains on the "
                   "training characters without the validation ones (default 0: off)")
    g.add_argument("--val-episodes", type=positive_int, default=None, help="validation episodes (default 200)")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: 1 for sinusoid, whose tiny MLP only loses from intra-op threads; "
                   "else torch's default)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_train_command)

    e = sub.add_parser("evaluate", help="evaluate a checkpoint on test episodes")
    e.add_argument("--checkpoint", required=True, help="path of a checkpoint.pt written by train; metrics.json goes beside it")
    e.add_argument("--episodes", type=positive_int, default=600, help="test episodes (default 600)")
    e.add_argument("--batch", type=positive_int, default=None, help="episodes per batched adaptation")
    e.add_argument("--device", default=None, help="default: the training device (CPU if CUDA is missing)")
    e.add_argument("--data-root", default=None, help="override the data folder stored in the checkpoint")
    e.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=_evaluate_command)
    plot.add_parser(sub)  # func: plot.run
    return p


_TRAIN_KEYS = (
    "dataset", "data_root", "ways", "shots", "queries", "split_scheme", "algorithm", "meta_steps", "meta_batch",
    "inner_steps", "inner_lr", "lam", "learn_lam", "lam_min", "lam_lr", "cg_steps", "cg_tol", "hf_cg_steps", "linsolve", "hvp",
    "recipe", "cg_damping", "lam_damping", "power_iters", "batching", "inner_optimizer", "inner_momentum", "compile", "query_batching", "adam_eps", "eval_every", "val_episodes",
    "outer_lr", "filters", "seed", "device", "dtype", "out", "checkpoint_every", "eval_episodes", "eval_batch",
    "eval_seed",
)


def _resume_config(args: argparse.Namespace) -> dict:
    """With --resume, options not given on the command line come from the checkpoint."""
    from .checkpoint import load_checkpoint
    from .config import default_out_dir

    kw = {k: getattr(args, k) for k in _TRAIN_KEYS}
    out = kw["out"]
    if out is None:
        probe = resolve_config(**kw)
        out = probe.out if probe.out else default_out_dir(args.dataset, args.algorithm, args.ways or 5, args.shots or 1)
    path = Path(out) / CHECKPOINT_NAME
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {str(path)!r}")
    saved = load_checkpoint(path)["config"]
    merged = {**saved, **{k: v for k, v in kw.items() if v is not None}}
    return merged


def main(argv: Sequence[str] | None = None, *, log: Callable[[str], None] = print) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv) if argv else None
    if args is not None and getattr(args, "func", None) is None:  # options but no command
        parser.print_help()
        return 2
    try:
        # The embedded default run ends like any train command on Ctrl-C: one line, exit 130.
        return _default_run(log) if args is None else int(args.func(args, log=log))
    except TrainingInterrupted as err:
        sys.stderr.write(f"{parser.prog}: {err}\n")
        return 130
    except KeyboardInterrupt:
        sys.stderr.write(f"{parser.prog}: interrupted\n")
        return 130
    except (ValueError, OSError, FloatingPointError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


def _train_command(args: argparse.Namespace, *, log: Callable[[str], None] = print) -> int:
    """``train``: meta-train (joining a torchrun process group if there is one), then with
    ``--evaluate`` evaluate the last checkpoint."""
    restart = restart_count()  # > 0: torchrun restarted the group after a failure (.elastic)
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite starts it over: pass one of them")
    try:
        kw = _resume_config(args) if args.resume else {k: getattr(args, k) for k in _TRAIN_KEYS}
    except (ValueError, OSError) as err:
        if restart:
            if os.environ.get("RANK", "0") != "0":
                raise SystemExit(2) from None  # rank 0 says why, in one line
            raise ValueError(f"torchrun restart {restart}: cannot resume: {err}; stopping") from None
        raise
    if args.download:
        _download(kw)
    cfg = resolve_config(**kw)
    refuse_file_out(cfg.out)  # before the run is announced
    _set_threads(args.threads, cfg.dataset, cfg.device)
    ctx = setup_from_env(cfg.device)  # torchrun: join the process group (else one process)
    resume, overwrite = args.resume, args.overwrite
    try:
        if not ctx.is_writer:
            log = _quiet  # rank 0 speaks for the run
        plan = plan_restart(Path(cfg.out) / CHECKPOINT_NAME, resume=resume, overwrite=overwrite,
                            checkpoint_every=cfg.checkpoint_every, ctx=ctx)  # None unless torchrun restarted the group
        if plan is not None:
            if plan.error is not None:
                if not ctx.is_writer:
                    raise SystemExit(2)  # rank 0 says why, in one line
                raise ValueError(plan.error)
            resume, overwrite = plan.resume, plan.overwrite
        procs = f", {ctx.world} processes" if ctx.enabled else ""
        log(f"training {cfg.algorithm} on {cfg.dataset} for {cfg.meta_steps} meta-steps "
            f"(meta-batch {cfg.meta_batch}, device {cfg.device}{procs}); outputs in {cfg.out}")
        if plan is not None and plan.message:
            log(plan.message)
        summary = train(cfg, resume=resume, overwrite=overwrite,
                        progress=not args.no_progress and ctx.is_writer, log=log, time_limit=args.time_limit,
                        dist_ctx=ctx, time_budget=args.time_budget)
        log(f"trained to step {summary['step']}; checkpoint {summary['checkpoint']}, log {summary['log']}")
        if args.evaluate and ctx.is_writer:
            evaluate_checkpoint(summary["checkpoint"], progress=not args.no_progress, log=log)
    finally:
        shutdown(ctx)
    return 0


def _evaluate_command(args: argparse.Namespace, *, log: Callable[[str], None] = print) -> int:
    """``evaluate``: a checkpoint on its test episodes (threads as its training set them)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    else:
        from .checkpoint import load_checkpoint

        saved = load_checkpoint(args.checkpoint)["config"]
        _set_threads(None, saved["dataset"], args.device or saved["device"])
    evaluate_checkpoint(
        args.checkpoint, episodes=args.episodes, batch_size=args.batch, device=args.device,
        data_root=args.data_root, progress=not args.no_progress, log=log,
    )
    return 0


def _quiet(_: str) -> None:
    pass


def _set_threads(threads: int | None, dataset: str, device: str) -> None:
    if threads is None and dataset == "sinusoid" and not device.startswith("cuda"):
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)


def _download(kw: dict) -> None:
    if kw.get("dataset") != "omniglot":
        raise ValueError("--download is only available for Omniglot (Mini-ImageNet has no official download)")
    root = kw.get("data_root") or os.environ.get("BILEVEL_OMNIGLOT")
    if root is None:
        raise ValueError("--download needs --data-root DIR (where to put the files)")
    from .data import download_omniglot
    from .data.omniglot import find_omniglot_sources

    os.makedirs(root, exist_ok=True)
    try:
        find_omniglot_sources(root)
    except FileNotFoundError:
        download_omniglot(root)
    kw["data_root"] = root


def _default_run(log: Callable[[str], None]) -> int:
    t0 = time.perf_counter()
    cfg = resolve_config(**DEFAULT_RUN)
    _set_threads(None, cfg.dataset, cfg.device)
    log("No arguments given: running the embedded default (see --help for the train/evaluate commands).")
    log(f"  dataset   : sinusoid regression (generated, no download), {cfg.shots} support / {cfg.queries} query points per task")
    log(f"  algorithm : iMAML-GD (λ = {cfg.learner.lam:g}, {cfg.learner.inner_steps} inner GD steps of {cfg.learner.inner_lr:g}, {cfg.learner.cg_steps} CG steps), "
        f"MLP 1-40-40-1, Adam lr {cfg.outer_lr:g}")
    log(f"  training  : {cfg.meta_steps} meta-steps x {cfg.meta_batch} tasks on {cfg.device} (a tiny MLP: faster on CPU than on a GPU), "
        f"then evaluation on {cfg.eval_episodes} test tasks")
    log(f"  outputs   : {cfg.out}/ (checkpoint.pt, best.pt, log.csv, val.csv, config.json, metrics.json, curves.png, "
        "fits.png); previous default run is overwritten")
    summary = train(cfg, overwrite=True, progress=True, log=log)
    rows = summary["last"]
    log(f"trained {summary['step']} meta-steps in {time.perf_counter() - t0:.0f} s; "
        f"last meta-batch query MSE {rows.get('query_mse', '?')}")
    curves = plot.plot_learning_curves([cfg.out], f"{cfg.out}/curves.png")
    fits = plot.plot_sinusoid_fits(summary["checkpoint"], f"{cfg.out}/fits.png")
    log(f"pictures: {curves} (learning curves), {fits} (adapted fits of 4 test tasks against the truth)")
    evaluate_checkpoint(summary["checkpoint"], progress=True, log=log)  # prints the result line last
    return 0
