"""applications/hyperopt: data hyper-cleaning (``clean``, the default subcommand) and the
hypergradient estimators side by side (``compare``), on small instances."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn", reason="the hyper-cleaning application reads scikit-learn's digits")

import bilevel  # noqa: E402
from applications.hyperopt import cleaning, cli, compare  # noqa: E402
from bilevel.linsolve import CG  # noqa: E402
from bilevel.solvers import NewtonCG  # noqa: E402
from bilevel.testing import check_implicit_grad  # noqa: E402

TINY = ["--n-train", "120", "--n-val", "60", "--grid", "1e-2,1e-1", "--folds", "2", "--no-progress", "--threads", "1"]


def test_corruption_is_recorded_and_always_a_different_class() -> None:
    prob = cleaning.load(3, noise=0.4, n_train=100, n_val=50)
    assert int(prob.corrupted.sum()) == 40
    assert bool((prob.y_train[prob.corrupted] != prob.y_train_true[prob.corrupted]).all())
    assert bool((prob.y_train[~prob.corrupted] == prob.y_train_true[~prob.corrupted]).all())
    assert len(prob.y_test) == 1797 - 150 and prob.x_train.dtype == torch.float64
    assert torch.allclose(prob.x_train.mean(0), torch.zeros(64, dtype=torch.float64), atol=1e-12)  # training statistics


def test_hypergradient_matches_finite_differences() -> None:
    prob = cleaning.load(1, noise=0.5, n_train=40, n_val=30)
    layer = bilevel.Argmin(cleaning.inner_objective, solver=NewtonCG(rtol=1e-12, atol=1e-12, maxiter=200),
                           linsolve=CG(rtol=1e-12, maxiter=5000))
    x0 = cleaning.zeros(64, prob.classes)

    def validation_loss(w: torch.Tensor) -> torch.Tensor:
        sol = layer(x0, w, prob.x_train, prob.y_train, 0.05)  # from a fixed start: re-solved at every call
        return torch.nn.functional.cross_entropy(prob.x_val @ sol["W"] + sol["b"], prob.y_val)

    w = (0.5 * torch.randn(40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).requires_grad_()
    report = check_implicit_grad(validation_loss, (w,), solver_tol=1e-10, raise_exception=False)
    assert report.ok, str(report)


def test_tiny_run_writes_outputs_and_lowers_the_weights_of_corrupted_labels(tmp_path: Path) -> None:
    lines: list[str] = []
    rc = cleaning.main([*TINY, "--hyper-steps", "25", "--seeds", "0,1", "--out", str(tmp_path)], log=lines.append)
    assert rc == 0
    for name in ("log.csv", "baselines.csv", "results.json", "weights.png", "accuracy.png"):
        assert (tmp_path / name).exists(), name
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["seeds"] == [0, 1]
    for seed in ("0", "1"):
        sig, bad = res["weights"][seed]["sigma_w"], res["weights"][seed]["corrupted"]
        clean_mean = sum(s for s, c in zip(sig, bad) if not c) / sum(not c for c in bad)
        bad_mean = sum(s for s, c in zip(sig, bad) if c) / sum(bad)
        assert bad_mean < clean_mean - 0.1, (seed, bad_mean, clean_mean)
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 50 and float(rows[-1]["seconds"]) > 0
    assert lines[-1].startswith("test accuracy: ") and "validation only" in lines[-1] and "oracle" in lines[-1]
    assert any(line.startswith("detector") and "F1" in line for line in lines)


def test_baselines_run_and_choose_alpha_on_the_grid() -> None:
    prob = cleaning.load(0, noise=0.5, n_train=120, n_val=60)
    out = cleaning.run_baselines(prob, [1e-2, 1e-1], folds=2, seed=0)
    assert list(out) == list(cleaning.BASELINES)
    for m in out.values():
        assert m["alpha"] in (1e-2, 1e-1) and 0.0 <= m["test_acc"] <= 1.0
    assert out["oracle: clean train + validation"]["test_acc"] > out["noisy"]["test_acc"]


def test_first_order_is_one_unrolled_step_from_the_solution() -> None:
    """The documented identity: first-order = Neumann(η, steps=1) = backprop through one
    gradient step from θ*; Neumann(η, steps=k) = k unrolled steps from θ*."""
    prob = cleaning.load(2, noise=0.5, n_train=60, n_val=30)
    with torch.no_grad():
        start = cleaning.make_layer()(cleaning.zeros(64, prob.classes), torch.zeros(60, dtype=torch.float64),
                                      prob.x_train, prob.y_train, 0.05)
    start = {k: v.detach() for k, v in start.items()}
    grads = {key: compare.Method(key, prob, 0.05, 0.5, 0.1, start).hypergradient()[0]
             for key in ("first-order", "unrolled1", "neumann4", "unrolled4")}
    assert torch.allclose(grads["first-order"], grads["unrolled1"], rtol=1e-6, atol=1e-12)
    assert torch.allclose(grads["neumann4"], grads["unrolled4"], rtol=1e-6, atol=1e-12)


def test_compare_tiny_run_writes_its_table(tmp_path: Path) -> None:
    lines: list[str] = []
    rc = compare.main(["--methods", "cg5,cg-tol,first-order,unrolled3", "--hyper-steps", "2", "--seeds", "0",
                       "--n-train", "80", "--n-val", "40", "--no-progress", "--threads", "1", "--out", str(tmp_path)],
                      log=lines.append)
    assert rc == 0
    with open(tmp_path / "table.csv") as f:
        table = {r["method"]: r for r in csv.DictReader(f)}
    assert list(table) == ["cg5", "cg-tol", "first-order", "unrolled3"]
    assert float(table["cg-tol"]["rel_error_at_start"]) < 1e-4
    assert int(table["unrolled3"]["peak_saved_bytes"]) > int(table["cg-tol"]["peak_saved_bytes"]) > 0
    assert (tmp_path / "compare.png").exists() and (tmp_path / "log.csv").exists()
    assert any(line.startswith("| implicit, CG(steps=5) |") for line in lines)


@pytest.mark.parametrize("run, argv, word", [
    (cleaning.main, ["--seeds", "a,b"], "--seeds"),
    (cleaning.main, ["--grid", "0.1,-1"], "--grid"),
    (cleaning.main, ["--noise", "1.5"], "--noise"),
    (cleaning.main, ["--hyper-steps", "x"], "--hyper-steps"),
    (cleaning.main, ["--n-train", "1700"], "--n-train"),
    (compare.main, ["--methods", "cg5,lbfgs"], "--methods"),
    (compare.main, ["--methods", "unrolled0"], "--methods"),
])
def test_bad_input_is_one_line_and_exit_2(run, argv: list[str], word: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        run(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and word in err and err.count("\n") == 1, err


def test_cli_dispatches_to_clean_by_default(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(cleaning, "main", lambda argv: seen.append(list(argv)) or 0)
    assert cli.main([]) == 0 and cli.main(["--seeds", "1"]) == 0 and cli.main(["clean", "--seeds", "2"]) == 0
    assert seen == [[], ["--seeds", "1"], ["--seeds", "2"]]
    assert cli.main(["bogus"]) == 2 and "unknown subcommand" in capsys.readouterr().err


def test_cli_runs_clean_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([*TINY, "--hyper-steps", "3", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("test accuracy: ")
    assert (tmp_path / "results.json").exists()
