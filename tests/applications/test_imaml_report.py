"""The protocol report: grouping by configuration over seeds, equal-steps and equal-time tables, pictures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from applications.imaml.cli import main
from applications.imaml.report import group_runs
from applications.imaml.report import main as report_main


@pytest.fixture(autouse=True)
def _restore_threads():  # type: ignore[no-untyped-def]
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_report_on_two_configurations_two_seeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    setting = tmp_path / "proto" / "sin"
    for name, flags in (("imaml-lam0.5", ["--lam", "0.5"]), ("imaml-lam2", ["--lam", "2"])):
        for seed in (0, 1):
            assert main(["train", "--dataset", "sinusoid", "--meta-steps", "4", "--meta-batch", "2", "--inner-steps", "2",
                         "--eval-every", "2", "--val-episodes", "10", "--evaluate", "--eval-episodes", "10", "--seed", str(seed),
                         "--no-progress", "--device", "cpu", "--out", str(setting / f"{name}-s{seed}"), *flags]) == 0
    (setting / "unfinished-s0").mkdir()  # no metrics.json: ignored
    groups = group_runs(setting)
    assert sorted(groups) == ["imaml-lam0.5", "imaml-lam2"] and all(len(v) == 2 for v in groups.values())
    capsys.readouterr()
    assert report_main([str(tmp_path / "proto"), "--out", str(tmp_path / "res")]) == 0
    text = (tmp_path / "res" / "sin" / "table.md").read_text()
    assert "equal meta-steps" in text and "equal wall-clock" in text and "val@2" in text and "val@4" in text
    assert text.count("| imaml-lam") == 4  # each configuration in both tables
    for png in ("curves.png", "curves_all.png", "sweep.png"):
        data = (tmp_path / "res" / "sin" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert (tmp_path / "res" / "sin" / "runs" / "imaml-lam2-s1" / "val.csv").is_file()
    assert not list((tmp_path / "res").rglob("*.pt"))  # checkpoints are not copied
