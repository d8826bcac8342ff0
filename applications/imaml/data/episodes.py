"""N-way K-shot episode sampling.

An episode picks ``ways`` distinct classes and, in each, ``shots + queries`` distinct
images; the first ``shots`` form the support (training) set and the rest the query
(validation) set of one few-shot task.  Labels ``0 .. ways-1`` are assigned to the chosen
classes in a random order, so the model cannot rely on a fixed class → label mapping.

Episodes are addressed by an integer index and each index has its own random stream
(``numpy.random.SeedSequence([seed, index])``).  Episode ``i`` is therefore the same
whatever was sampled before it and whatever batch size is used, which gives
reproducible training runs and a fixed evaluation set (e.g. the usual 600 test
episodes are ``sampler.episode(0) .. sampler.episode(599)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .batch import TaskBatch

__all__ = ["EpisodeSampler", "default_transform"]

ImagesByClass = np.ndarray | Tensor | Sequence[np.ndarray | Tensor]


def default_transform(images: Tensor) -> Tensor:
    """``uint8`` → ``float32`` in ``[0, 1]``; other dtypes pass through unchanged."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images


class EpisodeSampler:
    """Seeded, index-addressable N-way K-shot episode sampler.

    Args:
        images_by_class: Either one array/tensor ``(C, N, *image_shape)`` or a list of
            ``C`` arrays/tensors ``(N_c, *image_shape)`` (classes may then differ in
            size).  ``uint8`` data stay ``uint8`` in memory; only the sampled images are
            converted (see ``transform``).
        ways: Number of classes per episode (N).
        shots: Support images per class (K).
        queries: Query images per class (Q).
        seed: Non-negative integer; the same seed gives the same episodes.
        transform: Applied to the gathered support and query images (tensors of shape
            ``(..., *image_shape)``).  Default: ``uint8`` → ``float32`` in ``[0, 1]``,
            other dtypes unchanged.

    Raises:
        ValueError: ``ways`` exceeds the number of classes, ``shots + queries`` exceeds
            the images of the smallest class, or an argument is not a positive integer.
    """

    def __init__(
        self,
        images_by_class: ImagesByClass,
        ways: int,
        shots: int,
        queries: int,
        seed: int = 0,
        *,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        for label, value, minimum in (("ways", ways, 1), ("shots", shots, 1), ("queries", queries, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise ValueError(f"{label} must be an integer >= {minimum}, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.ways = int(ways)
        self.shots = int(shots)
        self.queries = int(queries)
        self.seed = int(seed)
        self.transform = transform if transform is not None else default_transform

        if isinstance(images_by_class, (np.ndarray, Tensor)):
            if images_by_class.ndim < 2:
                raise ValueError(
                    f"images_by_class must have shape (classes, images_per_class, ...), got {tuple(images_by_class.shape)}"
                )
            self._stacked: np.ndarray | Tensor | None = images_by_class
            self._classes: list[np.ndarray | Tensor] = []
            sizes = [int(images_by_class.shape[1])] * int(images_by_class.shape[0])
            self.image_shape = tuple(int(s) for s in images_by_class.shape[2:])
        else:
            self._stacked = None
            self._classes = list(images_by_class)
            sizes = [int(c.shape[0]) for c in self._classes]
            shapes = {tuple(int(s) for s in c.shape[1:]) for c in self._classes}
            if len(shapes) > 1:
                raise ValueError(f"all classes must have the same image shape, got {sorted(shapes)}")
            self.image_shape = shapes.pop() if shapes else ()
        self._sizes = np.asarray(sizes, dtype=np.int64)
        self.num_classes = len(sizes)

        if self.ways > self.num_classes:
            raise ValueError(
                f"ways={self.ways} exceeds the number of classes ({self.num_classes}); "
                "an episode needs that many distinct classes"
            )
        per_class = self.shots + self.queries
        smallest = int(self._sizes.min())
        if per_class > smallest:
            which = int(self._sizes.argmin())
            raise ValueError(
                f"shots + queries = {self.shots} + {self.queries} = {per_class} exceeds the "
                f"{smallest} images per class available (class {which}); every class needs "
                f"{per_class} distinct images"
            )
        self._position = 0

    # --- stateful sequential use (training) -------------------------------------------------
    @property
    def position(self) -> int:
        """Index of the next episode returned by :meth:`sample` / :meth:`sample_batch`.

        Save it in a checkpoint and assign it back to resume the same episode stream.
        """
        return self._position

    @position.setter
    def position(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"position must be >= 0, got {value}")
        self._position = int(value)

    def next_episode(self) -> TaskBatch:
        """The next episode (index :attr:`position`), unbatched, then advance by one."""
        episode = self.episode(self._position)
        self._position += 1
        return episode

    def sample(self, batch_size: int) -> TaskBatch:
        """The next ``batch_size`` episodes stacked into a meta-batch, then advance.

        Returns:
            A :class:`~.batch.TaskBatch` whose tensors have a leading dimension ``batch_size``:
            ``support_x`` ``(B, ways*shots, *image_shape)``, ``support_y``
            ``(B, ways*shots)``, ``query_x`` ``(B, ways*queries, *image_shape)``,
            ``query_y`` ``(B, ways*queries)``, ``classes`` ``(B, ways)``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batch = self.tasks(range(self._position, self._position + batch_size))
        self._position += batch_size
        return batch

    def __iter__(self) -> Iterator[TaskBatch]:
        """Endless stream of (unbatched) episodes from :attr:`position` on."""
        while True:
            yield self.next_episode()

    # --- stateless, index-addressed use (evaluation) -----------------------------------------
    def episode_indices(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Which classes and images episode ``index`` uses (no image is gathered).

        Returns:
            ``classes`` ``(ways,)`` (``classes[label]`` = class index) and ``images``
            ``(ways, shots + queries)`` image indices within each class; the first
            ``shots`` columns are the support set.
        """
        if index < 0:
            raise ValueError(f"episode index must be >= 0, got {index}")
        # One independent stream per (seed, index): episode i does not depend on how many
        # episodes were drawn before it, nor on the batch size.
        rng = np.random.default_rng([self.seed, int(index)])
        # Drawing classes without replacement in random order already makes the
        # label (= position) → class mapping a uniformly random permutation.
        classes = rng.choice(self.num_classes, size=self.ways, replace=False)
        per_class = self.shots + self.queries
        images = np.stack([rng.choice(int(self._sizes[c]), size=per_class, replace=False) for c in classes])
        return classes.astype(np.int64), images.astype(np.int64)

    def episode(self, index: int) -> TaskBatch:
        """Episode number ``index`` (deterministic given the seed), without a batch dimension."""
        b = self.tasks([index])
        assert b.classes is not None
        return TaskBatch(b.support_x[0], b.support_y[0], b.query_x[0], b.query_y[0], int(index), classes=b.classes[0])

    def tasks(self, indices: Iterable[int]) -> TaskBatch:
        """Episodes ``indices`` stacked along a new leading (meta-batch) dimension."""
        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError("indices is empty")
        picks = [self.episode_indices(i) for i in indices]
        classes = np.stack([c for c, _ in picks])  # (B, ways)
        images = np.stack([im for _, im in picks])  # (B, ways, shots+queries)
        # One gather and one dtype conversion for the whole meta-batch: the raw (uint8)
        # images are copied once, then converted once, instead of per episode.
        data = self.transform(self._gather(classes, images))  # (B, ways, shots+queries, ...)
        batch, tail = len(indices), data.shape[3:]
        labels = torch.arange(self.ways, dtype=torch.int64)
        return TaskBatch(
            support_x=data[:, :, : self.shots].reshape(batch, self.ways * self.shots, *tail),
            support_y=labels.repeat_interleave(self.shots).expand(batch, -1).contiguous(),
            query_x=data[:, :, self.shots :].reshape(batch, self.ways * self.queries, *tail),
            query_y=labels.repeat_interleave(self.queries).expand(batch, -1).contiguous(),
            classes=torch.from_numpy(classes),
            index=indices[0],
        )

    def _gather(self, classes: np.ndarray, images: np.ndarray) -> Tensor:
        """Images ``[classes[b, w], images[b, w, k]]`` as a ``(B, ways, S+Q, ...)`` tensor."""
        if self._stacked is not None:
            if isinstance(self._stacked, Tensor):
                return self._stacked[torch.from_numpy(classes)[..., None], torch.from_numpy(images)]
            # Fancy indexing copies, so the result is writable and contiguous for torch.
            return torch.from_numpy(np.ascontiguousarray(self._stacked[classes[..., None], images]))
        rows = []
        for c, idx in zip(classes.reshape(-1), images.reshape(-1, images.shape[-1])):
            source = self._classes[int(c)]
            if isinstance(source, Tensor):
                rows.append(source[torch.from_numpy(idx)])
            else:
                rows.append(torch.from_numpy(np.ascontiguousarray(source[idx])))
        return torch.stack(rows).reshape(*classes.shape, *rows[0].shape)

    def __repr__(self) -> str:
        return (
            f"EpisodeSampler(classes={self.num_classes}, ways={self.ways}, shots={self.shots}, "
            f"queries={self.queries}, seed={self.seed}, position={self._position})"
        )
