"""End-to-end tests of ``python -m applications.imaml``: train, evaluate, resume, bad input."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from applications.imaml.checkpoint import load_checkpoint
from applications.imaml.cli import main
from applications.imaml.runlog import CSV_COLUMNS, read_log

REPO = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^(accuracy|mse): \d+\.\d{4} ± \d+\.\d{4} \(95% CI, (\d+) episodes\)$")


def _omniglot_root() -> Path | None:
    root = Path(os.environ.get("BILEVEL_OMNIGLOT") or REPO.parent / "shared" / "data" / "omniglot")
    return root if root.is_dir() else None


OMNIGLOT = _omniglot_root()
needs_omniglot = pytest.mark.skipif(
    OMNIGLOT is None, reason="Omniglot not found at ../shared/data/omniglot (set BILEVEL_OMNIGLOT to its folder)"
)


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    """The CLI sets torch's thread count for sinusoid; restore it after each test."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert main(argv) == 0
    return capsys.readouterr().out.strip().splitlines()


def _losses(out: Path) -> list[float]:
    return [float(r["meta_loss"]) for r in read_log(out / "log.csv")]


def test_sinusoid_train_evaluate_loss_goes_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sin"
    lines = _run(
        ["train", "--dataset", "sinusoid", "--meta-steps", "120", "--meta-batch", "10", "--outer-lr", "3e-3",
         "--inner-steps", "8", "--out", str(out), "--no-progress", "--device", "cpu"],
        capsys,
    )
    assert "trained to step 120" in lines[-1]
    rows = read_log(out / "log.csv")
    assert len(rows) == 120 and tuple(rows[0]) == CSV_COLUMNS
    losses = _losses(out)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.85 * first, (first, last)
    assert rows[-1]["query_mse"] and not rows[-1]["query_accuracy"] and rows[-1]["cg_iterations"]

    lines = _run(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--episodes", "200", "--no-progress"], capsys)
    m = LINE.match(lines[-1])
    assert m and m.group(1) == "mse" and m.group(2) == "200", lines[-1]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metric"] == "mse" and metrics["episodes"] == 200 and metrics["step"] == 120

    # the meta-trained initialisation adapts better than the initial one, on the same test tasks
    init = tmp_path / "init"
    _run(["train", "--dataset", "sinusoid", "--meta-steps", "0", "--inner-steps", "8", "--out", str(init), "--no-progress",
          "--device", "cpu"], capsys)
    _run(["evaluate", "--checkpoint", str(init / "checkpoint.pt"), "--episodes", "200", "--no-progress"], capsys)
    assert metrics["mean"] < json.loads((init / "metrics.json").read_text())["mean"]


@needs_omniglot
@pytest.mark.parametrize("algorithm", ["imaml", "fomaml"])
def test_omniglot_train_evaluate(algorithm: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / algorithm
    lines = _run(
        ["train", "--dataset", "omniglot", "--data-root", str(OMNIGLOT), "--ways", "3", "--shots", "1", "--queries", "2",
         "--algorithm", algorithm, "--meta-steps", "40", "--meta-batch", "4", "--filters", "8", "--inner-steps", "5",
         "--outer-lr", "1e-2", "--out", str(out), "--no-progress", "--device", "cpu", "--threads", "1",
         "--evaluate", "--eval-episodes", "20", "--eval-batch", "10"],
        capsys,
    )
    losses = _losses(out)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10, losses
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metric"] == "accuracy" and LINE.match(metrics["line"]) and lines[-1] == metrics["line"]
    assert 0.0 <= metrics["mean"] <= 1.0


def test_resume_continues_exactly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Fixed strategies: "auto" is timed per process, and runs a and b are compared bitwise.
    common = ["--dataset", "sinusoid", "--meta-batch", "4", "--inner-steps", "4", "--learn-lam", "--no-progress",
              "--device", "cpu", "--batching", "vmap", "--query-batching", "vmap"]
    a, b = tmp_path / "a", tmp_path / "b"
    _run(["train", *common, "--meta-steps", "6", "--out", str(a)], capsys)
    _run(["train", *common, "--meta-steps", "3", "--out", str(b)], capsys)
    _run(["train", "--dataset", "sinusoid", "--resume", "--meta-steps", "6", "--out", str(b), "--no-progress"], capsys)
    ca, cb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert ca["step"] == cb["step"] == 6
    for part in ("theta", "rho"):
        assert ca[part].keys() == cb[part].keys() and ca[part]
        for k in ca[part]:
            assert torch.equal(ca[part][k], cb[part][k]), (part, k)
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    la, lb = read_log(a / "log.csv"), read_log(b / "log.csv")
    assert [r["meta_loss"] for r in la] == [r["meta_loss"] for r in lb] and len(lb) == 6
    with pytest.raises(SystemExit):  # a different hyperparameter cannot silently change a resumed run
        main(["train", "--dataset", "sinusoid", "--resume", "--meta-steps", "8", "--lam", "3", "--out", str(b), "--no-progress"])
    assert "different configuration" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an existing run is not overwritten by accident
        main(["train", *common, "--meta-steps", "2", "--out", str(a)])
    assert "--resume" in capsys.readouterr().err


def test_bad_input_gives_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "--dataset", "cifar", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "invalid choice: 'cifar'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "sinusoid", "--algorithm", "protonet", "--out", str(tmp_path / "x")])
    assert "invalid choice: 'protonet'" in capsys.readouterr().err

    monkeypatch.delenv("BILEVEL_OMNIGLOT", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["train", "--dataset", "omniglot", "--meta-steps", "1", "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--data-root" in err and "BILEVEL_OMNIGLOT" in err
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "omniglot", "--data-root", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert "does not exist" in capsys.readouterr().err

    if OMNIGLOT is not None:
        with pytest.raises(SystemExit):
            main(["train", "--dataset", "omniglot", "--data-root", str(OMNIGLOT), "--shots", "10", "--queries", "15",
                  "--meta-steps", "1", "--out", str(tmp_path / "o"), "--no-progress"])
        err = capsys.readouterr().err
        assert "shots + queries = 10 + 15 = 25 exceeds the 20 images per class" in err

    with pytest.raises(SystemExit):
        main(["train", "--dataset", "sinusoid", "--meta-batch", "0", "--out", str(tmp_path / "x")])
    assert "positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--checkpoint", str(tmp_path / "nope.pt")])
    assert "no checkpoint" in capsys.readouterr().err


def test_time_limit_stops_at_a_step_boundary_with_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "budget"
    lines = _run(
        ["train", "--dataset", "sinusoid", "--meta-steps", "100000", "--meta-batch", "4", "--inner-steps", "2",
         "--time-limit", "0.5", "--out", str(out), "--no-progress", "--device", "cpu"],
        capsys,
    )
    assert any("time limit of 0.5 s reached" in line for line in lines)
    steps = len(read_log(out / "log.csv"))
    assert 1 <= steps < 100000
    assert load_checkpoint(out / "checkpoint.pt")["step"] == steps
