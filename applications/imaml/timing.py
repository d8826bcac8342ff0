"""Meta-step timing per algorithm: ``python -m applications.imaml.timing --data-root DIR``.

Builds the same learner as ``train`` (defaults of :func:`~.config.resolve_config` for the
dataset / ways / shots), runs ``--warmup`` untimed meta-steps and ``--steps`` timed ones
(meta-gradient + Adam step, data sampling excluded) per algorithm, and prints one line
per algorithm: median and mean seconds per meta-step and peak memory (CUDA: peak
allocated during the timed steps; CPU: process peak RSS so far).  Nothing is written.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from .algorithms import ALGORITHMS
from .config import resolve_config
from .learner import build_learner, set_meta_gradients
from .runlog import peak_memory_mb
from .tasks import make_task_source


def setup(algorithm: str, source: Any = None, **kw: Any) -> tuple[Any, Any, Any, Any, Any, torch.optim.Optimizer]:
    """``(config, task source, learner, θ, ρ, Adam)`` built as ``train`` builds them, for
    timing; ``source``: a training task source to reuse (data loaded once for several
    algorithms)."""
    cfg = resolve_config(algorithm=algorithm, out="/dev/null", **kw)
    if source is None:
        source = make_task_source(cfg.dataset, "train", ways=cfg.ways, shots=cfg.shots, queries=cfg.queries,
                                  seed=cfg.seed, data_root=cfg.data_root, split_scheme=cfg.split_scheme)
    learner, theta, rho = build_learner(cfg, source.image_shape)
    opt = torch.optim.Adam(list(theta.values()) + list(rho.values()), lr=cfg.outer_lr)
    return cfg, source, learner, theta, rho, opt


def time_algorithm(algorithm: str, steps: int, warmup: int, **kw: Any) -> dict[str, object]:
    cfg, source, learner, theta, rho, opt = setup(algorithm, **kw)
    dev = torch.device(cfg.device)
    batches = [source.sample(cfg.meta_batch).to(dev, cfg.torch_dtype) for _ in range(warmup + steps)]
    times = []
    for i, batch in enumerate(batches):
        if i == warmup and dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        res = learner.meta_gradient(theta, rho, batch)
        set_meta_gradients(theta, rho, res)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {
        "algorithm": algorithm,
        "median_s": statistics.median(times),
        "mean_s": statistics.fmean(times),
        "steps": steps,
        "peak_mem_mb": peak_memory_mb(dev),
        "meta_batch": cfg.meta_batch,
        "inner_steps": cfg.learner.inner_steps,
        "cg_steps": cfg.learner.cg_steps if algorithm.startswith("imaml") else None,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "loss": float(res.loss),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m applications.imaml.timing", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="omniglot", choices=("sinusoid", "omniglot", "miniimagenet"))
    p.add_argument("--data-root", default=None)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--meta-batch", type=int, default=None)
    p.add_argument("--filters", type=int, default=None)
    p.add_argument("--algorithms", default=",".join(ALGORITHMS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--hvp", default=None, choices=("reverse", "forward"))
    p.add_argument("--linsolve", default=None, choices=("cg", "minres"))
    p.add_argument("--json", default=None, help="also write the results to this file")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    results = []
    for alg in a.algorithms.split(","):
        r = time_algorithm(alg, a.steps, a.warmup, dataset=a.dataset, data_root=a.data_root, ways=a.ways, shots=a.shots,
                           meta_batch=a.meta_batch, filters=a.filters, device=a.device,
                           **{k: v for k, v in (("hvp", a.hvp), ("linsolve", a.linsolve)) if v is not None})
        results.append(r)
        print(f"{alg:9s} {r['median_s']:.3f} s/meta-step (median of {a.steps}; mean {r['mean_s']:.3f}), "
              f"meta-batch {r['meta_batch']}, inner steps {r['inner_steps']}, peak mem {r['peak_mem_mb']:.0f} MiB, "
              f"{r['device']}, {r['threads']} threads", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
