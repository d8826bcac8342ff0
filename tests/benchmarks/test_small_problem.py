"""Smoke test of benchmarks/small_problem.py (--quick): outputs, and that the meta-gradient
through ``bilevel.Proximal`` equals the hand-written one.  No wall-time assertions."""

from __future__ import annotations

import contextlib
import csv
import io
import pathlib
import re
from types import ModuleType

import pytest
import torch


@pytest.fixture(scope="module")
def bench(load_script) -> ModuleType:  # type: ignore[no-untyped-def]
    return load_script("small_problem")


def test_quick_run(bench: ModuleType, tmp_path: pathlib.Path) -> None:
    buf = io.StringIO()
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    with contextlib.redirect_stdout(buf):
        res = bench.main(["--quick", "--out", str(tmp_path)])
    text = buf.getvalue()
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng)

    assert res["rel_err"] < 1e-4, res["rel_err"]  # float32, a well-conditioned ridge problem
    rows = res["rows"]
    assert [r["method"] for r in rows] == list(bench.METHODS)
    for r in rows:
        assert r["median_ms"] > 0 and r["max_over_min"] >= 1.0 and r["samples"] == bench.QUICK["rounds"]
    if res["info"]:  # the layer's diagnostics: the 100 GD steps, at most the 10 CG iterations
        assert "after 100 steps" in res["info"]
        m = re.search(r"after (\d+) CG iterations", res["info"])
        assert m is not None and 1 <= int(m.group(1)) <= 10, res["info"]

    csv_path, png_path = tmp_path / "small_problem.csv", tmp_path / "small_problem.png"
    assert csv_path.is_file() and png_path.is_file() and png_path.stat().st_size > 0
    with open(csv_path, newline="") as fh:
        assert [r["method"] for r in csv.DictReader(fh)] == list(bench.METHODS)
    assert "| method | ms / meta-gradient (median) | min ms | max/min | × hand-written |" in text
    assert "meta-gradient bilevel vs hand-written: relative difference" in text


def test_float64_agreement(bench: ModuleType, tmp_path: pathlib.Path) -> None:
    """In float64 the two computations agree to rounding."""
    with contextlib.redirect_stdout(io.StringIO()):
        res = bench.main(["--quick", "--dtype", "float64", "--rounds", "2", "--warmup", "1", "--out", str(tmp_path)])
    assert res["rel_err"] < 1e-10, res["rel_err"]
