"""Shared fixtures of the linear-solver tests: seeded test systems and tree adapters
(defined in ``tests/problems.py``)."""

from __future__ import annotations

import pytest

from tests.problems import Systems, Trees


@pytest.fixture
def systems() -> Systems:
    return Systems(seed=20240611)


@pytest.fixture
def trees() -> type[Trees]:
    return Trees
