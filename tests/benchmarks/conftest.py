"""Shared by the benchmark smoke tests: load a script of ``benchmarks/`` by path.

Each script is loaded under a private module name ("benchmarks" alone would be ambiguous
with this folder), and removed from ``sys.modules`` after the test module.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@contextmanager
def _loaded(name: str) -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location(f"_bilevel_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def load_script() -> Iterator[Callable[[str], ModuleType]]:
    """``load_script("fig2b")`` -> the module (loaded once per test module)."""
    stack: list = []
    cache: dict[str, ModuleType] = {}

    def load(name: str) -> ModuleType:
        if name not in cache:
            cm = _loaded(name)
            cache[name] = cm.__enter__()
            stack.append(cm)
        return cache[name]

    yield load
    for cm in reversed(stack):
        cm.__exit__(None, None, None)
