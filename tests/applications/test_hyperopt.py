"""applications/hyperopt: per-feature L2 strengths learned through an external (scipy) inner
solver, and an inner solver in another process wrapped as an ImplicitLayer."""

from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn", reason="the hyperparameter application reads scikit-learn's bundled data sets")

from applications.hyperopt import external  # noqa: E402
from applications.hyperopt import l2 as app  # noqa: E402
from bilevel.testing import check_implicit_grad  # noqa: E402


def test_small_run_lowers_the_validation_loss(tmp_path: Path) -> None:
    lines: list[str] = []
    rc = app.main(["--limit", "300", "--outer-steps", "4", "--inner-maxiter", "200", "--grid", "1e-3,1e-2,1e-1",
                   "--no-progress", "--threads", "1", "--out", str(tmp_path)], log=lines.append)
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["val_loss_end"] < res["val_loss_start"]
    for part in ("train", "val", "test"):
        assert 0 <= res["learned"][f"{part}_acc"] <= 1 and math.isfinite(res["learned"][f"{part}_loss"])
    assert (tmp_path / "log.csv").exists() and (tmp_path / "strengths.png").exists()
    assert any("best single strength" in ln for ln in lines) and any("learned per-feature" in ln for ln in lines)
    # One row, one state: row 0 is the grid's best strength and its validation loss.
    import csv

    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    alpha = res["grid_best_strength"]
    assert math.isclose(float(rows[0]["strength_min"]), alpha, rel_tol=1e-3)
    assert math.isclose(float(rows[0]["strength_max"]), alpha, rel_tol=1e-3)
    assert math.isclose(float(rows[0]["val_loss"]), res["val_loss_start"], rel_tol=1e-4)


def test_hypergradient_matches_finite_differences() -> None:
    data = app.load("breast_cancer", seed=1, limit=120)
    layer = app.make_layer(maxiter=2000)
    d, c = data["x_train"].shape[1], int(data["classes"])
    x0 = {"W": torch.zeros(d, c, dtype=app.DT), "b": torch.zeros(c, dtype=app.DT)}

    def validation_loss(rho: torch.Tensor) -> torch.Tensor:
        sol = layer(x0, rho, data["x_train"], data["y_train"])
        return torch.nn.functional.cross_entropy(data["x_val"] @ sol["W"] + sol["b"], data["y_val"])

    rho = torch.full((d,), math.log(0.05), dtype=app.DT, requires_grad=True)
    report = check_implicit_grad(validation_loss, (rho,), solver_tol=1e-7, raise_exception=False)
    assert report.ok, str(report)


def test_external_process_solver_passes_check_implicit_grad() -> None:
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        report = external.check(pool)
    assert report.ok, str(report)


def test_bad_grid_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        app.main(["--grid", "a,b"])
    assert e.value.code == 2 and "--grid" in capsys.readouterr().err
