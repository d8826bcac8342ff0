"""Evaluation on fixed, seeded test episodes with the trained inner procedure.

For each of ``N`` test episodes (episode indices ``0 .. N-1`` of the test split's sampler
seeded with ``eval_seed``, so every checkpoint sees the same episodes) the meta-parameters
are adapted to the support set exactly as in training — iMAML: the proximal problem with
the same λ and inner solver; MAML / first-order MAML / Reptile: the same inner SGD
steps — and the query accuracy (classification) or MSE (sinusoid) is measured.  Episodes
go through in batches (one batched computation per batch).  Reported: the mean and the
half-width of the normal 95% confidence interval, ``1.96 · s / √N`` with ``s`` the
sample standard deviation over episodes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .checkpoint import load_checkpoint
from .config import RunConfig, check_device, default_device
from .learner import load_learner
from .tasks import make_task_source

__all__ = ["evaluate_checkpoint", "format_result"]


def format_result(metric: str, mean: float, ci: float, episodes: int) -> str:
    """``accuracy: 0.9912 ± 0.0031 (95% CI, 600 episodes)`` (or ``mse: ...``)."""
    return f"{metric}: {mean:.4f} ± {ci:.4f} (95% CI, {episodes} episodes)"


def evaluate_episodes(learner: Any, theta: dict, rho: dict, source: Any, n: int, batch_size: int, cfg: RunConfig, *,
                      progress: bool = False, desc: str = "evaluate",
                      log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Adapt to episodes ``0 .. n-1`` of ``source`` (fixed, index-addressed) in batches and
    return the mean metric, its 95% CI half-width (normal approximation), std and mean loss."""
    values: list[torch.Tensor] = []
    losses: list[torch.Tensor] = []
    bar = tqdm(total=n, desc=desc, unit="episode", disable=not progress, file=sys.stderr, dynamic_ncols=True, leave=False)
    t0 = time.perf_counter()
    try:
        for start in range(0, n, batch_size):
            idx = range(start, min(n, start + batch_size))
            batch = source.batch(idx).to(cfg.device, cfg.torch_dtype)
            loss, metric = learner.evaluate(theta, rho, batch)
            values.append(metric.detach().double().cpu())
            losses.append(loss.detach().double().cpu())
            bar.update(len(idx))
            if log is not None and start == 0 and n > len(idx):
                # After the first batch: what a long evaluation will take, at this pace.
                per = (time.perf_counter() - t0) / len(idx)
                if per * n > 30:
                    log(f"evaluating {n} episodes: about {_duration(per * n)} at {1 / per:.1f} episodes/s")
    finally:
        bar.close()
    vals = torch.cat(values)
    std = float(vals.std(unbiased=True)) if n > 1 else 0.0
    return {"mean": float(vals.mean()), "ci95": 1.96 * std / math.sqrt(n), "std": std, "loss": float(torch.cat(losses).mean())}


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def evaluate_checkpoint(
    checkpoint: str,
    *,
    episodes: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    data_root: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate a checkpoint; write ``metrics.json`` beside it; print the result line last.

    Args:
        checkpoint: path of a ``checkpoint.pt`` written by training.
        episodes: number of test episodes (default: the run's ``eval_episodes``, 600).
        batch_size: episodes per batched adaptation (default: the run's ``eval_batch``).
        device: override the device (default: the run's, or CPU if CUDA is missing).
        data_root: override the data folder recorded in the checkpoint.
    """
    path = Path(checkpoint)
    ckpt = load_checkpoint(path)
    saved = ckpt["config"]
    if device is not None:
        check_device(device)  # an explicit request must be honoured or refused, never replaced
    dev = device or saved["device"]
    if dev.startswith("cuda") and not torch.cuda.is_available():
        dev = default_device()
    cfg = RunConfig.from_dict({**saved, "device": dev, "data_root": data_root if data_root is not None else saved["data_root"]})
    n = int(episodes if episodes is not None else cfg.eval_episodes)
    bs = int(batch_size if batch_size is not None else cfg.eval_batch)
    if n < 1 or bs < 1:
        raise ValueError(f"episodes and batch size must be >= 1, got {n} and {bs}")

    source = make_task_source(
        cfg.dataset, "test", ways=cfg.ways, shots=cfg.shots, queries=cfg.queries, seed=cfg.eval_seed,
        data_root=cfg.data_root, split_scheme=cfg.split_scheme,
    )
    learner, theta, rho = load_learner(cfg, source.image_shape, ckpt)

    metric_name = "accuracy" if cfg.task == "classification" else "mse"
    t0 = time.perf_counter()
    stats = evaluate_episodes(learner, theta, rho, source, n, bs, cfg, progress=progress, desc=f"evaluate {cfg.algorithm}",
                              log=log)
    mean, ci, std = stats["mean"], stats["ci95"], stats["std"]
    seconds = time.perf_counter() - t0
    result = {
        "metric": metric_name,
        "mean": mean,
        "ci95": ci,
        "std": std,
        "episodes": n,
        "query_loss_mean": stats["loss"],
        "checkpoint": str(path),
        "step": int(ckpt["step"]),
        "dataset": cfg.dataset,
        "algorithm": cfg.algorithm,
        "ways": cfg.ways,
        "shots": cfg.shots,
        "queries": cfg.queries,
        "eval_seed": cfg.eval_seed,
        "split": "test",
        "seconds": seconds,
        "device": cfg.device,
        "config": cfg.to_dict(),
        "line": format_result(metric_name, mean, ci, n),
    }
    out = path.parent / "metrics.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    log(f"evaluated {path} (step {result['step']}) on {n} test episodes in {seconds:.1f} s; wrote {out}")
    log(result["line"])
    return result
