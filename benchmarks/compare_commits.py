"""Summarise ``benchmarks/compare_commits.sh``: median time per method, before and after.

    python benchmarks/compare_commits.py OUT

Reads ``OUT/sp_{before,after}_*/small_problem.csv`` and ``OUT/ms_{before,after}_*/metastep*.csv``
and prints, per method, the median over the runs of each run's median time, the after/before
ratio, each run's own ratio to the hand-written baseline (which cancels the machine's drift),
and the median steady peak memory (MiB, meta-step only) where it was measured.
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path


def _rows(out: Path, pattern: str) -> dict[str, list[dict[str, str]]]:
    runs: dict[str, list[dict[str, str]]] = {"before": [], "after": []}
    for tree in runs:
        for path in sorted(out.glob(pattern.format(tree=tree))):
            with path.open() as f:
                runs[tree].extend(csv.DictReader(f))
    return runs


def main(out: Path) -> None:
    print(f"{'benchmark':<14}{'method':<20}{'before':>12}{'after':>12}{'after/before':>14}"
          f"{'x hand before':>15}{'x hand after':>14}{'runs':>6}{'MiB before':>12}{'MiB after':>11}")
    for label, pattern, key, col, unit in (
        ("small problem", "sp_{tree}_*/small_problem.csv", ("method",), "median_ms", "ms"),
        ("meta-step", "ms_{tree}_*/metastep*.csv", ("net", "method"), "median_s", "s"),
    ):
        runs = _rows(out, pattern)
        groups = sorted({tuple(r[k] for k in key) for r in runs["before"]} & {tuple(r[k] for k in key) for r in runs["after"]})
        for g in groups:
            med, xh, mem = {}, {}, {}
            for tree in ("before", "after"):
                sel = [r for r in runs[tree] if tuple(r[k] for k in key) == g]
                med[tree] = statistics.median(float(r[col]) for r in sel)
                xh[tree] = statistics.median(float(r["x_hand_written"]) for r in sel)
                mibs = [float(r["mem_steady_mib"]) for r in sel if r.get("mem_steady_mib") not in (None, "")]
                mem[tree] = f"{statistics.median(mibs):.0f}" if mibs else "-"
            n = min(sum(1 for r in runs[t] if tuple(r[k] for k in key) == g) for t in runs)
            print(f"{label:<14}{'/'.join(g):<20}{med['before']:>10.3f}{unit:<2}{med['after']:>10.3f}{unit:<2}"
                  f"{med['after'] / med['before']:>14.3f}{xh['before']:>15.2f}{xh['after']:>14.2f}{n:>6}"
                  f"{mem['before']:>12}{mem['after']:>11}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/compare"))
