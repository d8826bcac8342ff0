"""The logs of a training run: ``log.csv`` (one row per meta-step), ``val.csv`` and TensorBoard.

:data:`LOG_COLUMNS` is the one place that says which value goes in which column of
``log.csv`` and how it is written: a meta-step hands :meth:`RunLog.write_step` its values
keyed by column name (the meta-gradient's statistics, λ, the step's own measurements),
and every column takes its value from there (empty where a step has none, e.g. the CG
columns of MAML).  The columns' meanings: docs/applications/imaml.md, "Outputs and log format".
"""

from __future__ import annotations

import csv
import json
import os
import resource
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["CSV_COLUMNS", "LOG_COLUMNS", "VAL_COLUMNS", "RunLog", "log_row", "peak_memory_mb", "read_log"]

#: ``(column, format spec)`` of ``log.csv``, in order.
LOG_COLUMNS: tuple[tuple[str, str], ...] = (
    ("step", "d"),
    ("meta_loss", ".6g"),
    ("query_accuracy", ".6g"),
    ("query_mse", ".6g"),
    ("inner_grad_norm", ".6g"),
    ("cg_residual", ".6g"),
    ("cg_iterations", ".6g"),
    ("cg_failures", ".6g"),
    ("inner_failures", ".6g"),
    ("inner_grad_ratio", ".6g"),
    ("inner_monotone", ".6g"),
    ("inner_descent", ".6g"),
    ("inner_lr_curvature", ".6g"),
    ("lam_mean", ".6g"),
    ("lam_min", ".6g"),
    ("lam_max", ".6g"),
    ("step_seconds", ".4f"),
    ("elapsed_seconds", ".2f"),
    ("peak_mem_mb", ".1f"),
)
CSV_COLUMNS = tuple(name for name, _ in LOG_COLUMNS)
#: The column of the query metric, by task.
METRIC_COLUMN = {"classification": "query_accuracy", "regression": "query_mse"}

VAL_COLUMNS = ("step", "elapsed_seconds", "val_metric", "val_ci95", "val_loss", "episodes")


def log_row(values: Mapping[str, Any]) -> dict[str, str]:
    """The ``log.csv`` row of one meta-step: each column of :data:`LOG_COLUMNS` from
    ``values[column]`` in its format, ``""`` where ``values`` has none."""

    def cell(v: Any, spec: str) -> str:
        return "" if v is None else format(int(v) if spec == "d" else float(v), spec)

    return {name: cell(values.get(name), spec) for name, spec in LOG_COLUMNS}


def read_log(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated by tensors during the step; CPU: the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def memory_meaning(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated during the meta-step (MiB; reset every step)"
    return "peak resident set size of the whole process so far, getrusage ru_maxrss (MiB; monotone, includes data and Python)"


def _open_tensorboard(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # not installed (ImportError) or broken install: TensorBoard is optional
        return None
    return SummaryWriter(str(path))


class RunLog:
    """The log files of a run folder.  Only a writer (rank 0) writes anything.

    Args:
        out: the run folder.
        writer: whether this process writes.
        validation: whether the run validates (``val.csv``).
        resume: keep the rows up to ``step`` of an existing log (a resumed run).
        step: the step the run (re)starts from.
        info: what ``run_info.json`` records beside the meaning of ``peak_mem_mb``.
        device: the training device (for that meaning).
    """

    def __init__(self, out: Path, *, writer: bool, validation: bool, resume: bool, step: int, info: dict[str, Any],
                 device: torch.device) -> None:
        self.csv_path, self.val_path = out / "log.csv", out / "val.csv"
        self.writer = writer
        self.tb: Any = None
        if not writer:
            return
        self._restart(self.csv_path, CSV_COLUMNS, resume, step)
        if validation:
            self._restart(self.val_path, VAL_COLUMNS, resume, step)
        meaning = {"peak_mem_mb": memory_meaning(device), "device": str(device), **info}
        (out / "run_info.json").write_text(json.dumps(meaning, indent=2) + "\n")
        self.tb = _open_tensorboard(out / "tensorboard")

    @staticmethod
    def _restart(path: Path, columns: tuple[str, ...], resume: bool, step: int) -> None:
        """Header only, or on resume the rows up to the checkpoint's step (later rows belong
        to steps that will be replayed), written atomically."""
        rows: list[dict[str, str]] = []
        if resume and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= step]
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)

    def write_step(self, values: Mapping[str, Any]) -> dict[str, str]:
        """Append the row of one meta-step (:func:`log_row`) and return it."""
        row = log_row(values)
        if self.writer:
            with open(self.csv_path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=CSV_COLUMNS).writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and v != "":
                    self.tb.add_scalar(k, float(v), int(row["step"]))
        return row

    def write_validation(self, row: dict[str, Any], metric: float) -> None:
        """Append a row of ``val.csv`` (columns :data:`VAL_COLUMNS`; ``metric``: its
        ``val_metric`` unrounded, for TensorBoard)."""
        if self.writer:
            with open(self.val_path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=VAL_COLUMNS).writerow(row)
        if self.tb is not None:
            self.tb.add_scalar("val_metric", metric, int(row["step"]))

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
