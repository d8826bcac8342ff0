"""Tables and pictures of a protocol run (``cpu_protocol.sh``): equal meta-steps and equal time.

``python -m applications.imaml.report runs/cpu-protocol --out applications/imaml/results/DIR``

The protocol folder holds one folder per setting (``5w1s``, ``20w1s``), each with one run
folder per configuration and seed (``imaml-lam0.1-s0``, ``maml-s1``, ...).  For each
setting this writes:

* ``table.md`` — per configuration: the test accuracy of every seed (600 fixed test
  episodes, 95% CI), their mean, the validation accuracy at each validation step (mean
  over seeds), median seconds per meta-step; then the **equal wall-clock** comparison:
  each run's last validation accuracy measured within the training time of the fastest
  complete run in the setting (what a user who stopped every run at that time would have);
* ``time_table.md``, the validation accuracy of each configuration at a few equal training
  times (up to the end of the shortest run), and ``time_to_accuracy.png`` (validation
  accuracy against training seconds and meta-steps, one colour per configuration and one
  line style per seed, :func:`~applications.imaml.plot.plot_time_to_accuracy`);
* ``curves.png`` (iMAML-GD at the default λ and every other configuration,
  :func:`~applications.imaml.plot.plot_learning_curves`), ``curves_all.png`` (all runs) and
  ``sweep.png`` (test accuracy of iMAML-GD against λ, the other configurations as bands);
* a copy of each run's small files (``log.csv``, ``val.csv``, ``metrics.json``,
  ``config.json``, ``console.txt``) so that the numbers in docs/applications/imaml.md can be re-derived;
  checkpoints are not copied.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .plot import _pyplot, _Run, plot_learning_curves, plot_time_to_accuracy

__all__ = ["group_runs", "main", "report_setting"]

SMALL_FILES = ("log.csv", "val.csv", "metrics.json", "config.json", "console.txt")
_SEED = re.compile(r"-s(\d+)$")


def group_runs(setting_dir: Path) -> dict[str, list[_Run]]:
    """Finished runs (with ``metrics.json``) of one setting, grouped by configuration name."""
    groups: dict[str, list[_Run]] = {}
    for d in sorted(p for p in setting_dir.iterdir() if p.is_dir()):
        if not (d / "metrics.json").is_file() or not (d / "log.csv").is_file():
            continue
        groups.setdefault(_SEED.sub("", d.name), []).append(_Run(d))
    return groups


def _last_val_within(run: _Run, seconds: float, step_seconds: float) -> tuple[float, int]:
    """(validation metric, step) of the last validation point reached within ``seconds`` of
    training at ``step_seconds`` per meta-step."""
    if run.val is None:
        return float("nan"), 0
    ok = run.val["step"] * step_seconds <= seconds + 1e-9
    if not ok.any():
        return float("nan"), 0
    i = int(np.nonzero(ok)[0][-1])
    return float(run.val["metric"][i]), int(run.val["step"][i])


def report_setting(setting_dir: Path, out: Path, default_lam: str = "0.1") -> dict[str, Any]:
    """Write ``table.md``, ``curves.png`` (iMAML-GD at ``default_lam`` and the other
    configurations), ``curves_all.png``, ``sweep.png`` and the run copies for one setting."""
    groups = group_runs(setting_dir)
    if not groups:
        raise FileNotFoundError(f"no finished run (with metrics.json) under {str(setting_dir)!r}")
    out.mkdir(parents=True, exist_ok=True)
    runs = [r for rs in groups.values() for r in rs]
    total = {id(r): float(np.nanmax(r.elapsed)) for r in runs}
    # Time on a shared machine comes in bursts (other jobs); the median seconds per
    # meta-step of a configuration resists them, so "time" below is steps × that median.
    step_s = {name: statistics.median(float(x) for r in rs for x in np.diff(np.r_[0.0, r.elapsed]))
              for name, rs in groups.items()}
    # The earliest time at which every configuration has a validation point; a configuration
    # whose whole run is shorter is compared with its last point (it had stopped by then).
    first_val = {name: min((float(r.val["step"][0]) for r in rs if r.val is not None), default=0.0)
                 for name, rs in groups.items()}
    t_equal = max(step_s[name] * first_val[name] for name in groups)
    rows: list[dict[str, Any]] = []
    for name, rs in groups.items():
        accs = [float(r.metrics["mean"]) for r in rs]
        val_steps = sorted({int(s) for r in rs if r.val is not None for s in r.val["step"]})
        val_mean = {}
        for s in val_steps:
            vals = [float(r.val["metric"][r.val["step"] == s][0]) for r in rs if r.val is not None and (r.val["step"] == s).any()]
            val_mean[s] = statistics.fmean(vals)
        within = [_last_val_within(r, t_equal, step_s[name]) for r in rs]
        rows.append({
            "config": name,
            "seeds": [int(r.config.get("seed", -1)) for r in rs],
            "steps": [int(np.nanmax(r.step)) for r in rs],
            "test": [(float(r.metrics["mean"]), float(r.metrics["ci95"]), int(r.metrics["episodes"])) for r in rs],
            "test_mean": statistics.fmean(accs),
            "val_by_step": val_mean,
            "median_step_s": step_s[name],
            "train_seconds": [total[id(r)] for r in rs],
            "val_at_equal_time": [w[0] for w in within],
            "step_at_equal_time": [w[1] for w in within],
        })
        run_out = out / "runs"
        for r in rs:
            dest = run_out / r.folder.name
            dest.mkdir(parents=True, exist_ok=True)
            for f in SMALL_FILES:
                if (r.folder / f).is_file():
                    shutil.copy2(r.folder / f, dest / f)
    rows.sort(key=lambda row: -row["test_mean"])
    all_steps = sorted({s for row in rows for s in row["val_by_step"]})

    lines = [f"### {setting_dir.name}: equal meta-steps", "",
             "| configuration | meta-steps | test metric per seed (95% CI) | mean | "
             + " | ".join(f"val@{s}" for s in all_steps) + " | median s/step |",
             "|---|---|---|---|" + "---|" * len(all_steps) + "---|"]
    for row in rows:
        per_seed = "; ".join(f"s{sd}: {100 * m:.2f} ± {100 * c:.2f}" for sd, (m, c, _) in zip(row["seeds"], row["test"]))
        vals = " | ".join(f"{100 * row['val_by_step'][s]:.1f}" if s in row["val_by_step"] else "—" for s in all_steps)
        lines.append(f"| {row['config']} | {'/'.join(map(str, row['steps']))} | {per_seed} | **{100 * row['test_mean']:.2f}** | "
                     f"{vals} | {row['median_step_s']:.2f} |")
    lines += ["", f"### {setting_dir.name}: equal wall-clock ({t_equal:.0f} s of training: the earliest time at which every "
              "configuration has a validation point; time = meta-steps × the configuration's median s/step)", "",
              "| configuration | validation accuracy within that time, per seed (at meta-step) | mean |", "|---|---|---|"]

    def mean_or_nan(v: list[float]) -> float:
        ok = [x for x in v if np.isfinite(x)]
        return statistics.fmean(ok) if ok else float("nan")

    for row in sorted(rows, key=lambda row: -np.nan_to_num(mean_or_nan(row["val_at_equal_time"]), nan=-1.0)):
        per = "; ".join("—" if not np.isfinite(v) else f"{100 * v:.1f} (step {s})"
                        for v, s in zip(row["val_at_equal_time"], row["step_at_equal_time"]))
        m = mean_or_nan(row["val_at_equal_time"])
        lines.append(f"| {row['config']} | {per} | {'—' if not np.isfinite(m) else f'{100 * m:.1f}'} |")
    # Validation at a few equal training times (time = meta-steps × median s/step, as above):
    # up to the end of the shortest run, so that every configuration is still training there.
    t_end = min(step_s[row["config"]] * max((int(s) for s in row["val_by_step"]), default=0) for row in rows)
    times = [t for t in (0.25 * t_end, 0.5 * t_end, t_end) if t > 0]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    time_lines: list[str] = []
    if times:
        time_lines += [f"### {setting_dir.name}: validation accuracy at equal training time (mean over seeds; "
                  "the last validation point within each time)", "",
                  "| configuration | " + " | ".join(f"{t:.0f} s" if t >= 10 else f"{t:.2g} s" for t in times)
                  + " | test (end of run) |",
                  "|---|" + "---|" * len(times) + "---|"]
        for row in sorted(rows, key=lambda row: -row["test_mean"]):
            rs = groups[row["config"]]
            cells = []
            for t in times:
                v = mean_or_nan([_last_val_within(r, t, step_s[row["config"]])[0] for r in rs])
                cells.append("—" if not np.isfinite(v) else f"{100 * v:.1f}")
            time_lines.append(f"| {row['config']} | " + " | ".join(cells) + f" | {100 * row['test_mean']:.2f} |")
        (out / "time_table.md").write_text("\n".join(time_lines) + "\n")
    plot_time_to_accuracy([r.folder for r in runs], out / "time_to_accuracy.png",
                          title=f"Omniglot {setting_dir.name}: validation accuracy against training time",
                          order=[row["config"] for row in rows])

    plot_learning_curves([r.folder for r in runs], out / "curves_all.png",
                         labels=[r.folder.name for r in runs], title=f"Omniglot {setting_dir.name} (CPU protocol, all runs)")
    # The headline picture: iMAML-GD at the default λ against everything else (the other λ
    # of the sweep are in sweep.png).
    head = [r for name, rs in groups.items() if not (name.startswith("imaml-lam") and name != f"imaml-lam{default_lam}")
            for r in rs] or runs
    plot_learning_curves([r.folder for r in head], out / "curves.png", labels=[r.folder.name for r in head],
                         title=f"Omniglot {setting_dir.name}: iMAML-GD (λ = {default_lam}) and the baselines, equal meta-steps")
    _sweep_plot(rows, out / "sweep.png", setting_dir.name)
    summary = {"setting": setting_dir.name, "equal_time_seconds": t_equal,
               "rows": [{**row, "val_by_step": {str(k): v for k, v in row["val_by_step"].items()}} for row in rows]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(lines + [""] + time_lines))
    return summary


def _sweep_plot(rows: list[dict[str, Any]], path: Path, setting: str) -> Path | None:
    """Test accuracy of iMAML-GD against λ (one point per seed, mean line); baselines as bands."""
    lam_rows = [(float(m.group(1)), row) for row in rows if (m := re.fullmatch(r"imaml-lam([0-9.]+)", row["config"]))]
    if not lam_rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        lam_rows.sort()
        xs = [lam for lam, _ in lam_rows]
        ax.plot(xs, [100 * row["test_mean"] for _, row in lam_rows], "o-", color="C0", label="iMAML-GD (mean of seeds)")
        for lam, row in lam_rows:
            for m, c, _ in row["test"]:
                ax.errorbar([lam], [100 * m], yerr=[100 * c], fmt=".", color="C0", alpha=0.5, capsize=3)
        others = [row for row in rows if not row["config"].startswith("imaml-lam")]
        for i, row in enumerate(others):
            mean = 100 * row["test_mean"]
            ci = 100 * max(c for _, c, _ in row["test"])
            ax.axhspan(mean - ci, mean + ci, color=f"C{i + 1}", alpha=0.15)
            ax.axhline(mean, color=f"C{i + 1}", lw=1.5, label=row["config"])
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("λ (proximal weight of iMAML-GD)")
        ax.set_ylabel("test accuracy % (600 episodes)")
        ax.set_title(f"Omniglot {setting}: iMAML-GD λ sweep at equal meta-steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m applications.imaml.report", description=__doc__.splitlines()[0])
    p.add_argument("protocol_dir", help="the DEST folder of cpu_protocol.sh")
    p.add_argument("--out", required=True, help="where to write the tables, pictures and run copies")
    a = p.parse_args(argv)
    root = Path(a.protocol_dir)
    settings = sorted(d for d in root.iterdir() if d.is_dir() and group_runs(d))
    if not settings:
        p.exit(2, f"{p.prog}: error: no finished run under {str(root)!r}\n")
    for d in settings:
        report_setting(d, Path(a.out) / d.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
