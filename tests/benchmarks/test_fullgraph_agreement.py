"""Smoke test of benchmarks/fullgraph_agreement.py at a tiny size: the traced layer's
meta-gradient on the app's conv net equals the eager one in float64 (backend aot_eager:
dynamo and AOTAutograd trace as with inductor, whose kernel generation would take minutes)."""

from __future__ import annotations

import contextlib
import io
import re
from types import ModuleType

import pytest
import torch


@pytest.fixture(scope="module")
def bench(load_script) -> ModuleType:  # type: ignore[no-untyped-def]
    return load_script("fullgraph_agreement")


def test_tiny_app_net_agrees_in_float64(bench: ModuleType) -> None:
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(io.StringIO()):
        (line,) = bench.main(["--nets", "app", "--dtypes", "float64", "--filters", "4", "--inner-steps", "2",
                              "--cg-steps", "2", "--threads", "1", "--backend", "aot_eager"])
    assert torch.get_num_threads() == threads, "main() must restore the thread count"
    m = re.search(r"relative difference ([0-9.e+-]+)", line)
    assert m is not None and float(m.group(1)) < 1e-10, line
