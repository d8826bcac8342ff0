"""Data layer of the few-shot application: task sources for iMAML.

Two kinds of task source:

* regression — :func:`sinusoid_tasks` (:class:`SinusoidTasks`), MAML's sinusoids;
* classification — :func:`load_dataset` returns a :class:`ClassDataset` (images grouped
  by class, ``uint8`` ``(C, N, channels, H, W)``) whose :meth:`ClassDataset.sampler`
  gives an :class:`EpisodeSampler` of N-way K-shot episodes.

Example::

    from applications.imaml.data import load_dataset

    train = load_dataset("omniglot", "/data/omniglot", "train")
    sampler = train.sampler(ways=5, shots=1, queries=15, seed=0)
    batch = sampler.sample(32)  # batch.support_x: (32, 5, 1, 28, 28)

Data roots may also be given through the environment variables ``BILEVEL_OMNIGLOT`` and
``BILEVEL_MINIIMAGENET``.  All randomness is seeded and episodes/tasks are addressed by
index, so runs and evaluation sets are reproducible.
"""

from __future__ import annotations

import os
from typing import Any

from .base import ClassDataset
from .batch import TaskBatch, TaskSampler
from .episodes import EpisodeSampler
from .miniimagenet import MINIIMAGENET_SPLITS, load_miniimagenet
from .omniglot import SPLITS as OMNIGLOT_SPLITS
from .omniglot import download_omniglot, load_omniglot, safe_extract
from .sinusoid import SinusoidTasks, sinusoid

__all__ = [
    "DATASETS",
    "ClassDataset",
    "EpisodeSampler",
    "TaskBatch",
    "TaskSampler",
    "SinusoidTasks",
    "download_omniglot",
    "load_dataset",
    "load_miniimagenet",
    "load_omniglot",
    "safe_extract",
    "sinusoid",
    "sinusoid_tasks",
]

#: Dataset name → (loader, environment variable naming a default data root, splits).
_REGISTRY: dict[str, tuple[Any, str, tuple[str, ...]]] = {
    "omniglot": (load_omniglot, "BILEVEL_OMNIGLOT", OMNIGLOT_SPLITS),
    "miniimagenet": (load_miniimagenet, "BILEVEL_MINIIMAGENET", MINIIMAGENET_SPLITS),
}
#: Names accepted by :func:`load_dataset`.
DATASETS: tuple[str, ...] = tuple(_REGISTRY)


def load_dataset(name: str, data_root: str | os.PathLike[str] | None, split: str, **kwargs: Any) -> ClassDataset:
    """Load a few-shot classification split.

    Args:
        name: ``"omniglot"`` or ``"miniimagenet"`` (case, ``-`` and ``_`` ignored).
        data_root: Folder holding the data; None reads ``BILEVEL_OMNIGLOT`` /
            ``BILEVEL_MINIIMAGENET`` from the environment.
        split: ``"train"``, ``"val"`` or ``"test"`` (Omniglot also ``"trainval"``).
        **kwargs: Passed to :func:`~.omniglot.load_omniglot` (``split_scheme``,
            ``rotations``, ``image_size``, ``cache_dir``, ``split_seed``) or
            :func:`~.miniimagenet.load_miniimagenet` (``normalization``, ``layout``,
            ``image_size``, ``cache_dir``, ``num_workers``).

    Raises:
        ValueError: Unknown dataset or split.
        FileNotFoundError: No data root given, or no data in it.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; valid names are {', '.join(DATASETS)}")
    loader, env_var, splits = _REGISTRY[key]
    if split not in splits:
        raise ValueError(f"unknown {key} split {split!r}; valid splits are {', '.join(splits)}")
    if data_root is None:
        data_root = os.environ.get(env_var) or None
        if data_root is None:
            raise FileNotFoundError(
                f"no data root given for {key}: pass data_root (e.g. --data-root) or set the {env_var} environment variable"
            )
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"{key} data root {os.fspath(data_root)!r} does not exist or is not a folder")
    return loader(data_root, split, **kwargs)


def sinusoid_tasks(shots: int = 10, queries: int = 10, seed: int = 0, **kwargs: Any) -> SinusoidTasks:
    """MAML's sinusoid regression task source (see :class:`SinusoidTasks` for ``kwargs``)."""
    return SinusoidTasks(shots, queries, seed, **kwargs)
