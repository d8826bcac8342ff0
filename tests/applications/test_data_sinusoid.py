"""Tests of the sinusoid regression task source (applications.imaml.data.sinusoid)."""

from __future__ import annotations

import math

import pytest
import torch

from applications.imaml.data import SinusoidTasks, sinusoid, sinusoid_tasks


def test_shapes_ranges_and_targets() -> None:
    tasks = SinusoidTasks(shots=5, queries=7, seed=0)
    b = tasks.sample(16)
    assert b.support_x.shape == (16, 5, 1) and b.support_y.shape == (16, 5, 1)
    assert b.query_x.shape == (16, 7, 1) and b.query_y.shape == (16, 7, 1)
    assert b.amplitude.shape == (16,) and b.phase.shape == (16,)
    assert b.support_x.dtype == torch.float32
    assert float(b.amplitude.min()) >= 0.1 and float(b.amplitude.max()) <= 5.0
    assert float(b.phase.min()) >= 0.0 and float(b.phase.max()) <= math.pi
    for x in (b.support_x, b.query_x):
        assert float(x.min()) >= -5.0 and float(x.max()) <= 5.0
    a, p = b.amplitude.view(-1, 1, 1), b.phase.view(-1, 1, 1)
    torch.testing.assert_close(b.support_y, sinusoid(b.support_x, a, p), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.query_y, a * torch.sin(b.query_x - p), atol=1e-5, rtol=1e-5)


def test_reproducible_and_batch_size_independent() -> None:
    a, b = SinusoidTasks(10, 10, seed=5), SinusoidTasks(10, 10, seed=5)
    first, second = a.sample(4), a.sample(4)
    both = b.sample(8)
    torch.testing.assert_close(torch.cat([first.support_x, second.support_x]), both.support_x, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([first.amplitude, second.amplitude]), both.amplitude, rtol=0, atol=0)
    torch.testing.assert_close(a.batch(1, 4).query_y, second.query_y, rtol=0, atol=0)
    other = SinusoidTasks(10, 10, seed=6).tasks(range(8))
    assert not torch.equal(other.amplitude, both.amplitude)
    # Same draws whatever the output dtype (sampling happens in float64).
    wide = SinusoidTasks(10, 10, seed=5, dtype=torch.float64).tasks(range(8))
    torch.testing.assert_close(wide.support_x.float(), both.support_x)


def test_distribution_matches_maml_protocol() -> None:
    b = sinusoid_tasks(shots=10, queries=1, seed=1).sample(4000)
    assert abs(float(b.amplitude.mean()) - 2.55) < 0.1  # mean of U[0.1, 5]
    assert abs(float(b.phase.mean()) - math.pi / 2) < 0.06
    assert abs(float(b.support_x.mean())) < 0.1
    assert abs(float(b.support_x.std()) - 10 / math.sqrt(12)) < 0.05


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="shots and queries must be >= 1"):
        SinusoidTasks(shots=0)
    with pytest.raises(ValueError, match="x_range"):
        SinusoidTasks(x_range=(5.0, -5.0))
    with pytest.raises(ValueError, match="batch_size"):
        SinusoidTasks().sample(0)
