"""The iMAML paper's Figure 2b: seconds and peak memory per meta-step against the number of
inner steps K, for MAML (unrolled), first-order MAML and iMAML (``bilevel.Proximal``).

    python -m benchmarks.fig2b [--ks 1,5,10,25,50,100] [--rounds 3] [--meta-batch 1] [--threads 1]
    python -m benchmarks.fig2b --quick        # 8 filters, K in {1, 4}: the smoke test
    python benchmarks/fig2b.py ...            # the same, run as a file

Rajeswaran et al. (2019), Fig. 2b: MAML's memory grows linearly with K (it keeps the graph
of every inner step) and so does its time; first-order MAML and iMAML keep nothing of the
inner loop, so their memory does not depend on K and their time grows only by the cost of
the extra gradient steps.  Here on the paper's Omniglot net (4 blocks of conv3×3 with 64
filters, batch norm on batch statistics, ReLU, 2×2 max-pooling; linear head), 5-way
1-shot with 15 query images per class, random Omniglot-shaped images (fixed seed).

* ``maml``   — K steps of gradient descent (lr 0.1) on the support loss, unrolled with
  ``torch.autograd.grad(..., create_graph=True)``; meta-gradient by reverse mode through them.
* ``fomaml`` — the same K steps without a graph; meta-gradient = the query gradient there.
* ``imaml``  — ``bilevel.Proximal`` built by ``metastep.make_layer`` (λ = 2,
  ``GradientDescent(lr=0.1, steps=K)`` on the proximal objective, ``CG(steps=5)``: a fixed
  budget of 5 iterations); meta-gradient by ``torch.autograd.grad``.

With ``--meta-batch B > 1`` every method takes the tasks one at a time (one backward per
task, gradients summed), so that the memory columns compare the methods, not batching
strategies (``benchmarks/metastep.py`` compares those).

*Time*: one process; after ``--warmup`` untimed rounds, every round times one meta-step
of every (K, method) in turn (interleaved step by step), garbage collector off while
timing; medians over ``--rounds`` and max/min (flagged ``!`` above 1.5).  *Memory*: a fresh
subprocess per (method, K) (glibc ``MALLOC_MMAP_THRESHOLD_=65536``, so freed tensors return
to the OS): ``steady`` = peak RSS during ``--mem-steps`` meta-steps after a warm-up step,
over the resident size just before them (peak reset with ``/proc/self/clear_refs``);
``1st step`` = the same for the warm-up step itself (includes one-off costs: the first
``torch.func`` transform of a process imports a large part of torch, which iMAML pays
through ``bilevel`` and the MAMLs, written with ``torch.autograd``, do not; its size:
``benchmarks/README.md``).  The
summary gives iMAML's steady memory max/min over K (the target: flat within 5 %) and
MAML's growth.  Writes ``fig2b.csv`` and ``fig2b.png`` (time and memory against K) to
``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (or loaded by path): make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch import Tensor

from benchmarks.metastep import (
    SETTINGS,
    FewShotProblem,
    add_run_options,
    int_list,
    make_layer,
    parse_run_args,
    run_memory_child,
    step_memory,
)

METHODS = ("maml", "fomaml", "imaml")
KS = (1, 5, 10, 25, 50, 100)
LAM, INNER_LR, CG_STEPS = 2.0, 0.1, 5
WAYS, SHOTS, QUERIES = SETTINGS["5w1s"]
NOISY = 1.5
FLAT = 1.05  # iMAML's memory max/min target

QUICK = {"filters": 8, "ks": [1, 4], "rounds": 2, "warmup": 1, "mem_steps": 1, "mem_methods": ["imaml"], "jobs": 2}

Step = Callable[[], list[Tensor]]


# --------------------------------------------------------------------------------------
# problem (the problem, the learner, the net and the memory probe are metastep.py's, so both
# measure the same thing)
# --------------------------------------------------------------------------------------
def paper_problem(filters: int, meta_batch: int, seed: int = 0) -> FewShotProblem:
    """The paper's Omniglot net, 5-way 1-shot with 15 query images per class, float32."""
    return FewShotProblem("paper", "5w1s", meta_batch, filters, lam=LAM, lr=INNER_LR, cg_steps=CG_STEPS, seed=seed)


