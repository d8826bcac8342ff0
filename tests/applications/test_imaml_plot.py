"""Tests of ``applications.imaml.plot``: learning curves from hand-written logs, sinusoid fits
from a real (tiny) run, and the ``plot`` subcommand through a standalone parser."""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")

from applications.imaml.cli import main  # noqa: E402
from applications.imaml.plot import (  # noqa: E402
    add_parser,
    plot_learning_curves,
    plot_sinusoid_fits,
    run,
    running_mean,
)
from applications.imaml.runlog import CSV_COLUMNS  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > 1024, f"{path} is only {len(data)} bytes"


def _write_run(folder: Path, *, classification: bool = True, steps: int = 60, val: bool = True,
               config: bool = True, metrics: bool = True) -> Path:
    """A run folder written by hand, shaped like the training loop's outputs."""
    folder.mkdir(parents=True)
    with open(folder / "log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for s in range(1, steps + 1):
            loss = 2.0 * math.exp(-s / 20) + 0.1 + 0.05 * math.sin(s)
            w.writerow({
                "step": s,
                "meta_loss": f"{loss:.6g}",
                "query_accuracy": f"{1 - loss / 3:.6g}" if classification else "",
                "query_mse": "" if classification else f"{loss:.6g}",
                "step_seconds": "0.1",
                "elapsed_seconds": f"{0.1 * s:.2f}",
            })
    if val:
        with open(folder / "val.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "elapsed_seconds", "val_metric", "val_ci95", "val_loss", "episodes"])
            for s in range(10, steps + 1, 10):
                m = 0.5 + s / (4 * steps) if classification else 3.0 * math.exp(-s / 30)
                # A wide CI on the regression run: the band's lower edge goes below 0 (log axis).
                ci = 0.02 if classification else 1.2 * m
                w.writerow([s, f"{0.1 * s:.2f}", f"{m:.6g}", f"{ci:.6g}", f"{m:.6g}", 100])
    if config:
        cfg = {"dataset": "omniglot" if classification else "sinusoid", "algorithm": "imaml", "lam": 2.0, "seed": 3,
               "ways": 5, "shots": 1 if classification else 5, "learn_lam": False}
        (folder / "config.json").write_text(json.dumps(cfg))
    if metrics:
        m = {"metric": "accuracy" if classification else "mse", "mean": 0.93 if classification else 0.4,
             "ci95": 0.01, "episodes": 600}
        (folder / "metrics.json").write_text(json.dumps(m))
    return folder


def test_running_mean() -> None:
    y = torch.tensor([1.0, 3.0, float("nan"), 5.0]).numpy()
    assert running_mean(y, 2).tolist() == [1.0, 2.0, 3.0, 5.0]
    assert running_mean(y, 1)[[0, 1, 3]].tolist() == [1.0, 3.0, 5.0]


@pytest.mark.parametrize("classification", [True, False])
def test_curves_with_validation(tmp_path: Path, classification: bool) -> None:
    a = _write_run(tmp_path / "a", classification=classification)
    b = _write_run(tmp_path / "b", classification=classification, val=False, config=False, metrics=False, steps=30)
    out = plot_learning_curves([a, b], tmp_path / "figs" / "curves.png", title="two runs")
    assert out == tmp_path / "figs" / "curves.png"
    _assert_png(out)


def test_curves_without_validation_and_labels(tmp_path: Path) -> None:
    a = _write_run(tmp_path / "a", val=False)
    b = _write_run(tmp_path / "b", val=False, steps=1)  # one meta-step: still drawn
    out = plot_learning_curves([a, b], tmp_path / "c.png", labels=["first", "second"])
    _assert_png(out)
    with pytest.raises(ValueError, match="labels"):
        plot_learning_curves([a, b], tmp_path / "d.png", labels=["only one"])


def test_missing_or_empty_log(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        plot_learning_curves([tmp_path / "nowhere"], tmp_path / "x.png")
    (tmp_path / "nolog").mkdir()
    with pytest.raises(FileNotFoundError, match=r"nolog.*log\.csv"):
        plot_learning_curves([tmp_path / "nolog"], tmp_path / "x.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "log.csv").write_text(",".join(CSV_COLUMNS) + "\n")  # header only: training has not logged a step
    with pytest.raises(ValueError, match="empty"):
        plot_learning_curves([empty], tmp_path / "x.png")
    (empty / "log.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        plot_learning_curves([empty], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_mixed_tasks_rejected(tmp_path: Path) -> None:
    a = _write_run(tmp_path / "a", classification=True)
    b = _write_run(tmp_path / "b", classification=False)
    with pytest.raises(ValueError, match="classification and regression"):
        plot_learning_curves([a, b], tmp_path / "x.png")


@pytest.fixture(scope="module")
def sinusoid_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 3-step sinusoid run (the CLI sets torch's thread count for sinusoid: restored)."""
    out = tmp_path_factory.mktemp("sin") / "run"
    n = torch.get_num_threads()
    try:
        rc = main(["train", "--dataset", "sinusoid", "--meta-steps", "3", "--meta-batch", "2", "--out", str(out),
                   "--no-progress", "--device", "cpu"], log=lambda s: None)
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    return out


def test_sinusoid_fits(sinusoid_run: Path, tmp_path: Path) -> None:
    out = plot_sinusoid_fits(sinusoid_run / "checkpoint.pt", tmp_path / "fits.png", tasks=3, seed=1)
    _assert_png(out)
    with pytest.raises(ValueError, match="tasks"):
        plot_sinusoid_fits(sinusoid_run / "checkpoint.pt", tmp_path / "f.png", tasks=0)
    with pytest.raises(FileNotFoundError):
        plot_sinusoid_fits(tmp_path / "missing.pt", tmp_path / "f.png")


def test_sinusoid_fits_without_recoverable_truth(sinusoid_run: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A source whose batches do not carry amplitude and phase still gets its fits drawn
    (with the query points as the only truth) instead of a wrong sine."""
    import dataclasses

    from applications.imaml.tasks import TaskSource

    original = TaskSource.batch
    monkeypatch.setattr(TaskSource, "batch",
                        lambda self, idx: dataclasses.replace(original(self, idx), amplitude=None, phase=None))
    _assert_png(plot_sinusoid_fits(sinusoid_run / "checkpoint.pt", tmp_path / "fits.png", tasks=1))


def _plot_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="test")
    sub = parser.add_subparsers(dest="command")
    p = add_parser(sub)
    assert isinstance(p, argparse.ArgumentParser)
    return parser


def test_subcommand_one_run_with_fits(sinusoid_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _plot_parser().parse_args(["plot", str(sinusoid_run), "--labels", "iMAML", "--title", "T", "--fits"])
    assert args.command == "plot" and args.func is run
    assert run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"wrote {sinusoid_run / 'curves.png'}", f"wrote {sinusoid_run / 'fits.png'}"]
    _assert_png(sinusoid_run / "curves.png")
    _assert_png(sinusoid_run / "fits.png")


def test_subcommand_several_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    a = _write_run(tmp_path / "a")
    b = _write_run(tmp_path / "b", val=False)
    monkeypatch.chdir(tmp_path)
    parser = _plot_parser()
    assert run(parser.parse_args(["plot", str(a), str(b)])) == 0
    assert capsys.readouterr().out.splitlines() == ["wrote curves.png"]
    _assert_png(tmp_path / "curves.png")
    # --fits on runs that are not sinusoid: the folder must at least have a checkpoint.
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        run(parser.parse_args(["plot", str(a), "--out", "o.png", "--fits"]))
    with pytest.raises(ValueError, match="labels"):
        run(parser.parse_args(["plot", str(a), str(b), "--labels", "x"]))


def test_out_naming_a_folder_or_a_name_without_suffix_prints_what_it_writes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _write_run(tmp_path / "a")
    parser = _plot_parser()
    assert run(parser.parse_args(["plot", str(a), "--out", str(a)])) == 0  # an existing folder
    assert capsys.readouterr().out.splitlines() == [f"wrote {a / 'curves.png'}"]
    _assert_png(a / "curves.png")
    assert run(parser.parse_args(["plot", str(a), "--out", str(tmp_path / "pic")])) == 0  # no suffix
    assert capsys.readouterr().out.splitlines() == [f"wrote {tmp_path / 'pic.png'}"]
    _assert_png(tmp_path / "pic.png")
