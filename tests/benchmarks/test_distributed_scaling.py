"""Smoke test of benchmarks/distributed_scaling.py: three short runs (1 process with 1 and 2
threads, 2 processes with torchrun), a table, a CSV and a PNG; no timing assertions."""

from __future__ import annotations

import pathlib
from types import ModuleType

import pytest
import torch.distributed as dist


@pytest.fixture(scope="module")
def bench(load_script) -> ModuleType:  # type: ignore[no-untyped-def]
    return load_script("distributed_scaling")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_quick_run(bench: ModuleType, tmp_path: pathlib.Path) -> None:
    rows = bench.main(["--meta-steps", "8", "--meta-batch", "4", "--skip", "2", "--out", str(tmp_path)])
    assert [(r["processes"], r["threads_per_process"]) for r in rows] == [(1, 1), (1, 2), (2, 1)]
    assert all(r["meta_steps_per_s"] > 0 for r in rows)
    assert (tmp_path / "distributed_scaling_sinusoid.csv").exists() and (tmp_path / "distributed_scaling_sinusoid.png").exists()
