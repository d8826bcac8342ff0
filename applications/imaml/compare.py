"""Train and evaluate several algorithms / settings under one budget, then print a table.

``python -m applications.imaml.compare --data-root DIR --settings 5:1,20:1 \
    --algorithms imaml,imaml-hf,maml,fomaml --meta-steps 30000 --time-limit 600 --jobs 4 --out runs/table``

Every run is an ordinary ``python -m applications.imaml train ... --evaluate`` process
(same data, model, evaluation), so the table is exactly what the CLI gives.  ``--jobs``
runs several at once (useful on a GPU, where each process is bound by kernel launches);
the per-step times in the table are then measured under that contention — say so when
quoting them, or time with ``applications.imaml.timing`` alone.  The budget is the same
for every algorithm: ``--meta-steps`` and, optionally, a wall-clock ``--time-limit`` per
run (the table reports the meta-steps each run reached).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def _run_dir(out: Path, ways: int, shots: int, alg: str) -> Path:
    return out / f"omniglot-{ways}w{shots}s-{alg}"


def _command(a: argparse.Namespace, ways: int, shots: int, alg: str) -> list[str]:
    cmd = [sys.executable, "-m", "applications.imaml", "train", "--dataset", "omniglot", "--ways", str(ways),
           "--shots", str(shots), "--algorithm", alg, "--meta-steps", str(a.meta_steps),
           "--out", str(_run_dir(Path(a.out), ways, shots, alg)), "--overwrite", "--evaluate",
           "--eval-episodes", str(a.episodes), "--no-progress", "--checkpoint-every", str(a.checkpoint_every)]
    if a.data_root:
        cmd += ["--data-root", a.data_root]
    if a.time_limit:
        cmd += ["--time-limit", str(a.time_limit)]
    if a.device:
        cmd += ["--device", a.device]
    if a.filters:
        cmd += ["--filters", str(a.filters)]
    if a.meta_batch:
        cmd += ["--meta-batch", str(a.meta_batch)]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    return cmd + list(a.extra)


def summarise(run: Path) -> dict[str, object]:
    """Steps, median step time, peak memory and test accuracy of one finished run."""
    rows = list(csv.DictReader(open(run / "log.csv", newline="")))
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
    times = [float(r["step_seconds"]) for r in rows[1:]] or [float(r["step_seconds"]) for r in rows]
    return {
        "run": run.name,
        "steps": int(rows[-1]["step"]) if rows else 0,
        "median_step_s": statistics.median(times) if times else float("nan"),
        "peak_mem_mb": max(float(r["peak_mem_mb"]) for r in rows) if rows else float("nan"),
        "accuracy": metrics.get("mean"),
        "ci95": metrics.get("ci95"),
        "episodes": metrics.get("episodes"),
        "device": metrics.get("device"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m applications.imaml.compare", description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--settings", default="5:1,20:1", help="comma-separated ways:shots")
    p.add_argument("--algorithms", default="imaml,imaml-hf,maml,fomaml")
    p.add_argument("--meta-steps", type=int, default=30000)
    p.add_argument("--time-limit", type=float, default=None, help="wall-clock seconds of training per run")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("--device", default=None)
    p.add_argument("--filters", type=int, default=None)
    p.add_argument("--meta-batch", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--out", default="runs/compare")
    p.add_argument("extra", nargs="*", help="after --: more train flags for every run")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(int(s.split(":")[0]), int(s.split(":")[1]), alg) for s in a.settings.split(",") for alg in a.algorithms.split(",")]
    pending = list(jobs)
    running: list[tuple[subprocess.Popen, tuple[int, int, str], object]] = []
    failed = []
    t0 = time.perf_counter()
    while pending or running:
        while pending and len(running) < a.jobs:
            job = pending.pop(0)
            d = _run_dir(out, *job)
            d.mkdir(parents=True, exist_ok=True)
            logf = open(d / "console.txt", "w")
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            running.append((subprocess.Popen(_command(a, *job), stdout=logf, stderr=subprocess.STDOUT, env=env), job, logf))
            print(f"[{time.perf_counter() - t0:6.0f}s] started {d.name}", flush=True)
        time.sleep(1.0)
        for proc, job, logf in list(running):
            if proc.poll() is not None:
                logf.close()  # type: ignore[attr-defined]
                running.remove((proc, job, logf))
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                if proc.returncode != 0:
                    failed.append(job)
                print(f"[{time.perf_counter() - t0:6.0f}s] {_run_dir(out, *job).name}: {status}", flush=True)
    results = []
    for job in jobs:
        d = _run_dir(out, *job)
        if job in failed or not (d / "log.csv").exists():
            continue
        results.append(summarise(d))
    (out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n| run | meta-steps | median s/step | peak MiB | test accuracy (95% CI) |")
    print("|---|---|---|---|---|")
    for r in results:
        acc = "—" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f} % ({r['episodes']} ep.)"
        print(f"| {r['run']} | {r['steps']} | {r['median_step_s']:.3f} | {r['peak_mem_mb']:.0f} | {acc} |")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
