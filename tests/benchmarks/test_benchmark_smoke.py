"""Smoke test of benchmarks/backward_cost.py at tiny sizes (--quick).

Checks the structure of the report and two properties that do not depend on timing:
CG runs exactly the requested number of iterations, and the bytes the implicit layer
keeps for backward do not depend on the number of inner steps (while unrolled gradient
descent's grow with it).  No wall-time assertions.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import pathlib
from types import ModuleType

import pytest
import torch


@pytest.fixture(scope="module")
def bench(load_script) -> ModuleType:  # type: ignore[no-untyped-def]
    return load_script("backward_cost")


@pytest.fixture(scope="module")
def quick_run(bench: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, pathlib.Path]:
    out = tmp_path_factory.mktemp("bench") / "result.json"
    buf = io.StringIO()
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    with contextlib.redirect_stdout(buf):
        res = bench.main(["--quick", "--out", str(out)])
    assert torch.get_num_threads() == threads, "main() must restore the thread count"
    assert torch.equal(torch.get_rng_state(), rng), "main() must not move the global RNG"
    return res, buf.getvalue(), out


def test_report_structure(bench: ModuleType, quick_run: tuple[dict, str, pathlib.Path]) -> None:
    res, text, _ = quick_run
    q = bench.QUICK
    assert set(res) == {"config", "timing", "memory"}
    assert res["config"]["quick"] is True

    t = res["timing"]
    for key in ("hvp_s", "grad_s", "hvp_rev_rev_s"):
        assert t[key] > 0
    assert [r["cg_maxiter"] for r in t["rows"]] == q["cg_iters"]
    for r in t["rows"]:
        # tol is tiny: CG must run every iteration it is allowed (and say so).
        assert r["cg_iterations"] == r["cg_maxiter"]
        assert r["cg_status"] == "MAX_ITERATIONS"
        assert r["backward_s"] > 0 and r["backward_over_hvp"] > 0
    assert t["fit"] is not None

    assert [r["steps"] for r in res["memory"]] == q["steps"]

    assert "1. Backward time" in text and "2. Bytes kept for backward" in text
    for header in ("CG maxiter", "CG iters", "HVP ms", "backward ms", "backward/HVP", "minus n_CG"):
        assert header in text
    for header in ("inner steps", "implicit", "unrolled", "unrolled/implicit"):
        assert header in text
    assert "implicit bytes constant across step counts: yes" in text
    # one table line per CG cap and per step count (first column), 'skipped' where unrolled was skipped
    timing_part, memory_part = text.split("2. Bytes kept for backward")
    cg_caps = {str(n) for n in q["cg_iters"]}
    t_rows = {c[0]: c for c in (ln.split() for ln in timing_part.splitlines()) if c and c[0] in cg_caps}
    assert sorted(t_rows, key=int) == [str(n) for n in q["cg_iters"]]
    for n, cells in t_rows.items():
        assert cells[1] == n  # CG iterations column
    step_counts = {str(s) for s in q["steps"]}
    m_rows = {ln.split()[0]: ln for ln in memory_part.splitlines() if ln.split() and ln.split()[0] in step_counts}
    assert sorted(m_rows, key=int) == [str(s) for s in q["steps"]]
    skipped_steps = [s for s in q["steps"] if s > q["max_unrolled_steps"]]
    assert skipped_steps, "the quick configuration should exercise the 'skipped' path"
    for s, line in m_rows.items():
        assert ("skipped" in line) == (int(s) in skipped_steps), line


def test_implicit_bytes_constant_unrolled_grows(quick_run: tuple[dict, str, pathlib.Path]) -> None:
    res, _, _ = quick_run
    cfg, mem = res["config"], res["memory"]
    implicit = {r["implicit_bytes"] for r in mem}
    assert len(implicit) == 1, f"implicit saved bytes depend on the number of inner steps: {mem}"
    # What the layer keeps: phi*, theta (n_params each), lam (a 0-d tensor) and the support data.
    itemsize = 4  # float32
    expected = itemsize * (2 * cfg["n_params"] + 1 + cfg["n"] * cfg["d_in"] + cfg["n"])
    assert implicit == {expected}

    unrolled = [r["unrolled_bytes"] for r in mem if r["steps"] <= cfg["max_unrolled_steps"]]
    assert len(unrolled) >= 2 and all(b is not None for b in unrolled)
    assert all(a < b for a, b in zip(unrolled, unrolled[1:])), unrolled
    assert unrolled[0] > expected
    assert all(r["unrolled_bytes"] is None for r in mem if r["steps"] > cfg["max_unrolled_steps"])


def test_json_output(quick_run: tuple[dict, str, pathlib.Path]) -> None:
    res, text, out = quick_run
    assert f"wrote {out}" in text
    data = json.loads(out.read_text())
    assert data["memory"] == res["memory"]
    assert [r["cg_iterations"] for r in data["timing"]["rows"]] == [r["cg_iterations"] for r in res["timing"]["rows"]]


def test_csv_output(bench: ModuleType, quick_run: tuple[dict, str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    res, _, _ = quick_run
    out = tmp_path / "result.csv"
    bench.write_out(res, str(out))
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["section", "key", "metric", "value"]
    sections = {r[0] for r in rows[1:]}
    assert sections == {"config", "timing", "memory"}
    assert any(r[0] == "memory" and r[2] == "unrolled_bytes" and r[3] == "skipped" for r in rows)


def test_bad_arguments(bench: ModuleType) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--cg-iters", "0"])
    with pytest.raises(SystemExit):
        bench.main(["--steps", "a,b"])
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])
