"""benchmarks/compare_commits.py on hand-made CSVs: medians over runs, the after/before
ratio, the ratio to the hand-written loop and the memory column."""

from __future__ import annotations

import contextlib
import csv
import io
import pathlib
from types import ModuleType

import pytest


@pytest.fixture(scope="module")
def compare(load_script) -> ModuleType:  # type: ignore[no-untyped-def]
    return load_script("compare_commits")


def _write(path: pathlib.Path, rows: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_summary_of_two_trees(compare: ModuleType, tmp_path: pathlib.Path) -> None:
    for tree, times in (("before", (10.0, 12.0, 30.0)), ("after", (9.0, 11.0, 11.5))):
        for i, t in enumerate(times, 1):
            _write(tmp_path / f"sp_{tree}_{i}" / "small_problem.csv",
                   [{"method": "bilevel", "median_ms": t, "x_hand_written": t / 2},
                    {"method": "hand-written", "median_ms": 2.0, "x_hand_written": 1.0}])
            _write(tmp_path / f"ms_{tree}_{i}" / "metastep.csv",
                   [{"net": "app", "method": "bilevel", "median_s": t / 10, "x_hand_written": 0.8,
                     "mem_steady_mib": 100 if tree == "before" else 90}])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        compare.main(tmp_path)
    rows = [line.split() for line in buf.getvalue().splitlines()[1:]]
    bilevel_small = next(r for r in rows if r[:3] == ["small", "problem", "bilevel"])
    # medians over the three runs: 12 ms before, 11 ms after -> 0.917; x hand 6 -> 5.5
    assert bilevel_small[3:6] == ["12.000ms", "11.000ms", "0.917"]
    assert bilevel_small[6:9] == ["6.00", "5.50", "3"]
    assert bilevel_small[9:] == ["-", "-"]
    meta = next(r for r in rows if r[:2] == ["meta-step", "app/bilevel"])
    assert meta[2:5] == ["1.200s", "1.100s", "0.917"] and meta[-2:] == ["100", "90"]
