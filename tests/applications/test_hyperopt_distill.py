"""applications/hyperopt/distill.py: dataset distillation (one synthetic digit per class) through
the implicit gradient of a logistic regression's training loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn", reason="the distillation reads scikit-learn's bundled digits")

from applications.hyperopt import cli, distill  # noqa: E402
from bilevel.testing import check_implicit_grad  # noqa: E402

SMALL = ["--limit", "200", "--outer-steps", "12", "--draws", "2", "--per-class", "3", "--grid", "1e-2,1e-1",
         "--no-progress", "--threads", "1"]


def test_hypergradient_wrt_images_matches_finite_differences() -> None:
    data = distill.load(seed=3, limit=60)
    layer = distill.make_layer(rtol=1e-12, maxiter=200)
    labels = torch.arange(distill.CLASSES)
    d = data["x_train"].shape[1]

    def outer_loss(images: torch.Tensor, log_alpha: torch.Tensor) -> torch.Tensor:
        sol = layer(distill.zeros(d), images, log_alpha, labels)  # a fresh, tight solve per call
        return F.cross_entropy(data["x_train"] @ sol["W"] + sol["b"], data["y_train"])

    images = (distill.class_means(data) + 0.3 * torch.randn(distill.CLASSES, d, dtype=distill.DT,
                                                            generator=torch.Generator().manual_seed(0)))
    images.requires_grad_(True)
    log_alpha = torch.tensor(math.log(0.05), dtype=distill.DT, requires_grad=True)
    report = check_implicit_grad(outer_loss, (images, log_alpha), directions=3, solver_tol=1e-9,
                                 raise_exception=False)
    assert report.ok, str(report)
    forward = layer.diagnostics.forward
    assert forward is not None and forward.status.name == "SUCCESS"
    # single pixels, tighter than the directional check's default tolerance
    (grad,) = torch.autograd.grad(outer_loss(images, log_alpha), images)
    eps = 1e-5
    for c, j in [(0, 20), (4, 36), (9, 43)]:
        e = torch.zeros_like(images)
        e[c, j] = eps
        with torch.no_grad():
            fd = (outer_loss(images + e, log_alpha) - outer_loss(images - e, log_alpha)) / (2 * eps)
        assert abs(float(grad[c, j]) - float(fd)) <= 1e-6 * abs(float(fd)) + 1e-9, (c, j, float(grad[c, j]), float(fd))


def test_tiny_run_writes_outputs_and_lowers_the_outer_loss(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["distill", *SMALL, "--out", str(tmp_path)])  # through the one command line
    assert rc == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("test accuracy: ") and "1 per class: " in printed[-1]
    res = json.loads((tmp_path / "results.json").read_text())
    dist = res["distilled"]
    assert dist["train_loss_end"] < dist["train_loss_start"]
    assert 0 <= dist["test_acc"] <= 1 and len(res["images"]) == distill.CLASSES
    many = res["baselines"]["random_3_per_class"]
    assert len(many["test_acc"]) == 2 and all(a in (1e-2, 1e-1) for a in many["alpha"])
    assert res["target_met"] == (dist["test_acc"] > many["test_acc_mean"])
    rows = (tmp_path / "log.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,train_loss") and len(rows) == 1 + 12 + 1  # header, start, 12 steps
    for name in ("images.png", "accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0
    text = (tmp_path / "output.txt").read_text().splitlines()
    assert text[0].startswith("$ python -m applications.hyperopt distill --limit 200")
    assert text[-1] == printed[-1]


@pytest.mark.parametrize("args, word", [(["--outer-lr", "-1"], "--outer-lr"), (["--grid", "a,b"], "--grid"),
                                        (["--outer-steps", "0"], "--outer-steps"),
                                        (["--limit", "60", "--per-class", "30"], "--per-class")])
def test_bad_input_is_one_line_and_exit_2(args: list[str], word: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        distill.main([*args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and word in err[0]


def test_cli_dispatches_to_distill(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["distill", "--help"])
    assert e.value.code == 0 and "python -m applications.hyperopt distill" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["distill", "--alpha", "0"])
    assert e.value.code == 2 and "hyperopt distill: error: --outer-lr and --alpha" in capsys.readouterr().err
