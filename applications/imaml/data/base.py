"""Shared pieces of the data layer: the class-indexed dataset type and cache helpers.

Image datasets are kept in memory as ``uint8`` arrays of shape
``(classes, images_per_class, channels, height, width)`` and turned into float tensors
one episode at a time (:meth:`ClassDataset.to_float`).  Mini-ImageNet's training split
is about 0.8 GB as ``uint8`` and four times that as ``float32``, so converting lazily is
what keeps the whole split in RAM possible.
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .episodes import EpisodeSampler

__all__ = [
    "CACHE_DIRNAME",
    "ClassDataset",
    "atomic_save_npz",
    "load_npz_cache",
    "pil_resample_lanczos",
    "resolve_cache_dir",
]

logger = logging.getLogger(__name__)

#: Name of the folder created inside a data root to hold converted arrays.
CACHE_DIRNAME = "bilevel_cache"


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; compare by identity
class ClassDataset:
    """Images grouped by class, the input of :class:`~.episodes.EpisodeSampler`.

    Attributes:
        images: ``uint8`` array ``(C, N, channels, H, W)``; class ``c`` holds ``N`` images.
        class_names: ``C`` names, e.g. ``"Greek/character03/rot090"`` or ``"n01532829"``.
        name: Dataset name (``"omniglot"`` or ``"miniimagenet"``).
        split: Split name (``"train"``, ``"val"``, ``"test"`` or ``"trainval"``).
        mean: Per-channel mean subtracted by :meth:`to_float` (on the ``[0, 1]`` scale).
        std: Per-channel standard deviation divided by :meth:`to_float`.
    """

    images: np.ndarray
    class_names: list[str]
    name: str
    split: str
    mean: tuple[float, ...] = field(default=(0.0,))
    std: tuple[float, ...] = field(default=(1.0,))

    def __post_init__(self) -> None:
        if self.images.ndim != 5:
            raise ValueError(
                f"images must have shape (classes, images_per_class, channels, H, W), got {self.images.shape}"
            )
        if self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got {self.images.dtype}")
        if len(self.class_names) != self.images.shape[0]:
            raise ValueError(f"{len(self.class_names)} class names for {self.images.shape[0]} classes")
        channels = self.images.shape[2]
        for label, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise ValueError(f"{label} has {len(values)} entries for {channels} channels")

    @property
    def num_classes(self) -> int:
        """Number of classes ``C``."""
        return int(self.images.shape[0])

    @property
    def images_per_class(self) -> int:
        """Number of images per class ``N``."""
        return int(self.images.shape[1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(channels, H, W)`` of one image."""
        c, h, w = self.images.shape[2:]
        return int(c), int(h), int(w)

    def to_float(self, images: Tensor) -> Tensor:
        """Convert ``uint8`` images ``(..., channels, H, W)`` to normalised ``float32``.

        Computes ``(x / 255 - mean) / std`` per channel.  With the default mean 0 and
        std 1 the result lies in ``[0, 1]``.
        """
        x = images.to(torch.float32).div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        if any(m != 0.0 for m in self.mean):
            x = x.sub_(mean)
        if any(s != 1.0 for s in self.std):
            x = x.div_(std)
        return x

    def sampler(self, ways: int, shots: int, queries: int, seed: int = 0) -> EpisodeSampler:
        """An :class:`~.episodes.EpisodeSampler` over this dataset using :meth:`to_float`."""
        return EpisodeSampler(self.images, ways, shots, queries, seed, transform=self.to_float)

    def __repr__(self) -> str:
        return (
            f"ClassDataset(name={self.name!r}, split={self.split!r}, classes={self.num_classes}, "
            f"images_per_class={self.images_per_class}, image_shape={self.image_shape})"
        )


def resolve_cache_dir(data_root: Path, cache_dir: str | os.PathLike[str] | None) -> Path:
    """The cache folder: ``cache_dir`` if given, else ``<data_root>/bilevel_cache``."""
    return Path(cache_dir) if cache_dir is not None else Path(data_root) / CACHE_DIRNAME


def atomic_save_npz(path: Path, *, compress: bool = True, **arrays: np.ndarray) -> bool:
    """Write ``arrays`` to ``path`` as an ``.npz``, atomically.

    The data are written to a temporary file in the same folder and moved into place
    with :func:`os.replace`, so a reader never sees a half-written cache, even when two
    processes convert the same data at once (the last one wins, both files are whole).

    Args:
        path: Destination file (should end in ``.npz``).
        compress: Use ``np.savez_compressed`` (small Omniglot arrays) or plain
            ``np.savez`` (large Mini-ImageNet arrays, where zlib would dominate the time).
        **arrays: The arrays to store; strings must be numpy unicode arrays so that the
            file loads with ``allow_pickle=False``.

    Returns:
        True when the file was written; False when the folder is not writable (the
        failure is logged, not raised: a cache is an optimisation, not a requirement).
    """
    path = Path(path)
    tmp_name: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            (np.savez_compressed if compress else np.savez)(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; a shared cache should be readable
        os.replace(tmp_name, path)
        tmp_name = None
        return True
    except OSError as err:
        logger.warning("could not write the cache file %s (%s); continuing without a cache", path, err)
        return False
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


def load_npz_cache(path: Path, fingerprint: str, keys: Sequence[str]) -> dict[str, np.ndarray] | None:
    """Load a cache written by :func:`atomic_save_npz` if it matches ``fingerprint``.

    Returns None when the file is missing, unreadable, lacks one of ``keys`` or was
    made from a different source (its stored ``fingerprint`` differs), so that the caller
    rebuilds it.
    """
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as data:  # our handle: always closed
            if "fingerprint" not in data.files or str(data["fingerprint"]) != fingerprint:
                logger.info("cache %s is stale (different source); rebuilding", path)
                return None
            if any(k not in data.files for k in keys):
                return None
            return {k: data[k] for k in keys}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:  # truncated/corrupt: rebuild
        logger.warning("ignoring unreadable cache %s (%s)", path, err)
        return None


def pil_resample_lanczos() -> int:
    """PIL's LANCZOS filter constant, without touching deprecated aliases."""
    from PIL import Image

    resampling = getattr(Image, "Resampling", Image)
    return int(resampling.LANCZOS)


TransformFn = Callable[[Tensor], Tensor]
