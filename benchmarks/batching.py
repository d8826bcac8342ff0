"""How a batch of tasks runs: ``batched="vmap"`` against ``batched="loop"`` (the CPU default).

    python -m benchmarks.batching [--ways 5 --shots 1 --meta-batch 8 --filters 64 --rounds 3 --threads 1]

One iMAML-GD meta-gradient of the few-shot application (Omniglot-shaped random episodes,
so no data set is needed; the 4-block conv net with batch norm, 16 GD steps of 0.1 on the
proximal objective, λ = 0.1, 5 MINRES steps) with each strategy.  Every measurement is a
fresh process (so that its peak resident memory is its own), the strategies alternate
round by round (``vmap, loop, vmap, loop, ...``: shared-machine noise hits both), and the
table gives the median seconds per meta-step over the rounds, max/min, the peak-RSS growth
over the process's state before the first meta-step, and the ratio loop / vmap.  Writes
``benchmarks/results/batching.csv`` and ``.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

STRATEGIES = ("vmap", "loop")


def _one(args: argparse.Namespace) -> None:
    """Child process: ``--steps`` meta-gradients with one strategy; prints one JSON line."""
    import torch

    from applications.imaml.algorithms import LearnerConfig, MetaLearner
    from applications.imaml.models import build_model
    from applications.imaml.tasks import TaskBatch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model("omniglot", args.ways, filters=args.filters, image_shape=(1, 28, 28))
    learner = MetaLearner(model, LearnerConfig(algorithm="imaml", lam=0.1, inner_steps=16, inner_lr=0.1,
                                               cg_steps=5, linsolve="minres"))
    theta = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()}
    B, n_s, n_q = args.meta_batch, args.ways * args.shots, args.ways * 15
    g = torch.Generator().manual_seed(1)
    batch = TaskBatch(torch.rand(B, n_s, 1, 28, 28, generator=g), torch.arange(args.ways).repeat_interleave(args.shots).expand(B, -1).clone(),
                      torch.rand(B, n_q, 1, 28, 28, generator=g), torch.arange(args.ways).repeat_interleave(15).expand(B, -1).clone())
    import bilevel

    original = bilevel.Proximal.__call__

    def call(self, *a, **kw):  # type: ignore[no-untyped-def]
        if kw.get("batched"):  # the application asks for batched=True ("auto"): force the strategy
            kw["batched"] = args.strategy
        return original(self, *a, **kw)

    bilevel.Proximal.__call__ = call  # type: ignore[method-assign]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        learner.meta_gradient(theta, {}, batch)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"strategy": args.strategy, "times": times, "rss_growth_mb": (peak - base) / 1024.0}))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.batching", description=__doc__.splitlines()[0])
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--filters", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="processes per strategy, alternating")
    p.add_argument("--steps", type=int, default=2, help="meta-steps per process (the first is a warm-up)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--strategy", choices=STRATEGIES, help=argparse.SUPPRESS)  # child mode
    a = p.parse_args(argv)
    if a.strategy:
        _one(a)
        return 0
    runs: dict[str, list[dict]] = {s: [] for s in STRATEGIES}
    for r in range(a.rounds):
        for s in STRATEGIES:
            cmd = [sys.executable, "-m", "benchmarks.batching", "--strategy", s, "--ways", str(a.ways), "--shots", str(a.shots),
                   "--meta-batch", str(a.meta_batch), "--filters", str(a.filters), "--steps", str(a.steps),
                   "--threads", str(a.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            runs[s].append(json.loads(out))
            print(f"round {r + 1} {s}: {runs[s][-1]['times']}", flush=True)
    rows = []
    for s in STRATEGIES:
        t = [x for run in runs[s] for x in run["times"][1:]] or [x for run in runs[s] for x in run["times"]]
        mem = statistics.median(run["rss_growth_mb"] for run in runs[s])
        rows.append({"strategy": s, "median_s": statistics.median(t), "max_over_min": max(t) / min(t), "rss_growth_mb": mem,
                     "samples": len(t)})
    v, lo = rows[0], rows[1]
    print(f"\n{a.ways}-way {a.shots}-shot, meta-batch {a.meta_batch}, {a.filters} filters, {a.threads} thread(s)")
    print("| strategy | median s / meta-step | max/min | peak RSS growth MiB |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['strategy']} | {r['median_s']:.3f} | {r['max_over_min']:.2f} | {r['rss_growth_mb']:.0f} |")
    print(f"loop / vmap: time {lo['median_s'] / v['median_s']:.2f}, memory {lo['rss_growth_mb'] / max(v['rss_growth_mb'], 1e-9):.2f}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"batching_{a.ways}w{a.shots}s"
    with open(out / f"{tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.2))
    try:
        names = [r["strategy"] for r in rows]
        ax1.bar(names, [r["median_s"] for r in rows], color=["C0", "C1"])
        ax1.set_ylabel("s / meta-step (median)")
        ax2.bar(names, [r["rss_growth_mb"] for r in rows], color=["C0", "C1"])
        ax2.set_ylabel("peak RSS growth (MiB)")
        fig.suptitle(f"iMAML meta-step, {a.ways}-way {a.shots}-shot, meta-batch {a.meta_batch}, CPU {a.threads} thread(s)")
        fig.tight_layout()
        fig.savefig(out / f"{tag}.png", dpi=110)
    finally:
        plt.close(fig)
    print(f"wrote {out / (tag + '.csv')} and {out / (tag + '.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