def build(p: FewShotProblem, method: str, k: int) -> Step:
    th = [p.theta[n] for n in p.names]

    if method == "imaml":
        layer = make_layer(p.loss, LAM, k, INNER_LR, CG_STEPS)

        def imaml() -> list[Tensor]:
            total = p.zeros()
            for b in range(p.B):
                phi = layer(p.theta, p.xs[b], p.ys[b])
                for acc, g in zip(total, torch.autograd.grad(p.loss(phi, p.xq[b], p.yq[b]), th)):
                    acc.add_(g)
            return total

        return imaml

    if method == "fomaml":

        def fomaml() -> list[Tensor]:
            total = p.zeros()
            for b in range(p.B):
                phi = [t.detach().clone().requires_grad_(True) for t in th]
                for _ in range(k):
                    g = torch.autograd.grad(p.loss(p.params(phi), p.xs[b], p.ys[b]), phi)
                    with torch.no_grad():
                        for a, ga in zip(phi, g):
                            a.sub_(ga, alpha=INNER_LR)
                for acc, gq in zip(total, torch.autograd.grad(p.loss(p.params(phi), p.xq[b], p.yq[b]), phi)):
                    acc.add_(gq)
            return total

        return fomaml

    if method == "maml":

        def maml() -> list[Tensor]:
            total = p.zeros()
            for b in range(p.B):
                phi = list(th)
                for _ in range(k):
                    g = torch.autograd.grad(p.loss(p.params(phi), p.xs[b], p.ys[b]), phi, create_graph=True)
                    phi = [a - INNER_LR * ga for a, ga in zip(phi, g)]
                for acc, gt in zip(total, torch.autograd.grad(p.loss(p.params(phi), p.xq[b], p.yq[b]), th)):
                    acc.add_(gt)
            return total

        return maml

    raise ValueError(f"unknown method {method!r}")


# --------------------------------------------------------------------------------------
# memory (fresh child process per (method, K))
# --------------------------------------------------------------------------------------
def memory_child(cfg: dict) -> dict:
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    p = paper_problem(cfg["filters"], cfg["meta_batch"])
    return step_memory(build(p, cfg["method"], cfg["k"]), cfg["mem_steps"], cfg["threads"])


def measure_memory(method: str, k: int, a: argparse.Namespace) -> dict:
    cfg = {"method": method, "k": k, "filters": a.filters, "meta_batch": a.meta_batch, "threads": a.threads,
           "mem_steps": a.mem_steps}
    return run_memory_child(str(Path(__file__).resolve()), cfg, f"{method}/K={k}")


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------


