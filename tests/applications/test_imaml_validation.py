"""``--eval-every``: validation curve (val.csv), best checkpoint, exact resume of both, the
validation split kept out of meta-training; and the defaults the documentation states."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from test_imaml_cli import OMNIGLOT, needs_omniglot

from applications.imaml.checkpoint import load_checkpoint
from applications.imaml.cli import main
from applications.imaml.config import resolve_config
from applications.imaml.runlog import VAL_COLUMNS
from applications.imaml.tasks import make_task_source


@pytest.fixture(autouse=True)
def _restore_threads():  # type: ignore[no-untyped-def]
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _val(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# Fixed strategies: "auto" is timed per process, and two runs are compared exactly.
COMMON = ["--dataset", "sinusoid", "--meta-batch", "4", "--inner-steps", "3", "--eval-every", "2", "--val-episodes", "20",
          "--no-progress", "--device", "cpu", "--batching", "vmap", "--query-batching", "vmap"]


def test_eval_every_writes_curve_and_best_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "v"
    assert main(["train", *COMMON, "--meta-steps", "5", "--out", str(out)]) == 0
    rows = _val(out / "val.csv")
    assert tuple(rows[0]) == VAL_COLUMNS
    assert [int(r["step"]) for r in rows] == [2, 4, 5]  # every 2 steps and at the last
    assert all(float(r["val_metric"]) > 0 and int(r["episodes"]) == 20 for r in rows)
    best = load_checkpoint(out / "best.pt")
    best_mse = min(float(r["val_metric"]) for r in rows)  # regression: lower is better
    assert best["best_val"] == pytest.approx(best_mse, rel=1e-5)
    assert best["step"] == int(min(rows, key=lambda r: float(r["val_metric"]))["step"])


def test_resume_keeps_the_validation_log_exact(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *COMMON, "--meta-steps", "6", "--out", str(a)]) == 0
    assert main(["train", *COMMON, "--meta-steps", "4", "--out", str(b)]) == 0
    assert main(["train", "--dataset", "sinusoid", "--resume", "--meta-steps", "6", "--out", str(b), "--no-progress"]) == 0
    va, vb = _val(a / "val.csv"), _val(b / "val.csv")
    assert [(r["step"], r["val_metric"]) for r in va] == [(r["step"], r["val_metric"]) for r in vb]


def test_bad_eval_options_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "sinusoid", "--val-episodes", "0", "--out", str(tmp_path / "x")])
    assert "positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "sinusoid", "--outer-lr", "inf", "--out", str(tmp_path / "x")])
    assert "finite" in capsys.readouterr().err


@needs_omniglot
def test_validation_characters_are_held_out_of_training() -> None:
    kw = dict(ways=5, shots=1, queries=1, seed=0, data_root=str(OMNIGLOT))
    sources = (make_task_source("omniglot", "train", hold_out_val=True, **kw), make_task_source("omniglot", "val", **kw),
               make_task_source("omniglot", "train", **kw))
    # "omniglot <split> split (<C> classes), ..."
    (s_train, n_train), (s_val, n_val), (s_full, n_full) = (
        (src.description.split()[1], int(src.description.split("(")[1].split()[0])) for src in sources)
    assert (s_train, s_val, s_full) == ("train", "val", "trainval")
    assert n_train + n_val == n_full and n_val > 0


def test_omniglot_defaults_are_what_the_readme_says() -> None:
    """docs/applications/imaml.md, 'Defaults' and 'Defaults and where they come from'."""
    five = resolve_config(dataset="omniglot", algorithm="imaml", data_root="x", device="cpu").learner
    assert (five.lam, five.inner_steps, five.inner_lr, five.linsolve, five.cg_steps, five.recipe) == (0.1, 3, 0.4, "minres", 2, "proximal")
    assert five.inner_optimizer == "gd" and five.compile == "off"
    twenty = resolve_config(dataset="omniglot", algorithm="imaml", ways=20, data_root="x", device="cpu").learner
    assert (twenty.lam, twenty.inner_steps, twenty.inner_lr, twenty.cg_steps) == (0.1, 5, 0.3, 2)
    hf = resolve_config(dataset="omniglot", algorithm="imaml-hf", data_root="x", device="cpu").learner
    assert hf.cg_steps == 5
    dev = resolve_config(dataset="omniglot", algorithm="imaml", recipe="imaml-dev", data_root="x", device="cpu")
    assert (dev.learner.lam, dev.learner.cg_damping, dev.learner.lam_damping, dev.adam_eps) == (2.0, 1.0, 10.0, 1e-3)


def test_unstable_inner_loop_warns_once_naming_the_knob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stats of an oscillating inner loop (the objective rising during the loop on every task)
    over the window give exactly one warning that names --inner-lr and --lam; a stable one
    gives none, even with a non-monotone gradient norm; a curvature estimate above 2 warns."""
    from applications.imaml.algorithms import MetaLearner
    from applications.imaml.health import HEALTH_WINDOW

    def run(stats: dict[str, float], out: Path) -> list[str]:
        real = MetaLearner.meta_gradient

        def fake(self, theta, rho, batch):  # type: ignore[no-untyped-def]
            res = real(self, theta, rho, batch)
            res.stats.update(stats)
            return res

        monkeypatch.setattr(MetaLearner, "meta_gradient", fake)
        lines: list[str] = []
        from applications.imaml.config import resolve_config
        from applications.imaml.train import train

        cfg = resolve_config(dataset="sinusoid", meta_steps=HEALTH_WINDOW + 5, meta_batch=2, inner_steps=2,
                             device="cpu", out=str(out))
        train(cfg, progress=False, log=lines.append)
        return [line for line in lines if line.startswith("warning")]

    warned = run({"inner_grad_ratio": 0.3, "inner_monotone": 0.0, "inner_descent": 0.0}, tmp_path / "bad")
    assert len(warned) == 1 and "--inner-lr" in warned[0] and "--lam" in warned[0]
    assert f"meta-step {HEALTH_WINDOW}" in warned[0]
    assert run({"inner_grad_ratio": 0.3, "inner_monotone": 0.4, "inner_descent": 1.0}, tmp_path / "good") == []
    curv = run({"inner_grad_ratio": 0.01, "inner_descent": 1.0, "inner_lr_curvature": 2.5}, tmp_path / "curv")
    assert len(curv) == 1 and "2.50 > 2" in curv[0]
