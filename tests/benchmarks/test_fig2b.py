"""Smoke test of benchmarks/fig2b.py at tiny sizes (--quick): structure of the results and
outputs; no wall-time or memory-size assertions."""

from __future__ import annotations

import contextlib
import csv
import io
import pathlib
import sys
from types import ModuleType

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "fig2b.py"


@pytest.fixture(scope="module")
def bench(load_script) -> ModuleType:  # type: ignore[no-untyped-def]
    return load_script("fig2b")


def test_quick_run(bench: ModuleType, tmp_path: pathlib.Path) -> None:
    buf = io.StringIO()
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    with contextlib.redirect_stdout(buf):
        res = bench.main(["--quick", "--out", str(tmp_path)])
    text = buf.getvalue()
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng)

    ks = bench.QUICK["ks"]
    rows = res["rows"]
    assert [(r["K"], r["method"]) for r in rows] == [(k, m) for k in ks for m in bench.METHODS]
    for r in rows:
        assert r["median_s"] > 0 and r["max_over_min"] >= 1.0
        measured = r["method"] in bench.QUICK["mem_methods"]
        assert (r["mem_first_step_mib"] is not None) == measured
        if measured and sys.platform.startswith("linux"):
            assert r["mem_steady_mib"] is not None and r["mem_steady_mib"] >= 0

    if sys.platform.startswith("linux"):
        s = res["summary"]
        assert set(s) == set(bench.QUICK["mem_methods"])
        assert s["imaml"]["mem_max_over_min"] >= 1.0 and isinstance(s["imaml"]["flat"], bool)
        assert "iMAML steady memory over K" in text

    csv_path, png_path = tmp_path / "fig2b.csv", tmp_path / "fig2b.png"
    assert csv_path.is_file() and png_path.is_file() and png_path.stat().st_size > 0
    with open(csv_path, newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)
    assert "| K | method | s / meta-step (median) | max/min | peak MiB steady | peak MiB 1st step |" in text


def test_summary(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    """The summary on made-up rows: iMAML flat within 5 %, MAML's slope per inner step."""
    rows = [{"method": m, "K": k, "median_s": 0.1 * k, "mem_steady_mib": mem}
            for k, mem_i, mem_m in ((1, 100.0, 50.0), (10, 104.0, 95.0), (100, 102.0, 545.0))
            for m, mem in (("imaml", mem_i), ("maml", mem_m))]
    s = bench._summary(rows)
    assert s["imaml"]["flat"] is True and s["imaml"]["mem_max_over_min"] == pytest.approx(1.04)
    assert s["maml"]["mib_per_step"] == pytest.approx(5.0)
    assert s["maml"]["mem_max_over_min"] == pytest.approx(545.0 / 50.0)
    out = capsys.readouterr().out
    assert "flat within 5 %" in out and "+5.00 MiB per inner step" in out
    rows[2]["mem_steady_mib"] = 110.0  # iMAML at K=10: 10 % above its minimum
    assert bench._summary(rows)["imaml"]["flat"] is False


def test_maml_and_fomaml_at_one_step(bench: ModuleType) -> None:
    """K = 1 against torch.func: MAML's meta-gradient is ∇_θ L_q(θ − lr ∇L_s(θ)), first-order
    MAML's is ∇L_q at θ − lr ∇L_s(θ)."""
    p = bench.paper_problem(filters=4, meta_batch=1)
    theta = {k: v.detach() for k, v in p.theta.items()}
    xs, ys, xq, yq = p.xs[0], p.ys[0], p.xq[0], p.yq[0]

    def adapted(th: dict) -> dict:
        g = torch.func.grad(p.loss)(th, xs, ys)
        return {k: th[k] - bench.INNER_LR * g[k] for k in th}

    maml_ref = torch.func.grad(lambda th: p.loss(adapted(th), xq, yq))(theta)
    fo_ref = torch.func.grad(p.loss)({k: v.detach() for k, v in adapted(theta).items()}, xq, yq)
    for method, ref in (("maml", maml_ref), ("fomaml", fo_ref)):
        got = bench.build(p, method, 1)()
        # The conv biases feed batch norm, so their exact gradient is 0 and what both sides
        # hold is float32 rounding of the whole gradient's scale (measured up to 1e-6 on an
        # AMD EPYC, depending on the thread count): atol follows that scale.
        atol = 1e-5 * max(float(r.abs().max()) for r in ref.values())
        for k, g in zip(p.names, got):
            torch.testing.assert_close(g, ref[k], rtol=1e-4, atol=atol, msg=f"{method}: {k}")
