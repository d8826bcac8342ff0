"""Meta-steps per second of ``applications.imaml train`` on 1 and 2 processes (``torchrun``).

    python -m benchmarks.distributed_scaling [--dataset sinusoid --meta-steps 200 --meta-batch 16]
    python -m benchmarks.distributed_scaling --dataset omniglot --meta-steps 20 --meta-batch 8   # needs the data

Three configurations of the same run (same global meta-batch, same tasks): one process
with 1 torch thread, one process with 2 threads, and two processes with 1 thread each
(gloo all-reduce of the meta-gradient every step).  Each is a fresh run; the table gives
the median of the per-step times the run logged (``step_seconds``, after the first 5
steps) and meta-steps per second.  On a 2-core CPU two processes can at best use the
same two cores one process with two threads uses, and each step adds an all-reduce and
a second copy of the Python overhead, so expect little or no speedup there; the point of
``torchrun`` is several GPUs or machines.  Writes ``distributed_scaling_<dataset>.csv`` and ``.png``.
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = (("1 process, 1 thread", 1, 1), ("1 process, 2 threads", 1, 2), ("2 processes, 1 thread each", 2, 1))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(procs: int, threads: int, a: argparse.Namespace, out: Path) -> list[float]:
    base = [sys.executable, "-m"]
    launcher = (["torch.distributed.run", f"--nproc_per_node={procs}", "--master_addr=127.0.0.1", f"--master_port={_port()}",
                 "-m"] if procs > 1 else [])
    cmd = [*base, *launcher, "applications.imaml", "train", "--dataset", a.dataset, "--meta-steps", str(a.meta_steps),
           "--meta-batch", str(a.meta_batch), "--threads", str(threads), "--no-progress", "--device", "cpu",
           "--out", str(out), "--checkpoint-every", str(a.meta_steps)]
    if a.data_root:
        cmd += ["--data-root", a.data_root]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{procs} process(es): {proc.stderr[-2000:]}")
    with open(out / "log.csv", newline="") as f:
        return [float(r["step_seconds"]) for r in csv.DictReader(f)]


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distributed_scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="sinusoid", choices=("sinusoid", "omniglot"))
    p.add_argument("--data-root", default=None)
    p.add_argument("--meta-steps", type=int, default=200)
    p.add_argument("--meta-batch", type=int, default=16)
    p.add_argument("--skip", type=int, default=5, help="first steps left out of the median (warm-up)")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, procs, threads in CONFIGS:
            times = _run(procs, threads, a, Path(tmp) / f"{procs}p{threads}t")[a.skip:]
            med = statistics.median(times)
            rows.append({"config": label, "processes": procs, "threads_per_process": threads, "dataset": a.dataset,
                         "meta_batch": a.meta_batch, "median_step_s": med, "meta_steps_per_s": 1 / med,
                         "max_over_min": max(times) / min(times)})
    print(f"{a.dataset}, global meta-batch {a.meta_batch}, {a.meta_steps} meta-steps, CPU ({os.cpu_count()} cores)")
    print("| configuration | s / meta-step (median) | meta-steps / s | max/min |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['median_step_s']:.4f} | {r['meta_steps_per_s']:.2f} | {r['max_over_min']:.2f} |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"distributed_scaling_{a.dataset}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.8))
    try:
        ax.barh([r["config"] for r in rows], [r["meta_steps_per_s"] for r in rows], color=["C0", "C1", "C2"])
        ax.set_xlabel("meta-steps / s (higher is better)")
        ax.set_title(f"{a.dataset}, meta-batch {a.meta_batch}, {os.cpu_count()}-core CPU")
        fig.tight_layout()
        fig.savefig(out / f"distributed_scaling_{a.dataset}.png", dpi=110)
    finally:
        plt.close(fig)
    print(f"wrote {out}/distributed_scaling_{a.dataset}.csv and .png")
    return rows


if __name__ == "__main__":
    main()
