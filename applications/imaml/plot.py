"""Pictures of meta-training runs: learning curves of one or several runs, sinusoid fits.

``python -m applications.imaml plot RUN_DIR [RUN_DIR ...] [--out PNG] [--labels a,b] [--title T] [--fits]``

* :func:`plot_learning_curves` reads each run folder's ``log.csv`` (one row per
  meta-step, see :data:`~applications.imaml.runlog.CSV_COLUMNS`) and, where present,
  ``val.csv`` (a validation log every N meta-steps: ``step, elapsed_seconds, val_metric,
  val_ci95, val_loss, episodes``), ``config.json`` (for the labels) and ``metrics.json``
  (the test result, shown in the legend).
* :func:`plot_sinusoid_fits` draws, for a few test tasks of a sinusoid checkpoint, the true
  sine, the support points and the predictions of the meta-initialisation θ and of the
  adapted parameters φ.

matplotlib (the ``apps`` extra) is imported only when a picture is drawn, so that the
command line, which imports this module for its ``plot`` subcommand, does not need it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["add_parser", "plot_learning_curves", "plot_sinusoid_fits", "plot_time_to_accuracy", "run"]

#: Fraction of a run's meta-steps averaged by the running mean of the training curves.
SMOOTH_FRACTION = 0.05


# --------------------------------------------------------------------------------------
# reading a run folder
# --------------------------------------------------------------------------------------
def _float(text: str | None) -> float:
    """``float(text)``, or NaN for an empty or malformed cell (e.g. the half-written last
    line of a log that is still being appended to)."""
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _column(rows: list[dict[str, str]], key: str) -> np.ndarray:
    return np.array([_float(r.get(key)) for r in rows], dtype=float)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # a file being rewritten, or not ours: the plot goes on without it
        return {}
    return data if isinstance(data, dict) else {}


class _Run:
    """The curves of one run folder, as float arrays (NaN where a cell is empty)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        if not folder.is_dir():
            raise FileNotFoundError(f"run folder {str(folder)!r} does not exist")
        log = folder / "log.csv"
        if not log.is_file():
            raise FileNotFoundError(f"run folder {str(folder)!r} has no log.csv (is it the --out folder of a training run?)")
        rows = _read_csv(log)
        self.step = _column(rows, "step")
        keep = np.isfinite(self.step)
        if not keep.any():
            raise ValueError(f"log.csv of run folder {str(folder)!r} is empty (no meta-step logged yet)")
        rows = [r for r, k in zip(rows, keep) if k]
        self.step = self.step[keep]
        self.meta_loss = _column(rows, "meta_loss")
        self.elapsed = _column(rows, "elapsed_seconds")
        acc, mse = _column(rows, "query_accuracy"), _column(rows, "query_mse")
        self.config = _read_json(folder / "config.json")
        self.metrics = _read_json(folder / "metrics.json")
        if np.isfinite(acc).any():
            self.task, self.query_metric = "classification", acc
        elif np.isfinite(mse).any() or self.config.get("dataset") == "sinusoid":
            self.task, self.query_metric = "regression", mse
        else:
            raise ValueError(f"log.csv of run folder {str(folder)!r} has neither query_accuracy nor query_mse values")

        self.val: dict[str, np.ndarray] | None = None
        val_path = folder / "val.csv"
        if val_path.is_file():
            vrows = _read_csv(val_path)
            vstep, vmetric = _column(vrows, "step"), _column(vrows, "val_metric")
            ok = np.isfinite(vstep) & np.isfinite(vmetric)
            if ok.any():
                velapsed = _column(vrows, "elapsed_seconds")[ok]
                # A row without its own time gets the training clock at that step from log.csv.
                missing = ~np.isfinite(velapsed)
                timed = np.isfinite(self.elapsed)
                if missing.any() and timed.any():
                    velapsed[missing] = np.interp(vstep[ok][missing], self.step[timed], self.elapsed[timed])
                self.val = {"step": vstep[ok], "elapsed": velapsed, "metric": vmetric[ok],
                            "ci95": _column(vrows, "val_ci95")[ok]}

    def setting(self) -> str | None:
        """``"omniglot 5-way 1-shot"`` / ``"sinusoid 5-shot"`` from config.json, if known."""
        c = self.config
        if "dataset" not in c:
            return None
        if c["dataset"] == "sinusoid":
            return f"sinusoid {c.get('shots', '?')}-shot"
        return f"{c['dataset']} {c.get('ways', '?')}-way {c.get('shots', '?')}-shot"

    def default_label(self) -> str:
        c = self.config
        if "algorithm" not in c:
            return self.folder.resolve().name
        label = str(c["algorithm"])
        # λ only means something for the implicit algorithms (imaml, imaml-hf); the config
        # of a MAML/Reptile run still holds the default value, which would mislead.
        if str(c["algorithm"]).startswith("imaml") and "lam" in c:
            label += f" λ={float(c['lam']):g}" + (" (learned)" if c.get("learn_lam") else "")
        if "seed" in c:
            label += f" seed {c['seed']}"
        return label

    def test_suffix(self) -> str:
        m = self.metrics
        if "mean" not in m:
            return ""
        text = f" — test {m['metric']}" if "metric" in m else " — test"
        text += f" {float(m['mean']):.4f}"
        if "ci95" in m:
            text += f" ± {float(m['ci95']):.4f}"
        if "episodes" in m:
            text += f" ({m['episodes']} ep.)"
        return text