def _methods(s: str) -> list[str]:
    vals = [x.strip() for x in s.split(",") if x.strip()]
    if not vals or any(v not in METHODS for v in vals):
        raise argparse.ArgumentTypeError(f"choose from {', '.join(METHODS)}, got {s!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fig2b", description=" ".join((__doc__ or "").split("\n\n")[0].split()),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", type=int_list(), default=list(KS), help="inner step counts K (comma-separated)")
    p.add_argument("--methods", type=_methods, default=list(METHODS))
    p.add_argument("--mem-methods", type=_methods, default=None, help="methods whose memory is measured (default: all)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--filters", type=int, default=64)
    p.add_argument("--meta-batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--mem-steps", type=int, default=2)
    add_run_options(p, QUICK, "folder for fig2b.csv / .png")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    parsed = parse_run_args(parser, argv, QUICK, memory_child)
    if parsed is None:
        return {}
    a = parsed
    if min(a.filters, a.meta_batch, a.rounds, a.warmup, a.mem_steps, a.jobs) < 1 or a.threads < 0:
        parser.error("--filters, --meta-batch, --rounds, --warmup, --mem-steps must be >= 1, --threads >= 0")
    threads_before = torch.get_num_threads()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    try:
        rows = _run(a)
    finally:
        torch.set_num_threads(threads_before)
    summary = _summary(rows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "fig2b.csv", out / "fig2b.png"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _plot(rows, png_path, a)
    print(f"\nwrote {csv_path} and {png_path}")
    return {"rows": rows, "summary": summary}


def _run(a: argparse.Namespace) -> list[dict]:
    p = paper_problem(a.filters, a.meta_batch)
    print(f"paper net ({a.filters} filters, {p.n_params:,} parameters), {WAYS}-way {SHOTS}-shot, {QUERIES} query/class, "
          f"meta-batch {a.meta_batch}, λ={LAM}, lr={INNER_LR}, CG {CG_STEPS}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {platform.machine()}", flush=True)
    steps = {(m, k): build(p, m, k) for k in a.ks for m in a.methods}
    times: dict[tuple[str, int], list[float]] = {key: [] for key in steps}
    for r in range(a.warmup + a.rounds):
        for key, step in steps.items():
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter()
                out = step()
                dt = time.perf_counter() - t0
            finally:
                gc.enable()
            del out
            if r >= a.warmup:
                times[key].append(dt)
    mem_methods = [] if a.no_memory else [m for m in (a.mem_methods or a.methods) if m in a.methods]
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:  # each child is its own process
        futures = {(m, k): pool.submit(measure_memory, m, k, a) for k in a.ks for m in mem_methods}
        mems = {key: f.result() for key, f in futures.items()}
    rows = []
    for k in a.ks:
        for m in a.methods:
            t = times[(m, k)]
            mem = mems.get((m, k), {})
            rows.append({"method": m, "K": k, "median_s": statistics.median(t), "max_over_min": max(t) / min(t),
                         "noisy": max(t) / min(t) > NOISY, "samples": len(t), "mem_steady_mib": mem.get("steady_mb"),
                         "mem_first_step_mib": mem.get("first_mb"), "filters": a.filters, "meta_batch": a.meta_batch,
                         "n_params": p.n_params, "threads": torch.get_num_threads(), "torch": torch.__version__})
    print("| K | method | s / meta-step (median) | max/min | peak MiB steady | peak MiB 1st step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['K']} | {r['method']} | {r['median_s']:.4f} | {r['max_over_min']:.2f}{' !' if r['noisy'] else ''} | "
              f"{_fmt(r['mem_steady_mib'])} | {_fmt(r['mem_first_step_mib'])} |")
    noisy = [f"{r['method']}@K={r['K']}" for r in rows if r["noisy"]]
    if noisy:
        print(f"! max/min > {NOISY} (noisy timings): {', '.join(noisy)}")
    return rows


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def _summary(rows: list[dict]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    for m in METHODS:
        mem = [(r["K"], r["mem_steady_mib"]) for r in rows if r["method"] == m and r["mem_steady_mib"] is not None]
        if len(mem) < 2:
            continue
        vals = [v for _, v in mem]
        s[m] = {"mem_min_mib": min(vals), "mem_max_mib": max(vals), "mem_max_over_min": max(vals) / max(min(vals), 1e-9)}
        if len(mem) >= 2:  # least-squares slope, MiB per inner step
            kx = [k for k, _ in mem]
            km, vm = statistics.fmean(kx), statistics.fmean(vals)
            den = sum((k - km) ** 2 for k in kx)
            s[m]["mib_per_step"] = sum((k - km) * (v - vm) for k, v in mem) / den if den else 0.0
            # the least-squares growth from the smallest to the largest K, relative to the mean
            s[m]["trend"] = s[m]["mib_per_step"] * (max(kx) - min(kx)) / max(vm, 1e-9)
        ts = [r["median_s"] for r in rows if r["method"] == m]
        s[m]["time_max_over_min_over_K"] = max(ts) / min(ts)
    if "imaml" in s:
        i = s["imaml"]
        i["flat"] = i["mem_max_over_min"] <= FLAT
        print(f"\niMAML steady memory over K: {i['mem_min_mib']:.1f} .. {i['mem_max_mib']:.1f} MiB, max/min "
              f"{i['mem_max_over_min']:.3f} ({'flat' if i['flat'] else 'NOT flat'} within {100 * (FLAT - 1):.0f} %); "
              f"least-squares trend {i['mib_per_step']:+.3f} MiB per inner step, {100 * i['trend']:+.1f} % over the K range "
              "(RSS noise between processes is a few MiB)")
    if "maml" in s:
        mm = s["maml"]
        print(f"MAML steady memory over K: {mm['mem_min_mib']:.1f} .. {mm['mem_max_mib']:.1f} MiB, ×{mm['mem_max_over_min']:.1f} "
              f"({mm['mib_per_step']:+.2f} MiB per inner step)")
    if "fomaml" in s:
        f = s["fomaml"]
        print(f"first-order MAML steady memory over K: max/min {f['mem_max_over_min']:.3f}")
    return s


def _plot(rows: list[dict], path: Path, a: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    try:
        for i, m in enumerate(METHODS):
            rs = [r for r in rows if r["method"] == m]
            if not rs:
                continue
            ax1.plot([r["K"] for r in rs], [r["median_s"] for r in rs], "o-", color=f"C{i}", label=m)
            mem = [r for r in rs if r["mem_steady_mib"] is not None]
            if mem:
                ax2.plot([r["K"] for r in mem], [r["mem_steady_mib"] for r in mem], "o-", color=f"C{i}", label=m)
        ax1.set_xlabel("inner steps K")
        ax1.set_ylabel("s / meta-step (median)")
        ax1.set_title("time", fontsize=10)
        ax2.set_xlabel("inner steps K")
        ax2.set_ylabel("peak RSS growth per meta-step (MiB)")
        ax2.set_title("memory", fontsize=10)
        ax2.set_ylim(bottom=0)
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"Fig. 2b: paper net ({a.filters} filters), {WAYS}-way {SHOTS}-shot, meta-batch {a.meta_batch}, "
                     f"CPU {rows[0]['threads']} thread(s)", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


if __name__ == "__main__":
    main()
