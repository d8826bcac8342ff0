"""Sinusoid regression tasks (Finn, Abbeel & Levine, 2017, section 5.1).

Each task is ``y = A sin(x - φ)`` with amplitude ``A ~ U[0.1, 5.0]``, phase
``φ ~ U[0, π]`` and inputs ``x ~ U[-5, 5]``; a task provides ``K`` support points and
``Q`` query points drawn independently from the same input distribution.

Like :class:`~.episodes.EpisodeSampler`, tasks are addressed by index and task ``i`` has
its own ``torch.Generator`` seeded from ``(seed, i)``, so it is the same regardless of
batch size or of what was drawn before.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from .batch import TaskBatch

__all__ = ["SinusoidTasks", "sinusoid"]


def sinusoid(x: Tensor, amplitude: Tensor | float, phase: Tensor | float) -> Tensor:
    """The task function ``amplitude * sin(x - phase)`` (MAML's convention)."""
    return amplitude * torch.sin(x - phase)


class SinusoidTasks:
    """Seeded source of sinusoid regression tasks.

    Args:
        shots: Support points per task (K), e.g. 5 or 10.
        queries: Query points per task (Q).
        seed: Non-negative integer; the same seed gives the same tasks.
        amplitude_range: ``(low, high)`` of the uniform amplitude distribution.
        phase_range: ``(low, high)`` of the uniform phase distribution.
        x_range: ``(low, high)`` of the uniform input distribution.
        dtype: Floating dtype of the returned tensors.
    """

    def __init__(
        self,
        shots: int = 10,
        queries: int = 10,
        seed: int = 0,
        *,
        amplitude_range: tuple[float, float] = (0.1, 5.0),
        phase_range: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if shots < 1 or queries < 1:
            raise ValueError(f"shots and queries must be >= 1, got shots={shots}, queries={queries}")
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        for label, (low, high) in (("amplitude_range", amplitude_range), ("phase_range", phase_range), ("x_range", x_range)):
            if not low <= high:
                raise ValueError(f"{label} must be (low, high) with low <= high, got {(low, high)}")
        self.shots = int(shots)
        self.queries = int(queries)
        self.seed = int(seed)
        self.amplitude_range = (float(amplitude_range[0]), float(amplitude_range[1]))
        self.phase_range = (float(phase_range[0]), float(phase_range[1]))
        self.x_range = (float(x_range[0]), float(x_range[1]))
        self.dtype = dtype
        self._position = 0

    @property
    def position(self) -> int:
        """Index of the next task returned by :meth:`sample` (save it to resume)."""
        return self._position

    @position.setter
    def position(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"position must be >= 0, got {value}")
        self._position = int(value)

    def _generator(self, index: int) -> torch.Generator:
        # SeedSequence mixes (seed, index) into well-separated 64-bit seeds, unlike
        # e.g. seed * 1000 + index, whose streams collide across seeds.
        state = np.random.SeedSequence([self.seed, int(index)]).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator().manual_seed(int(state))

    def _uniform(self, generator: torch.Generator, size: tuple[int, ...], bounds: tuple[float, float]) -> Tensor:
        low, high = bounds
        return low + (high - low) * torch.rand(size, generator=generator, dtype=torch.float64)

    def task(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor, float, float]:
        """Task ``index`` as ``(support_x (K,1), support_y, query_x (Q,1), query_y, A, φ)``."""
        if index < 0:
            raise ValueError(f"task index must be >= 0, got {index}")
        g = self._generator(index)
        # Sample in float64, then cast, so the tasks are identical across output dtypes.
        amplitude = self._uniform(g, (), self.amplitude_range)
        phase = self._uniform(g, (), self.phase_range)
        support_x = self._uniform(g, (self.shots, 1), self.x_range)
        query_x = self._uniform(g, (self.queries, 1), self.x_range)
        return (
            support_x.to(self.dtype),
            sinusoid(support_x, amplitude, phase).to(self.dtype),
            query_x.to(self.dtype),
            sinusoid(query_x, amplitude, phase).to(self.dtype),
            float(amplitude),
            float(phase),
        )

    def tasks(self, indices: Iterable[int]) -> TaskBatch:
        """Tasks ``indices`` stacked into a :class:`TaskBatch`."""
        items = [(i, self.task(i)) for i in indices]
        if not items:
            raise ValueError("indices is empty")
        return TaskBatch(
            support_x=torch.stack([t[0] for _, t in items]),
            support_y=torch.stack([t[1] for _, t in items]),
            query_x=torch.stack([t[2] for _, t in items]),
            query_y=torch.stack([t[3] for _, t in items]),
            amplitude=torch.tensor([t[4] for _, t in items], dtype=self.dtype),
            phase=torch.tensor([t[5] for _, t in items], dtype=self.dtype),
            index=items[0][0],
        )

    def batch(self, index: int, batch_size: int) -> TaskBatch:
        """Fixed meta-batch number ``index``: tasks ``index*B .. index*B + B - 1``."""
        return self.tasks(range(index * batch_size, (index + 1) * batch_size))

    def sample(self, batch_size: int) -> TaskBatch:
        """The next ``batch_size`` tasks (from :attr:`position`), then advance."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = self.tasks(range(self._position, self._position + batch_size))
        self._position += batch_size
        return out

    def __repr__(self) -> str:
        return (
            f"SinusoidTasks(shots={self.shots}, queries={self.queries}, seed={self.seed}, "
            f"amplitude_range={self.amplitude_range}, phase_range={self.phase_range}, x_range={self.x_range})"
        )
