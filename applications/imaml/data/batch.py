"""The one task-batch type and the one sampler interface of the data layer.

Every task source — N-way K-shot episodes of an image dataset
(:class:`~.episodes.EpisodeSampler`) and sinusoid regression
(:class:`~.sinusoid.SinusoidTasks`) — returns :class:`TaskBatch` and implements
:class:`TaskSampler`, so that training and evaluation never branch on the kind of task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["TaskBatch", "TaskSampler"]


@dataclasses.dataclass(frozen=True)
class TaskBatch:
    """Support and query sets of one task, or of a meta-batch stacked along a leading dimension.

    Attributes:
        support_x: inputs of the support set: ``(B, K, ...)`` batched, ``(K, ...)`` for one task
            (episodes: images grouped by label, ``shots`` of label 0, then of label 1, ...).
        support_y: targets: int64 labels ``(B, K)`` (classification) or values ``(B, K, 1)``.
        query_x: inputs of the query set, ``(B, Q, ...)``.
        query_y: targets of the query set.
        index: index of the (first) task.
        classes: episodes only: ``(B, ways)`` int64, ``classes[b, label]`` is the dataset class.
        amplitude: sinusoid only: ``(B,)`` amplitudes ``A`` of ``A sin(x − φ)``.
        phase: sinusoid only: ``(B,)`` phases ``φ``.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    index: int = 0
    classes: Tensor | None = None
    amplitude: Tensor | None = None
    phase: Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TaskBatch:
        """A copy with every tensor on ``device``; floating tensors cast to ``dtype`` if given
        (integer labels keep their dtype)."""

        def cast(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            return t.to(device)

        moved = {f.name: cast(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "index"}
        return dataclasses.replace(self, **moved)

    @property
    def num_tasks(self) -> int:
        """``B``, the size of the leading (meta-batch) dimension."""
        return int(self.support_x.shape[0])


class TaskSampler(Protocol):
    """A seeded, index-addressed source of tasks.

    Task ``i`` depends only on the seed and ``i``: :meth:`sample` (training, sequential,
    resumable through :attr:`position`) and :meth:`tasks` (evaluation, fixed indices) give
    the same task for the same index.
    """

    @property
    def position(self) -> int:
        """Index of the next task :meth:`sample` returns (save it to resume)."""

    @position.setter
    def position(self, value: int) -> None: ...

    def sample(self, batch_size: int) -> TaskBatch:
        """The next ``batch_size`` tasks stacked into a meta-batch; advances :attr:`position`."""

    def tasks(self, indices: Iterable[int]) -> TaskBatch:
        """Tasks ``indices`` stacked into a meta-batch (independent of :attr:`position`)."""
