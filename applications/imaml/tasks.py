"""Thin adapter over the data layer (:mod:`applications.imaml.data`).

Gives the training and evaluation code one interface for regression (sinusoid) and
classification (Omniglot, Mini-ImageNet) task sources: :class:`TaskSource` with
``sample(B)`` (the next meta-batch, sequential, resumable through ``position``) and
``batch(indices)`` (fixed, index-addressed episodes for evaluation), both returning a
:class:`TaskBatch` whose tensors carry a leading task dimension ``B``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .data import SinusoidTasks, TaskBatch, TaskSampler, load_dataset

__all__ = ["DATASETS", "TaskBatch", "TaskSource", "make_task_source", "resolve_data_root"]

DATASETS = ("sinusoid", "omniglot", "miniimagenet")
_ENV = {"omniglot": "BILEVEL_OMNIGLOT", "miniimagenet": "BILEVEL_MINIIMAGENET"}
# The evaluation tasks of the (unlimited) sinusoid family come from a separate seed stream.
SINUSOID_EVAL_SEED_OFFSET = 1_000_000


class TaskSource:
    """A seeded stream of tasks of one dataset split (wraps the data layer's samplers)."""

    def __init__(self, sampler: TaskSampler, kind: str, image_shape: tuple[int, ...], description: str) -> None:
        self._sampler = sampler
        self.kind = kind  # "regression" or "classification"
        self.image_shape = image_shape
        self.description = description

    @property
    def position(self) -> int:
        return int(self._sampler.position)

    @position.setter
    def position(self, value: int) -> None:
        self._sampler.position = int(value)

    def sample(self, batch_size: int) -> TaskBatch:
        """The next ``batch_size`` tasks (advances :attr:`position`)."""
        return self._sampler.sample(batch_size)

    def batch(self, indices: Iterable[int]) -> TaskBatch:
        """Tasks ``indices`` (independent of :attr:`position`)."""
        return self._sampler.tasks(indices)


def resolve_data_root(dataset: str, data_root: str | None) -> str:
    """The data folder: ``data_root`` or the dataset's environment variable; clear errors."""
    env = _ENV[dataset]
    root = data_root if data_root is not None else os.environ.get(env) or None
    if root is None:
        hint = " (with --download to fetch the official files into DIR)" if dataset == "omniglot" else ""
        example = " (e.g. --data-root ../shared/data/omniglot)" if dataset == "omniglot" else ""
        raise FileNotFoundError(f"{dataset} needs its data: pass --data-root DIR{example} or set {env}{hint}")
    if not os.path.isdir(root):
        extra = " (add --download to create it and fetch the official files)" if dataset == "omniglot" else ""
        raise FileNotFoundError(f"{dataset} data root {root!r} does not exist or is not a folder{extra}")
    return root


def make_task_source(
    dataset: str,
    split: str,
    *,
    ways: int,
    shots: int,
    queries: int,
    seed: int,
    data_root: str | None = None,
    split_scheme: str = "maml",
    hold_out_val: bool = False,
) -> TaskSource:
    """Task source of ``dataset``/``split`` (``"train"``, ``"val"`` or ``"test"``).

    ``hold_out_val`` (training with validation, ``--eval-every``): the ``"train"`` split
    excludes the validation characters/classes, so that validation tasks are unseen.
    Sinusoid validation tasks come from the seed stream ``seed + 2_000_000``.

    Omniglot: the meta-training split is MAML's (1200 characters × 4 rotations, the
    data layer's ``trainval`` of the ``maml`` scheme, or of ``vinyals`` with
    ``split_scheme="vinyals"``), the test split its 423 remaining characters × 4.
    Mini-ImageNet: Ravi & Larochelle's train (64 classes) and test (20) splits.
    Sinusoid: tasks are unlimited; the test tasks use the seed stream
    ``seed + 1_000_000`` so they never coincide with training tasks.

    Raises:
        ValueError: unknown dataset, or shots + queries larger than the images per class
            (message with the numbers).
        FileNotFoundError: no data root, or no data in it.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; choose train, val or test")
    if dataset == "sinusoid":
        s = seed + {"test": SINUSOID_EVAL_SEED_OFFSET, "val": 2 * SINUSOID_EVAL_SEED_OFFSET}.get(split, 0)
        tasks = SinusoidTasks(shots=shots, queries=queries, seed=s)
        return TaskSource(tasks, "regression", (1,), f"sinusoid regression, {shots} support / {queries} query points")

    root = resolve_data_root(dataset, data_root)
    if dataset == "omniglot":
        data_split = "trainval" if (split == "train" and not hold_out_val) else split
        ds = load_dataset("omniglot", root, data_split, split_scheme=split_scheme)
    else:
        ds = load_dataset("miniimagenet", root, split)
    if shots + queries > ds.images_per_class:
        raise ValueError(
            f"shots + queries = {shots} + {queries} = {shots + queries} exceeds the {ds.images_per_class} images per "
            f"class of {dataset}; lower --shots or --queries"
        )
    if ways > ds.num_classes:
        raise ValueError(f"ways = {ways} exceeds the {ds.num_classes} classes of the {dataset} {split} split")
    sampler = ds.sampler(ways, shots, queries, seed)
    desc = f"{dataset} {ds.split} split ({ds.num_classes} classes), {ways}-way {shots}-shot, {queries} queries per class"
    return TaskSource(sampler, "classification", ds.image_shape, desc)