def running_mean(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing running mean over ``window`` points, ignoring NaNs (shorter windows at the start).

    Args:
        y: values in order of meta-step.
        window: number of points averaged (>= 1).

    Returns:
        Array of ``y``'s shape; NaN only where the whole window is NaN.
    """
    finite = np.isfinite(y)
    csum = np.concatenate([[0.0], np.cumsum(np.where(finite, y, 0.0))])
    ccount = np.concatenate([[0], np.cumsum(finite)])
    hi = np.arange(1, len(y) + 1)
    lo = np.maximum(0, hi - window)
    count = ccount[hi] - ccount[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (csum[hi] - csum[lo]) / np.maximum(count, 1), np.nan)


# --------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------
def _pyplot() -> Any:
    """pyplot on the non-interactive Agg backend (no display needed).

    The backend is chosen only if pyplot is not loaded yet: switching the backend of a
    session that already uses pyplot (a notebook) would close that session's figures, and
    any backend can write a PNG.
    """
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def _log_scale_if_positive(ax: Any, *arrays: np.ndarray) -> None:
    """Log y axis (MSE spans decades) when every finite plotted value is positive."""
    vals = np.concatenate([a[np.isfinite(a)] for a in arrays]) if arrays else np.array([])
    if vals.size and (vals > 0).all():
        from matplotlib.ticker import LogFormatter

        class PlainLogFormatter(LogFormatter):
            """LogFormatter's choice of which ticks to label, written as plain numbers
            ("0.4", "2") rather than "4×10⁻¹", "2×10⁰"."""

            def __call__(self, x: float, pos: int | None = None) -> str:
                return f"{x:g}" if super().__call__(x, pos) else ""

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(PlainLogFormatter())
        ax.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1.5, 0.6)))


def _legend_below(fig: Any, ax: Any, *, ncol: int) -> None:
    """One legend (of ``ax``'s labelled artists) under all subplots, then a tight layout
    that leaves room for it: in a subplot it would cover curves, and labels with test
    results are long."""
    handles, labels = ax.get_legend_handles_labels()
    legend_inches = 0.15 + 0.22 * math.ceil(len(labels) / ncol)
    # The figure grows by the legend's height, so the subplots keep their size.
    fig.set_figheight(fig.get_figheight() + legend_inches)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize="small", frameon=False)
    fig.tight_layout(rect=(0.0, legend_inches / fig.get_figheight(), 1.0, 1.0))


def plot_learning_curves(
    run_dirs: Sequence[str | Path],
    out_png: str | Path,
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Learning curves of one or several runs on one figure, one colour per run.

    With a ``val.csv`` in at least one run the figure has two rows: the validation metric
    with its 95% confidence band against meta-step and against training wall-clock seconds,
    then the training query metric of each meta-batch (running mean over
    :data:`SMOOTH_FRACTION` of the run's steps, raw values faint behind) and the meta-loss
    against meta-step.  Without any ``val.csv`` only the second row is drawn.  Regression
    (MSE, lower is better) uses log y axes; classification plots accuracy.

    Args:
        run_dirs: training output folders, each with a ``log.csv``.
        out_png: path of the PNG to write (its folder is created).
        labels: one legend label per run; default ``"<algorithm> λ=<lam> seed <seed>"``
            from the run's ``config.json`` or the folder name.  A run with ``metrics.json``
            gets its test result appended.
        title: figure title; default the dataset setting when all runs share it.

    Returns:
        The path of the PNG written.

    Raises:
        FileNotFoundError: a run folder, or its ``log.csv``, is missing (named in the message).
        ValueError: a ``log.csv`` has no rows, ``labels`` has the wrong length, no runs are
            given, or classification and regression runs are mixed.
    """
    if not run_dirs:
        raise ValueError("no run folders given")
    runs = [_Run(Path(d)) for d in run_dirs]
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} run folders; give one label per run")
    tasks = {r.task for r in runs}
    if len(tasks) > 1:
        kinds = ", ".join(f"{r.folder} ({r.task})" for r in runs)
        raise ValueError(f"cannot draw classification and regression runs on one figure: {kinds}")
    regression = tasks == {"regression"}
    metric_name = "MSE" if regression else "accuracy"
    names = [(labels[i] if labels is not None else r.default_label()) + r.test_suffix() for i, r in enumerate(runs)]
    if title is None:
        settings = {r.setting() for r in runs}
        title = settings.pop() if len(settings) == 1 else None

    has_val = any(r.val is not None for r in runs)
    plt = _pyplot()
    nrows = 2 if has_val else 1
    fig, axes = plt.subplots(nrows, 2, figsize=(12, 4.2 * nrows), squeeze=False)
    try:
        colours = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
        if has_val:
            ax_vs, ax_vt = axes[0]
            val_range: list[np.ndarray] = []
            for i, r in enumerate(runs):
                if r.val is None:
                    continue
                c = colours[i % len(colours)]
                v = r.val
                lo, hi = v["metric"] - v["ci95"], v["metric"] + v["ci95"]
                if regression:
                    # The normal band of an MSE can reach below 0, which a log axis cannot show:
                    # such a band is drawn down to the axis bottom (the limits ignore it, below).
                    val_range.extend([v["metric"], lo[lo > 0], hi])
                    lo = np.where(lo > 0, lo, 1e-300)
                for ax, x in ((ax_vs, v["step"]), (ax_vt, v["elapsed"])):
                    if not np.isfinite(x).any():
                        continue
                    ax.plot(x, v["metric"], color=c, marker="o", markersize=3)
                    band = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(x)
                    if band.any():
                        ax.fill_between(x[band], lo[band], hi[band], color=c, alpha=0.2, linewidth=0)
            vals = [r.val["metric"] for r in runs if r.val is not None]
            for ax, xlabel in ((ax_vs, "meta-step"), (ax_vt, "training wall-clock seconds")):
                ax.set_xlabel(xlabel)
                ax.set_ylabel(f"validation {metric_name}")
                ax.set_title(f"validation {metric_name} (95% CI band)")
                ax.grid(True, alpha=0.3)
                if regression:
                    _log_scale_if_positive(ax, *vals)
                    shown = np.concatenate([a[np.isfinite(a) & (a > 0)] for a in val_range])
                    if ax.get_yscale() == "log" and shown.size:
                        ax.set_ylim(shown.min() / 1.25, shown.max() * 1.25)

        ax_q, ax_l = axes[-1]
        for i, r in enumerate(runs):
            c = colours[i % len(colours)]
            window = max(1, int(round(SMOOTH_FRACTION * len(r.step))))
            for ax, y in ((ax_q, r.query_metric), (ax_l, r.meta_loss)):
                marker = "o" if len(r.step) < 3 else None  # a single point draws no line
                if window > 1:
                    ax.plot(r.step, y, color=c, alpha=0.2, linewidth=0.7)
                ax.plot(r.step, running_mean(y, window), color=c, marker=marker, markersize=3,
                        label=names[i] if ax is ax_q else None)
        ax_q.set_title(f"training query {metric_name} (meta-batch; running mean over {SMOOTH_FRACTION:.0%} of steps)")
        ax_q.set_ylabel(f"query {metric_name}")
        ax_l.set_title("meta-loss (mean query loss of the meta-batch)")
        ax_l.set_ylabel("meta-loss")
        for ax in (ax_q, ax_l):
            ax.set_xlabel("meta-step")
            ax.grid(True, alpha=0.3)
        if regression:
            _log_scale_if_positive(ax_q, *[r.query_metric for r in runs])
            _log_scale_if_positive(ax_l, *[r.meta_loss for r in runs])
        if title:
            fig.suptitle(title)
        _legend_below(fig, ax_q, ncol=min(len(runs), 2))
        return _save(fig, out_png)
    finally:
        plt.close(fig)


def plot_sinusoid_fits(checkpoint: str | Path, out_png: str | Path, *, tasks: int = 4, seed: int = 0) -> Path:
    """Fits of a sinusoid checkpoint to a few test tasks, one subplot per task.

    Each subplot shows the true function ``A sin(x − φ)`` on a dense grid over the task
    input range, the support points (what adaptation sees) and query points, and the
    predictions of the meta-initialisation θ and of the parameters φ adapted to the support
    set with the run's own inner procedure (``learner.adapt``, as in evaluation).

    The tasks are test tasks ``0 .. tasks-1`` of the test stream seeded with ``seed`` — the
    same episodes :func:`~applications.imaml.evaluate.evaluate_checkpoint` starts with for
    ``eval_seed = seed``.  Their amplitude and phase travel with the task batch; a source
    whose batches lack them gets only the support and query points drawn as the truth
    (the subplot title says so).

    Args:
        checkpoint: a ``checkpoint.pt`` of a sinusoid run.
        out_png: path of the PNG to write (its folder is created).
        tasks: number of test tasks (subplots), >= 1.
        seed: seed of the test-task stream (the evaluation seed).

    Returns:
        The path of the PNG written.

    Raises:
        FileNotFoundError: no checkpoint at ``checkpoint``.
        ValueError: the checkpoint is not of a sinusoid run, or ``tasks < 1``.
    """
    import torch
    from torch.func import functional_call

    from .checkpoint import load_checkpoint
    from .config import RunConfig
    from .data import SinusoidTasks
    from .learner import load_learner
    from .tasks import make_task_source

    if tasks < 1:
        raise ValueError(f"tasks must be >= 1, got {tasks}")
    path = Path(checkpoint)
    ckpt = load_checkpoint(path)
    saved = ckpt["config"]
    if saved.get("dataset") != "sinusoid":
        raise ValueError(f"{str(path)!r} is a {saved.get('dataset')} checkpoint; sinusoid fits need a sinusoid run")
    # The CPU is the fast device for this 1.7k-parameter MLP, and the checkpoint may come from a GPU machine.
    cfg = RunConfig.from_dict({**saved, "device": "cpu"})
    source = make_task_source("sinusoid", "test", ways=cfg.ways, shots=cfg.shots, queries=cfg.queries, seed=seed)
    batch = source.batch(range(tasks)).to("cpu", cfg.torch_dtype)
    learner, theta, rho = load_learner(cfg, source.image_shape, ckpt)
    phi = learner.adapt(theta, rho, batch)

    # The task batch carries each task's amplitude and phase (the data layer's TaskBatch).
    have_truth = batch.amplitude is not None and batch.phase is not None
    x_lo, x_hi = SinusoidTasks().x_range
    grid = torch.linspace(x_lo, x_hi, 300, dtype=cfg.torch_dtype).unsqueeze(-1)

    def predict(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return functional_call(learner.model, {k: v.detach() for k, v in params.items()}, (x,))

    plt = _pyplot()
    ncols = min(tasks, int(math.ceil(math.sqrt(tasks))))
    nrows = int(math.ceil(tasks / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.4 * nrows), squeeze=False)
    try:
        flat = axes.ravel()
        for b in range(tasks):
            ax = flat[b]
            phi_b = {k: v[b] for k, v in phi.items()}
            sx, sy = batch.support_x[b], batch.support_y[b]
            qx, qy = batch.query_x[b], batch.query_y[b]
            mse_theta = float((predict(theta, qx) - qy).square().mean())
            mse_phi = float((predict(phi_b, qx) - qy).square().mean())
            if have_truth:
                a, ph = float(batch.amplitude[b]), float(batch.phase[b])  # type: ignore[index]
                ax.plot(grid[:, 0], a * torch.sin(grid[:, 0] - ph), color="k", linewidth=1.5, label="truth A sin(x − φ)")
                head = f"test task {b}: A = {a:.2f}, phase = {ph:.2f}"
            else:
                head = f"test task {b} (truth: query points only)"
            ax.plot(grid[:, 0], predict(theta, grid)[:, 0], color="C0", linestyle="--", label="θ (meta-initialisation)")
            ax.plot(grid[:, 0], predict(phi_b, grid)[:, 0], color="C3", label=f"φ (adapted, {cfg.algorithm})")
            ax.scatter(qx[:, 0], qy[:, 0], s=14, facecolors="none", edgecolors="0.4", label="query points", zorder=3)
            ax.scatter(sx[:, 0], sy[:, 0], s=30, color="C2", label=f"support ({cfg.shots} points)", zorder=4)
            ax.set_title(f"{head}\nquery MSE: θ {mse_theta:.3g} → φ {mse_phi:.3g}", fontsize="small")
            ax.set_xlabel("x")
            ax.grid(True, alpha=0.3)
        for ax in flat[tasks:]:
            ax.set_visible(False)
        fig.suptitle(f"{cfg.algorithm} on sinusoid {cfg.shots}-shot, meta-step {int(ckpt['step'])}: "
                     f"test tasks 0–{tasks - 1} (seed {seed})")
        _legend_below(fig, flat[0], ncol=5 if ncols > 1 else 2)
        return _save(fig, out_png)
    finally:
        plt.close(fig)


_SEED_SUFFIX = re.compile(r"-s(\d+)$")
_LINESTYLES = ("-", "--", ":", "-.")
#: One colour per algorithm, the same in every figure, when the configurations are the
#: algorithms themselves (the protocol scripts' ``maml-s0``, ``imaml-s1``, ...).
ALGORITHM_COLORS = {"imaml": "C0", "maml": "C1", "fomaml": "C2", "reptile": "C3", "imaml-hf": "C4"}


def _colors(names: Sequence[str], plt: Any) -> list[Any]:
    """A colour per configuration: the algorithm's own where every name is an algorithm,
    else in order (matplotlib's ten, or tab20's twenty beyond ten)."""
    if set(names) <= ALGORITHM_COLORS.keys():
        return [ALGORITHM_COLORS[n] for n in names]
    return [f"C{i % 10}" if len(names) <= 10 else plt.get_cmap("tab20")(i % 20) for i in range(len(names))]


def _group_and_seed(run: _Run) -> tuple[str, int]:
    """The configuration a run belongs to (its folder name without ``-s<seed>``, else its
    label without the seed) and its seed."""
    name = run.folder.resolve().name
    m = _SEED_SUFFIX.search(name)
    if m:
        return name[: m.start()], int(m.group(1))
    seed = int(run.config.get("seed", 0))
    return re.sub(r" seed \d+$", "", run.default_label()), seed


def plot_time_to_accuracy(
    run_dirs: Sequence[str | Path],
    out_png: str | Path,
    *,
    title: str | None = None,
    order: Sequence[str] | None = None,
) -> Path:
    """Validation metric against training seconds and against meta-steps: one colour per
    configuration (per algorithm the same in every figure: ``ALGORITHM_COLORS``), one line
    style per seed (so that many runs stay readable).

    A run's configuration is its folder name without the ``-s<seed>`` suffix (the protocol
    scripts' naming: ``imaml-s0``, ``imaml-s1`` share a colour), else its label without the
    seed.  Each curve is the run's ``val.csv``; its 95% band is drawn faintly.  The legend
    gives, per configuration, each seed's test result (``metrics.json``) where present.

    Args:
        run_dirs: training output folders with ``log.csv`` and ``val.csv``.
        out_png: the PNG to write.
        title: figure title (default: the setting).
        order: configurations in legend / colour order (default: as first met).

    Returns:
        The path written.

    Raises:
        ValueError: no run has a ``val.csv``.
    """
    runs = [_Run(Path(d)) for d in run_dirs]
    runs = [r for r in runs if r.val is not None]
    if not runs:
        raise ValueError("none of the run folders has a val.csv (train with --eval-every N)")
    groups: dict[str, list[tuple[int, _Run]]] = {}
    for r in runs:
        g, seed = _group_and_seed(r)
        groups.setdefault(g, []).append((seed, r))
    names = [g for g in (order or []) if g in groups] + [g for g in groups if g not in (order or [])]
    seeds = sorted({s for v in groups.values() for s, _ in v})
    plt = _pyplot()
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2))
    try:
        for g, color in zip(names, _colors(names, plt)):
            tests = []
            for seed, r in sorted(groups[g], key=lambda t: t[0]):
                v = r.val
                assert v is not None
                ls = _LINESTYLES[seeds.index(seed) % len(_LINESTYLES)]
                for ax, x in ((ax_t, v["elapsed"]), (ax_s, v["step"])):
                    ax.plot(x, v["metric"], color=color, linestyle=ls, linewidth=1.4)
                    if np.isfinite(v["ci95"]).any():
                        ax.fill_between(x, v["metric"] - v["ci95"], v["metric"] + v["ci95"], color=color, alpha=0.07,
                                        linewidth=0)
                if "mean" in r.metrics:
                    tests.append(f"{100 * float(r.metrics['mean']):.1f}" if r.task == "classification"
                                 else f"{float(r.metrics['mean']):.3g}")
            label = g + (f" (test: {' / '.join(tests)})" if tests else "")
            ax_t.plot([], [], color=color, linewidth=2.5, label=label)
        for k, seed in enumerate(seeds):
            ax_t.plot([], [], color="0.3", linestyle=_LINESTYLES[k % len(_LINESTYLES)], label=f"seed {seed}")
        metric = "validation accuracy" if runs[0].task == "classification" else "validation MSE"
        ax_t.set_xlabel("training seconds (meta-steps only, validation excluded)")
        ax_s.set_xlabel("meta-step")
        for ax in (ax_t, ax_s):
            ax.set_ylabel(metric)
            ax.grid(True, alpha=0.3)
        if runs[0].task == "regression":
            _log_scale_if_positive(ax_t, *[r.val["metric"] for r in runs if r.val is not None])
            _log_scale_if_positive(ax_s, *[r.val["metric"] for r in runs if r.val is not None])
        fig.suptitle(title or (runs[0].setting() or "") + ": time to accuracy", fontsize=11)
        _legend_below(fig, ax_t, ncol=3)
        return _save(fig, out_png)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``plot`` subcommand to ``subparsers`` (from ``parser.add_subparsers()``).

    The subparser's default ``func`` is :func:`run`, so a caller may dispatch with
    ``args.func(args)``.

    Returns:
        The ``plot`` subparser.
    """
    p = subparsers.add_parser(
        "plot",
        help="draw learning curves of runs (and sinusoid fits)",
        description="Draw the learning curves of one or several training runs on one figure: validation metric "
        "(from val.csv, if any) against meta-step and wall-clock seconds, training query metric and meta-loss "
        "against meta-step.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training output folders (each with a log.csv)")
    p.add_argument("--out", default=None,
                   help="PNG to write, or a folder to write curves.png in (default RUN_DIR/curves.png for one run, "
                   "else ./curves.png)")
    p.add_argument("--labels", default=None, help="comma-separated legend labels, one per run")
    p.add_argument("--title", default=None, help="figure title (default: the dataset setting)")
    p.add_argument("--by-seed", action="store_true",
                   help="time to accuracy: validation metric against training seconds and meta-steps, one colour per "
                   "configuration (folder name without -s<seed>), one line style per seed")
    p.add_argument("--fits", action="store_true",
                   help="also write RUN_DIR/fits.png for sinusoid runs (test-task fits from RUN_DIR/checkpoint.pt)")
    p.set_defaults(func=run)
    return p


def _dataset_of(folder: Path, ckpt_path: Path) -> str | None:
    config = _read_json(folder / "config.json")
    if "dataset" in config:
        return str(config["dataset"])
    from .checkpoint import load_checkpoint

    return load_checkpoint(ckpt_path)["config"].get("dataset")


def run(args: argparse.Namespace, *, log: Callable[[str], None] = print) -> int:
    """Execute ``plot``: write the curves (and with ``--fits`` the sinusoid fits).

    Prints one ``wrote PATH`` line per file written.

    Returns:
        0.

    Raises:
        FileNotFoundError: a run folder, its ``log.csv`` or (``--fits``) its checkpoint is missing.
        ValueError: an empty ``log.csv``, or a number of ``--labels`` different from the runs.
    """
    folders = [Path(r) for r in args.runs]
    labels = [s.strip() for s in args.labels.split(",")] if args.labels is not None else None
    if labels is not None and len(labels) != len(folders):
        raise ValueError(f"--labels has {len(labels)} labels for {len(folders)} run folders; give one per run")
    out = Path(args.out) if args.out else (folders[0] / "curves.png" if len(folders) == 1 else Path("curves.png"))
    # What is written is what is printed: a folder gets curves.png inside it, and a name
    # without a suffix the .png that matplotlib would add.
    if out.is_dir():
        out = out / "curves.png"
    elif not out.suffix:
        out = out.with_suffix(".png")
    if getattr(args, "by_seed", False):
        log(f"wrote {plot_time_to_accuracy(folders, out, title=args.title)}")
    else:
        log(f"wrote {plot_learning_curves(folders, out, labels=labels, title=args.title)}")
    if args.fits:
        for folder in folders:
            ckpt = folder / "checkpoint.pt"
            if not ckpt.is_file():
                raise FileNotFoundError(f"--fits: run folder {str(folder)!r} has no checkpoint.pt")
            dataset = _dataset_of(folder, ckpt)
            if dataset != "sinusoid":
                log(f"skipped fits for {folder}: --fits is for sinusoid runs (this is {dataset})")
                continue
            log(f"wrote {plot_sinusoid_fits(ckpt, folder / 'fits.png')}")
    return 0
