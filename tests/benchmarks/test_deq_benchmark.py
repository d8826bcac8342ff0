"""Smoke test of benchmarks/deq.py at tiny sizes (--quick): the structure of the results and
outputs, the gradient checks and the memory's shape; no wall-time assertions."""

from __future__ import annotations

import contextlib
import csv
import io
import pathlib
from types import ModuleType

import pytest
import torch


@pytest.fixture(scope="module")
def bench(load_script) -> ModuleType:  # type: ignore[no-untyped-def]
    return load_script("deq")


def _rows(path: pathlib.Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_quick_run(bench: ModuleType, tmp_path: pathlib.Path) -> None:
    buf = io.StringIO()
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    with contextlib.redirect_stdout(buf):
        res = bench.main(["--quick", "--out", str(tmp_path)])
    text = buf.getvalue()
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng)
    have_td = bench.torchdeq_missing() is None
    libs = ["bilevel", "torchdeq"] if have_td else ["bilevel"]

    # 1. forward: every solver of every library at both parameter sets; plain iteration is the unit
    fwd = res["forward"]
    assert [(r["params"], r["library"], r["solver"]) for r in fwd] == [
        (p, lib, s) for p in ("init", "trained") for lib in libs for s in bench.FWD_SOLVERS[lib]]
    for r in fwd:
        assert r["own_stop_ms_median"] > 0 and r["own_stop_max_over_min"] >= 1.0
        if r["solver"] == "iteration" and r["evals_to_tol_median"] is not None:
            assert r["ratio_to_plain"] == 1.0
    assert res["unroll"] >= 1

    # 2. time per step: every method at both parameter sets; the gradient checks
    methods = [m for m in bench.STEP_METHODS if have_td or not m.startswith("torchdeq")]
    assert [(r["params"], r["method"]) for r in res["step"]] == [(p, m) for p in ("init", "trained") for m in methods]
    for r in res["step"]:
        assert r["median_ms"] > 0 and r["max_over_min"] >= 1.0 and r["samples"] == bench.QUICK["rounds"]
        assert r["fwd_evals_median"] >= 1
    checks = {(r["params"], r["dtype"], r["comparison"]): r["rel_diff"] for r in res["gradcheck"]}
    for p in ("init", "trained"):
        # the exact backwards agree with GMRES to 1e-10 up to their tolerance (1e-6) and float32
        assert checks[(p, "float64", "bilevel gmres vs exact")] < 1e-4
        assert checks[(p, "float64", "bilevel adjoint-iter vs exact")] < 1e-4
        if have_td:
            k, tau = bench.QUICK.get("phantom_steps", 5), bench.QUICK.get("phantom_damping", 0.8)
            key = f"bilevel phantom vs torchdeq phantom (k={k}, τ={tau})"
            assert checks[(p, "float64", key)] < 1e-10  # the same formula at the same z*
            assert checks[(p, "float32", key)] < 1e-4
            assert checks[(p, "float64", "bilevel adjoint-iter vs torchdeq ift")] < 1e-4
    bias = {(r["params"], r["k"], r["tau"]): r["rel_error"] for r in res["bias"]}
    for p in ("init", "trained"):
        assert bias[(p, 20, 1.0)] < bias[(p, 1, 1.0)]  # more phantom steps, less bias

    # 3. memory: the implicit layers keep the same bytes whatever the iterations; unrolling grows
    mem = res["memory"]
    by = {m: [r["saved_bytes"] for r in mem if r["method"] == m] for m in bench.MEM_METHODS}
    assert len(set(by["bilevel implicit"])) == 1
    assert by["unrolled"] == sorted(by["unrolled"]) and by["unrolled"][-1] > by["unrolled"][0]
    if have_td:
        assert len(set(by["torchdeq ift"])) == 1
    assert res["memory_summary"]["bilevel implicit"]["saved_max_over_min"] == 1.0

    # 4. the race: every method ends with a test accuracy after its own training time
    race_methods = [m for m in bench.RACE_METHODS if have_td or not m.startswith("torchdeq")]
    final = [r for r in res["race"] if r["final"]]
    assert sorted(r["method"] for r in final) == sorted(race_methods)
    for r in final:
        assert r["seconds"] >= bench.QUICK["train_seconds"] and r["steps"] >= 1 and 0 <= r["test_acc"] <= 1
        assert (r["unrolled_own_forward_acc"] is not None) == (r["method"] == "unrolled")

    # outputs
    for name in ("deq_forward.csv", "deq_residuals.csv", "deq_step.csv", "deq_gradcheck.csv", "deq_bias.csv",
                 "deq_memory.csv", "deq_accuracy.csv", "deq.png", "deq.txt"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    assert len(_rows(tmp_path / "deq_step.csv")) == len(res["step"])
    assert len(_rows(tmp_path / "deq_memory.csv")) == len(mem)
    saved = (tmp_path / "deq.txt").read_text()
    assert saved.startswith("$ python -m benchmarks.deq --quick") and saved.strip() in text
    for heading in ("## 1. Forward", "## 2. Time per training step", "## 2b. Gradients", "## 2c. Phantom gradient's bias",
                    "## 3. Memory", "## 4. Test accuracy"):
        assert heading in text
    assert "bilevel Anderson / plain iteration" in text
    assert "Test accuracy when a method's clock first passed t seconds" in text
    if not have_td:
        assert "torchdeq not available, skipping its rows" in text


def test_without_torchdeq(bench: ModuleType, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torchdeq cannot be imported its rows are skipped, with a one-line message."""
    monkeypatch.setattr(bench, "torchdeq_missing", lambda: "ModuleNotFoundError: No module named 'torchdeq'")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = bench.main(["--quick", "--parts", "1,3", "--pretrain-epochs", "0", "--no-rss", "--out", str(tmp_path)])
    text = buf.getvalue()
    assert "torchdeq not available, skipping its rows: ModuleNotFoundError" in text
    assert {r["library"] for r in res["forward"]} == {"bilevel"}
    assert {r["method"] for r in res["memory"]} == {"bilevel implicit", "unrolled"}
    assert all(r["rss_steady_mib"] is None for r in res["memory"])
    assert (tmp_path / "deq.png").is_file()
