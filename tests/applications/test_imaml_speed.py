"""Issue 17's application changes: the measured query strategy, the inner optimisers, the
compiled monitored inner loop, the training-time budget and the phase profiler."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest
import torch

from applications.imaml.algorithms import LearnerConfig, MetaLearner, inner_solver
from applications.imaml.models import ConvNet
from applications.imaml.tasks import TaskBatch
from bilevel.solvers import Adam, GradientDescent

DT = torch.float64


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _problem(B: int = 3, ways: int = 3, shots: int = 2, queries: int = 3) -> tuple[ConvNet, dict, TaskBatch]:
    torch.manual_seed(0)
    net = ConvNet(1, ways, filters=4, strided=True, image_size=12).to(DT)
    theta = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    y_s = torch.arange(ways).repeat_interleave(shots).expand(B, -1).clone()
    y_q = torch.arange(ways).repeat_interleave(queries).expand(B, -1).clone()
    batch = TaskBatch(torch.randn(B, ways * shots, 1, 12, 12, dtype=DT), y_s,
                      torch.randn(B, ways * queries, 1, 12, 12, dtype=DT), y_q)
    return net, theta, batch


@pytest.mark.parametrize("algorithm", ["imaml", "maml", "fomaml", "reptile"])
def test_query_strategies_give_the_same_meta_gradient(algorithm: str) -> None:
    net, theta, batch = _problem()
    out = {}
    for q in ("vmap", "loop"):
        cfg = LearnerConfig(algorithm=algorithm, inner_steps=3, inner_lr=0.1, lam=0.5, cg_steps=3, query_batching=q)
        out[q] = MetaLearner(net, cfg).meta_gradient(theta, {}, batch)
    for k in theta:
        torch.testing.assert_close(out["loop"].grads[k], out["vmap"].grads[k], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out["loop"].loss, out["vmap"].loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out["loop"].metric, out["vmap"].metric)


def test_auto_query_strategy_is_measured_once_per_shape_and_grad_mode() -> None:
    net, theta, batch = _problem()
    learner = MetaLearner(net, LearnerConfig(algorithm="fomaml", inner_steps=1, inner_lr=0.1))
    learner.meta_gradient(theta, {}, batch)
    learner.meta_gradient(theta, {}, batch)
    assert len(learner.query_choices) == 1
    (key, choice), = learner.query_choices.items()
    assert key[1] is True and choice["choice"] in ("vmap", "loop")
    assert choice["choice"] == min(("vmap", "loop"), key=lambda k: choice[f"{k}_s"])
    learner.evaluate(theta, {}, batch)  # evaluation: no grad, measured separately
    assert len(learner.query_choices) == 2


@pytest.mark.parametrize("name, cls, kw", [
    ("gd", GradientDescent, {}),
    ("momentum", GradientDescent, {"momentum": 0.8, "nesterov": False}),
    ("nesterov", GradientDescent, {"momentum": 0.8, "nesterov": True}),
    ("adam", Adam, {}),
])
def test_inner_optimizers_build_the_monitored_solver(name: str, cls: type, kw: dict) -> None:
    cfg = LearnerConfig(algorithm="imaml", inner_steps=4, inner_lr=0.05, inner_optimizer=name, inner_momentum=0.8)
    s = inner_solver(cfg)
    assert isinstance(s, cls) and s.monitor and s.steps == 4 and s.lr == 0.05 and s.compile is False
    for k, v in kw.items():
        assert getattr(s, k) == v
    assert inner_solver(dataclasses.replace(cfg, compile="reduce-overhead")).compile == "reduce-overhead"
    assert inner_solver(dataclasses.replace(cfg, compile="default")).compile is True


def test_bad_inner_options_are_refused() -> None:
    with pytest.raises(ValueError, match="inner optimizer"):
        LearnerConfig(inner_optimizer="lbfgs")
    with pytest.raises(ValueError, match="inner_momentum"):
        LearnerConfig(inner_optimizer="nesterov", inner_momentum=1.0)
    with pytest.raises(ValueError, match="applies to --algorithm imaml"):
        LearnerConfig(algorithm="maml", inner_optimizer="nesterov")
    with pytest.raises(ValueError, match="compile"):
        LearnerConfig(compile="fast")
    with pytest.raises(ValueError, match="query_batching"):
        LearnerConfig(query_batching="sometimes")


def test_nesterov_inner_loop_trains_and_logs_health() -> None:
    net, theta, batch = _problem()
    cfg = LearnerConfig(algorithm="imaml", inner_steps=4, inner_lr=0.1, lam=0.5, cg_steps=2, inner_optimizer="nesterov")
    res = MetaLearner(net, cfg).meta_gradient(theta, {}, batch)
    assert 0 < res.stats["inner_grad_ratio"] < 1
    assert 0 <= res.stats["inner_descent"] <= 1
    assert all(torch.isfinite(g).all() for g in res.grads.values())


def test_compiled_inner_loop_gives_the_eager_meta_gradient() -> None:
    net, theta, batch = _problem(B=2)
    out = {}
    for mode in ("off", "default"):
        cfg = LearnerConfig(algorithm="imaml", inner_steps=3, inner_lr=0.1, lam=0.5, cg_steps=2, compile=mode)
        out[mode] = MetaLearner(net, cfg).meta_gradient(theta, {}, batch)
    for k in theta:
        torch.testing.assert_close(out["default"].grads[k], out["off"].grads[k], rtol=1e-9, atol=1e-12)
    for k in ("inner_grad_ratio", "inner_descent", "inner_monotone"):
        assert out["default"].stats[k] == pytest.approx(out["off"].stats[k], rel=1e-9)


def test_time_budget_counts_training_seconds_across_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from applications.imaml.cli import main

    out = tmp_path / "run"
    args = ["train", "--dataset", "sinusoid", "--meta-steps", "100000", "--meta-batch", "4", "--time-budget", "1.5",
            "--eval-every", "20", "--val-episodes", "10", "--out", str(out), "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    assert "training-time budget of 1.5 s" in capsys.readouterr().out
    rows = _rows(out / "log.csv")
    elapsed = float(rows[-1]["elapsed_seconds"])
    assert 1.5 <= elapsed < 1.5 + 5 * max(float(r["step_seconds"]) for r in rows)
    val = _rows(out / "val.csv")
    assert int(val[-1]["step"]) == len(rows)  # validated where it stopped
    # Resumed with the same budget: nothing left to train (the budget is the run's, not the call's).
    assert main([*args, "--resume"]) == 0
    assert "already reached" in capsys.readouterr().out
    assert len(_rows(out / "log.csv")) == len(rows)


def test_phases_profiler_writes_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from applications.imaml import phases

    assert phases.main(["--dataset", "sinusoid", "--algorithms", "imaml,maml,fomaml", "--rounds", "2", "--warmup", "1",
                        "--meta-batch", "4", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    for phase in ("inner loop", "query forward", "query backward", "Krylov solve", "backward through the inner loop",
                  "total", "relative to maml"):
        assert phase in text
    rows = _rows(tmp_path / "phases.csv")
    totals = {r["algorithm"]: float(r["median_s"]) for r in rows if r["phase"] == "total"}
    assert set(totals) == {"imaml", "maml", "fomaml"} and all(v > 0 for v in totals.values())
    for alg in totals:  # the phases account for the meta-step (medians, so not exactly)
        parts = sum(float(r["median_s"]) for r in rows if r["algorithm"] == alg and r["phase"] not in ("total", "of which health"))
        assert parts == pytest.approx(totals[alg], rel=0.5)
    assert (tmp_path / "phases.png").stat().st_size > 0

    # Two profiles on one figure: every row kept, the bars named by label.
    both = tmp_path / "both"
    assert phases.main(["--combine", f"before={tmp_path / 'phases.csv'}", f"after={tmp_path / 'phases.csv'}",
                        "--out", str(both)]) == 0
    combined = _rows(both / "phases.csv")
    assert len(combined) == 2 * len(rows)
    assert {r["algorithm"] for r in combined} == {f"{lab}: {alg}" for lab in ("before", "after") for alg in totals}
    assert (both / "phases.png").stat().st_size > 0
    for bad in ("no-equals-sign", f"x={tmp_path / 'missing.csv'}"):
        with pytest.raises(SystemExit) as err:
            phases.main(["--combine", bad, "--out", str(both)])
        assert err.value.code == 2


def test_imaml_meta_step_host_reads_do_not_grow_with_the_budgets() -> None:
    # A host read (bool/item/float/...) is a device sync on a GPU: the meta-step makes a fixed
    # number of them (validation, result building, the log's statistics), none per inner step
    # or Krylov iteration.
    net, theta, batch = _problem(B=2)
    names = ("__bool__", "item", "tolist", "__int__", "__float__")
    saved = {k: getattr(torch.Tensor, k) for k in names}
    counts = {"n": 0}

    def wrap(fn):  # type: ignore[no-untyped-def]
        def inner(self, *a, **kw):  # type: ignore[no-untyped-def]
            counts["n"] += 1
            return fn(self, *a, **kw)

        return inner

    reads = {}
    for steps, cg in ((2, 2), (7, 6)):
        for opt in ("gd", "nesterov"):
            cfg = LearnerConfig(algorithm="imaml", inner_steps=steps, inner_lr=0.05, lam=0.5, cg_steps=cg,
                                linsolve="minres", inner_optimizer=opt, query_batching="vmap", batching="vmap")
            learner = MetaLearner(net, cfg)
            learner.meta_gradient(theta, {}, batch)  # warm-up (first-call work)
            counts["n"] = 0
            try:
                for k in names:
                    setattr(torch.Tensor, k, wrap(saved[k]))
                learner.meta_gradient(theta, {}, batch)
            finally:
                for k in names:
                    setattr(torch.Tensor, k, saved[k])
            reads[(steps, cg, opt)] = counts["n"]
    assert reads[(2, 2, "gd")] == reads[(7, 6, "gd")], reads
    assert reads[(2, 2, "nesterov")] == reads[(7, 6, "nesterov")], reads


def test_time_to_accuracy_plot_groups_seeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from applications.imaml.cli import main
    from applications.imaml.plot import _group_and_seed, _Run, plot_time_to_accuracy

    runs = []
    for name, lam in (("imaml-s0", "1"), ("imaml-s1", "1"), ("other-s0", "2")):
        out = tmp_path / name
        seed = name[-1]
        assert main(["train", "--dataset", "sinusoid", "--meta-steps", "4", "--meta-batch", "2", "--inner-steps", "2",
                     "--eval-every", "2", "--val-episodes", "4", "--lam", lam, "--seed", seed, "--out", str(out),
                     "--no-progress", "--device", "cpu"]) == 0
        runs.append(out)
    assert [_group_and_seed(_Run(r)) for r in runs] == [("imaml", 0), ("imaml", 1), ("other", 0)]
    png = plot_time_to_accuracy(runs, tmp_path / "tta.png")
    assert png.stat().st_size > 0
    assert main(["plot", *map(str, runs), "--by-seed", "--out", str(tmp_path / "cli.png")]) == 0
    assert "cli.png" in capsys.readouterr().out
    bare = tmp_path / "bare"
    assert main(["train", "--dataset", "sinusoid", "--meta-steps", "2", "--meta-batch", "2", "--inner-steps", "2",
                 "--out", str(bare), "--no-progress", "--device", "cpu"]) == 0
    with pytest.raises(ValueError, match="val.csv"):
        plot_time_to_accuracy([bare], tmp_path / "none.png")


def test_an_algorithm_keeps_its_colour_in_every_figure() -> None:
    # The 5-way and 20-way figures order their configurations by result; MAML must not be
    # one colour in one and another in the other.
    from applications.imaml.plot import ALGORITHM_COLORS, _colors, _pyplot

    plt = _pyplot()
    five, twenty = _colors(["maml", "imaml", "fomaml"], plt), _colors(["maml", "fomaml", "imaml"], plt)
    assert dict(zip(["maml", "imaml", "fomaml"], five)) == dict(zip(["maml", "fomaml", "imaml"], twenty))
    assert len(set(ALGORITHM_COLORS.values())) == len(ALGORITHM_COLORS)
    # Other configurations (a sweep) take colours in order, distinct beyond ten.
    assert _colors(["a", "b"], plt) == ["C0", "C1"]
    many = _colors([f"cfg{i}" for i in range(12)], plt)
    assert len({tuple(c) for c in many}) == 12


def test_report_writes_the_equal_time_table_and_figure(tmp_path: Path) -> None:
    from applications.imaml.cli import main
    from applications.imaml.report import main as report_main

    setting = tmp_path / "proto" / "sin"
    for name, lam in (("a", "0.5"), ("b", "2")):
        for seed in (0, 1):
            assert main(["train", "--dataset", "sinusoid", "--meta-steps", "4", "--meta-batch", "2", "--inner-steps", "2",
                         "--eval-every", "2", "--val-episodes", "6", "--evaluate", "--eval-episodes", "6", "--seed",
                         str(seed), "--lam", lam, "--no-progress", "--device", "cpu", "--out", str(setting / f"{name}-s{seed}")]) == 0
    assert report_main([str(tmp_path / "proto"), "--out", str(tmp_path / "res")]) == 0
    text = (tmp_path / "res" / "sin" / "time_table.md").read_text()
    assert "equal training time" in text and text.count("\n| a |") == 1 and text.count("\n| b |") == 1
    assert text.splitlines()[2].count(" s |") == 3  # three equal times
    data = (tmp_path / "res" / "sin" / "time_to_accuracy.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
