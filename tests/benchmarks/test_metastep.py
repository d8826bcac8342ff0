"""Smoke test of benchmarks/metastep.py at tiny sizes (--quick), one net per test.

Checks the outputs (CSV, PNG, table), that every method ran (or, for TorchOpt, was
skipped with a reason), that the memory children reported, and that ``bilevel``'s
meta-gradient (vmap and loop) equals the hand-written PyTorch one.  No wall-time
assertions.
"""

from __future__ import annotations

import contextlib
import csv
import io
import pathlib
import sys
from types import ModuleType

import pytest
import torch


@pytest.fixture(scope="module")
def bench(load_script) -> ModuleType:  # type: ignore[no-untyped-def]
    return load_script("metastep")


@pytest.mark.parametrize("net", ["paper", "app"])
def test_quick_run(bench: ModuleType, net: str, tmp_path: pathlib.Path) -> None:
    buf = io.StringIO()
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    with contextlib.redirect_stdout(buf):
        res = bench.main(["--quick", "--nets", net, "--out", str(tmp_path)])
    text = buf.getvalue()
    assert torch.get_num_threads() == threads, "main() must restore the thread count"
    assert torch.equal(torch.get_rng_state(), rng), "main() must not move the global RNG"

    # every method ran, or (TorchOpt only) was skipped with a message
    assert set(res["methods"]) | set(res["skipped"]) == set(bench.METHODS)
    assert set(res["skipped"]) <= set(bench.TORCHOPT)
    for m in res["skipped"]:
        assert "TorchOpt not available" in text and m in text

    csv_path, png_path = tmp_path / "metastep.csv", tmp_path / "metastep.png"
    assert csv_path.is_file() and png_path.is_file() and png_path.stat().st_size > 0
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == res["methods"]
    assert {r["net"] for r in rows} == {net} and {r["setting"] for r in rows} == {"5w1s"}
    for r in rows:
        assert float(r["median_s"]) > 0 and float(r["max_over_min"]) >= 1.0
        assert r["noisy"] in ("True", "False")

    # memory: measured in a child process for the quick --mem-methods (bilevel)
    by_method = {r["method"]: r for r in res["rows"]}
    mem = by_method["bilevel"]
    assert mem["mem_first_step_mib"] is not None and mem["mem_first_step_mib"] >= 0
    if sys.platform.startswith("linux"):
        assert mem["mem_steady_mib"] is not None and mem["mem_steady_mib"] >= 0
    assert by_method["fomaml"]["mem_steady_mib"] is None  # not measured under --quick

    # the library's meta-gradient is the hand-written one (float32)
    checks = {c["method"]: c for c in res["checks"]}
    for m in ("bilevel", "bilevel-loop"):
        assert checks[m]["rel_err"] < bench.TOL, checks[m]
    assert by_method["hand-written"]["grad_rel_err_vs_hand_written"] == 0.0
    assert by_method["maml"]["grad_rel_err_vs_hand_written"] is None

    # the table
    assert "| method | s / meta-step (median) | max/min | × hand-written | × fomaml |" in text
    for m in res["methods"]:
        assert f"| {m} |" in text
    assert "meta-gradient bilevel vs hand-written: relative difference" in text
    assert f"wrote {csv_path}" in text


def test_cg_helper_matches_dense_solve(bench: ModuleType) -> None:
    """The hand-written CG: on an SPD system it converges to the dense solution."""
    g = torch.Generator().manual_seed(0)
    M = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = M @ M.T + 6 * torch.eye(6, dtype=torch.float64)
    b = [torch.randn(6, generator=g, dtype=torch.float64)]
    x, stopped = bench._cg(lambda d: [A @ d[0]], b, 6)
    assert not stopped
    torch.testing.assert_close(x[0], torch.linalg.solve(A, b[0]))
    _, stopped = bench._cg(lambda d: [-d[0]], b, 3)  # negative definite: stops at once
    assert stopped
