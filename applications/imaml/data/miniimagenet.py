"""Mini-ImageNet (Vinyals et al., 2016) with the Ravi & Larochelle (2017) class split.

Two on-disk layouts are understood, per split (``train`` 64 classes, ``val`` 16,
``test`` 20; 600 images each):

* ``pickle``: the widely shared caches ``mini-imagenet-cache-{train,val,test}.pkl``, each
  a dict with ``image_data`` (``uint8`` ``(N, 84, 84, 3)``) and ``class_dict``
  (``{label: [row indices]}``).  Pickles can run arbitrary code when loaded, so they are
  read with an unpickler that only accepts numpy arrays and plain containers;
* ``csv``: the Ravi & Larochelle layout, a folder ``images/`` of JPEGs plus
  ``train.csv`` / ``val.csv`` / ``test.csv`` with the header ``filename,label``
  (``images/<label>/<filename>`` is accepted too).  The JPEGs are decoded, converted to
  RGB and resized to 84×84 with PIL LANCZOS once; the result is cached as an ``.npz``
  (written atomically) in ``<data_root>/bilevel_cache/`` or a given cache folder.

Auto-detection prefers the pickle (no conversion needed), then the CSV layout; pass
``layout=`` to choose.  Classes are ordered by their label (the WordNet id, e.g.
``n01532829``) in both layouts, so class indices agree between them.

Pixels are kept as ``uint8`` and scaled to ``[0, 1]`` per episode.  The default
``normalization="none"`` leaves them in ``[0, 1]``, as MAML and iMAML did (their
Mini-ImageNet pipelines only divide by 255); ``"imagenet"`` subtracts the usual ImageNet
channel mean ``(0.485, 0.456, 0.406)`` and divides by the std ``(0.229, 0.224, 0.225)``,
as many ResNet-based few-shot baselines do.
"""

from __future__ import annotations

import csv
import logging
import os
import pickle
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .base import (
    ClassDataset,
    atomic_save_npz,
    load_npz_cache,
    pil_resample_lanczos,
    resolve_cache_dir,
)

__all__ = [
    "MINIIMAGENET_SPLITS",
    "NORMALIZATIONS",
    "MiniImageNetSource",
    "find_miniimagenet_source",
    "load_miniimagenet",
    "load_miniimagenet_arrays",
    "read_miniimagenet_csv",
    "read_miniimagenet_pickle",
]

logger = logging.getLogger(__name__)

#: The Ravi & Larochelle splits.
MINIIMAGENET_SPLITS: tuple[str, ...] = ("train", "val", "test")
#: ``name → (mean, std)`` per RGB channel on the ``[0, 1]`` scale.
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
LAYOUTS: tuple[str, ...] = ("pickle", "csv")
_PICKLE_NAME = "mini-imagenet-cache-{split}.pkl"
_SUBFOLDERS = ("", "miniimagenet", "mini-imagenet", "mini_imagenet")
_CACHE_VERSION = "miniimagenet-cache-v1"

# Everything a pickled dict of numpy arrays / lists / ints may legitimately reference,
# under both the numpy 1.x (numpy.core) and 2.x (numpy._core) module names.
_SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")]
    # Protocol 5 rebuilds arrays from a buffer with numeric._frombuffer.
    + [(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("collections", "OrderedDict")]
    + [("builtins", n) for n in ("bytearray", "bytes", "complex", "dict", "float", "frozenset", "int", "list", "set", "str", "tuple")]
)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global outside :data:`_SAFE_GLOBALS`."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a Mini-ImageNet cache should only contain numpy arrays, lists and dicts"
        )


@dataclass(frozen=True)
class MiniImageNetSource:
    """Where one split was found.

    Attributes:
        split: ``"train"``, ``"val"`` or ``"test"``.
        kind: ``"pickle"`` or ``"csv"``.
        path: The ``.pkl`` file, or the ``<split>.csv`` file.
        images_dir: The JPEG folder (``csv`` layout only).
    """

    split: str
    kind: str
    path: Path
    images_dir: Path | None = None


def _candidates(root: Path, split: str) -> list[tuple[str, Path, Path | None]]:
    out: list[tuple[str, Path, Path | None]] = []
    for sub in _SUBFOLDERS:
        base = root / sub if sub else root
        out.append(("pickle", base / _PICKLE_NAME.format(split=split), None))
        out.append(("csv", base / f"{split}.csv", base / "images"))
    return out


def find_miniimagenet_source(
    data_root: str | os.PathLike[str], split: str, *, layout: str | None = None
) -> MiniImageNetSource:
    """Detect the Mini-ImageNet layout for ``split`` under ``data_root``.

    Looks in ``data_root`` and its ``miniimagenet/``, ``mini-imagenet/`` and
    ``mini_imagenet/`` subfolders, for the pickle cache then the CSV layout.

    Args:
        data_root: The folder to search.
        split: ``"train"``, ``"val"`` or ``"test"``.
        layout: ``"pickle"`` or ``"csv"`` to accept only that layout; None for either.

    Raises:
        ValueError: Unknown split or layout.
        FileNotFoundError: Nothing found; the message lists every path looked for.
    """
    if split not in MINIIMAGENET_SPLITS:
        raise ValueError(f"unknown Mini-ImageNet split {split!r}; expected one of {MINIIMAGENET_SPLITS}")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"unknown Mini-ImageNet layout {layout!r}; expected one of {LAYOUTS}")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Mini-ImageNet data root {str(root)!r} does not exist or is not a folder")
    candidates = [c for c in _candidates(root, split) if layout is None or c[0] == layout]
    for kind, path, images_dir in candidates:
        if path.is_file() and (images_dir is None or images_dir.is_dir()):
            return MiniImageNetSource(split, kind, path, images_dir)
    looked = "\n  ".join(str(p) if d is None else f"{p} with {d}/" for _, p, d in candidates)
    raise FileNotFoundError(
        f"no Mini-ImageNet {split} split under {str(root)!r}. Looked for the pickle cache "
        f"({_PICKLE_NAME.format(split=split)}) and the Ravi & Larochelle layout ({split}.csv "
        f"with 'filename,label' rows plus an images/ folder):\n  {looked}"
    )


def _decode(path: Path, image_size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        rgb = img.convert("RGB")  # grey-scale and CMYK JPEGs exist in ImageNet
        if rgb.size != (image_size, image_size):
            rgb = rgb.resize((image_size, image_size), pil_resample_lanczos())
        return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def _group(labels: Sequence[str], where: str) -> tuple[list[str], list[list[int]]]:
    """Rows per label, labels sorted; all classes must have the same number of rows."""
    groups: dict[str, list[int]] = {}
    for row, label in enumerate(labels):
        groups.setdefault(label, []).append(row)
    names = sorted(groups)
    counts = {n: len(groups[n]) for n in names}
    if len(set(counts.values())) > 1:
        lo = min(counts, key=counts.__getitem__)
        hi = max(counts, key=counts.__getitem__)
        raise ValueError(
            f"classes in {where} have different numbers of images ({lo}: {counts[lo]}, {hi}: {counts[hi]}); "
            "a (classes, images, ...) array needs equal counts"
        )
    return names, [groups[n] for n in names]


def read_miniimagenet_csv(
    csv_path: str | os.PathLike[str],
    images_dir: str | os.PathLike[str],
    *,
    image_size: int = 84,
    num_workers: int | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Decode the images listed in a Ravi & Larochelle CSV.

    Args:
        csv_path: ``<split>.csv`` with header ``filename,label``.
        images_dir: Folder holding ``<filename>`` or ``<label>/<filename>``.
        image_size: Output side length (84 standard).
        num_workers: Decoding threads (PIL releases the GIL); default ``min(8, cpus)``.

    Returns:
        ``uint8`` images ``(C, N, 3, image_size, image_size)`` and the ``C`` labels.

    Raises:
        FileNotFoundError: The CSV or listed images are missing (the first few named).
        ValueError: Bad header, empty CSV or unequal class sizes.
    """
    csv_path, images_dir = Path(csv_path), Path(images_dir)
    if not csv_path.is_file():
        raise FileNotFoundError(f"Mini-ImageNet CSV {str(csv_path)!r} does not exist")
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"filename", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{csv_path} must start with the header 'filename,label', got {reader.fieldnames}")
        rows = [(r["filename"], r["label"]) for r in reader]
    if not rows:
        raise ValueError(f"{csv_path} lists no images")
    paths: list[Path] = []
    missing: list[str] = []
    for filename, label in rows:
        for candidate in (images_dir / filename, images_dir / label / filename):
            if candidate.is_file():
                paths.append(candidate)
                break
        else:
            missing.append(filename)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(rows)} images listed in {csv_path} are not in {images_dir} "
            f"(e.g. {', '.join(missing[:3])})"
        )
    names, groups = _group([label for _, label in rows], str(csv_path))
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    images = np.empty((len(names), len(groups[0]), 3, image_size, image_size), dtype=np.uint8)
    order = [(c, j, paths[row]) for c, rows_c in enumerate(groups) for j, row in enumerate(rows_c)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for (c, j, _), pixels in zip(order, pool.map(lambda item: _decode(item[2], image_size), order)):
            images[c, j] = pixels
    return images, names


def read_miniimagenet_pickle(path: str | os.PathLike[str], *, image_size: int = 84) -> tuple[np.ndarray, list[str]]:
    """Read a ``mini-imagenet-cache-<split>.pkl`` file safely.

    Returns:
        ``uint8`` images ``(C, N, 3, image_size, image_size)`` and the ``C`` labels.

    Raises:
        FileNotFoundError: Missing file.
        pickle.UnpicklingError: The pickle references anything but numpy arrays and
            plain containers (it is never executed).
        ValueError: Not the expected dict of ``image_data`` / ``class_dict``.
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Mini-ImageNet pickle {str(path)!r} does not exist")
    with open(path, "rb") as handle:
        # latin1 lets numpy arrays pickled by Python 2 load (the original caches may be).
        data = _ArrayOnlyUnpickler(handle, encoding="latin1").load()
    if not isinstance(data, dict) or "image_data" not in data or "class_dict" not in data:
        raise ValueError(f"{path} should hold a dict with 'image_data' and 'class_dict'")
    image_data = np.asarray(data["image_data"])
    if image_data.ndim != 4 or image_data.shape[-1] != 3 or image_data.dtype != np.uint8:
        raise ValueError(f"{path}: image_data should be uint8 (N, H, W, 3), got {image_data.dtype} {image_data.shape}")
    class_dict = {str(k): [int(i) for i in v] for k, v in data["class_dict"].items()}
    names = sorted(class_dict)
    _group([n for n in names for _ in class_dict[n]], str(path))  # checks equal class sizes
    index = np.array([class_dict[n] for n in names], dtype=np.int64)  # (C, N)
    if index.size and (index.min() < 0 or index.max() >= len(image_data)):
        raise ValueError(f"{path}: class_dict refers to rows outside image_data (N={len(image_data)})")
    # Filled class by class so that peak memory is the pickle plus one output array.
    images = np.empty((*index.shape, 3, image_size, image_size), dtype=np.uint8)
    same_size = image_data.shape[1:3] == (image_size, image_size)
    for c, rows in enumerate(index):
        if same_size:
            images[c] = image_data[rows].transpose(0, 3, 1, 2)
        else:
            for j, row in enumerate(rows):
                img = Image.fromarray(image_data[row]).resize((image_size, image_size), pil_resample_lanczos())
                images[c, j] = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    return images, names


def _fingerprint(source: MiniImageNetSource, image_size: int) -> str:
    st = source.path.stat()
    parts = [_CACHE_VERSION, source.kind, str(source.path.resolve()), str(st.st_size), str(st.st_mtime_ns)]
    if source.images_dir is not None:
        parts.append(str(source.images_dir.resolve().stat().st_mtime_ns))
    return "|".join(parts + [f"size={image_size}"])


def load_miniimagenet_arrays(
    data_root: str | os.PathLike[str],
    split: str,
    *,
    image_size: int = 84,
    layout: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    num_workers: int | None = None,
) -> tuple[np.ndarray, list[str]]:
    """``uint8`` images ``(C, N, 3, H, W)`` and labels of one split.

    The CSV layout is converted once and cached in ``cache_dir`` (default
    ``<data_root>/bilevel_cache``, file ``miniimagenet_<split>_<size>.npz``); the cache is
    rebuilt when the CSV or image folder changes.  The pickle layout is read directly.
    """
    source = find_miniimagenet_source(data_root, split, layout=layout)
    if source.kind == "pickle":
        return read_miniimagenet_pickle(source.path, image_size=image_size)
    cache_file = resolve_cache_dir(Path(data_root).expanduser(), cache_dir) / f"miniimagenet_{split}_{image_size}.npz"
    fingerprint = _fingerprint(source, image_size)
    cached = load_npz_cache(cache_file, fingerprint, ("images", "class_names"))
    if cached is not None:
        return cached["images"], [str(n) for n in cached["class_names"]]
    logger.info("converting Mini-ImageNet %s from %s; done once, then cached in %s", split, source.path, cache_file)
    assert source.images_dir is not None
    images, names = read_miniimagenet_csv(source.path, source.images_dir, image_size=image_size, num_workers=num_workers)
    # Uncompressed: zlib would take longer than decoding the JPEGs did, for little gain.
    atomic_save_npz(
        cache_file, compress=False, images=images, class_names=np.array(names, dtype=str), fingerprint=np.array(fingerprint)
    )
    return images, names


def load_miniimagenet(
    data_root: str | os.PathLike[str],
    split: str,
    *,
    image_size: int = 84,
    normalization: str = "none",
    layout: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    num_workers: int | None = None,
) -> ClassDataset:
    """Mini-ImageNet split as a :class:`ClassDataset` (``uint8`` ``(C, N, 3, 84, 84)``).

    Args:
        data_root: Folder holding the pickle caches or the CSV + ``images/`` layout.
        split: ``"train"``, ``"val"`` or ``"test"``.
        image_size: Side length (84 standard).
        normalization: ``"none"`` (``[0, 1]``, MAML/iMAML) or ``"imagenet"`` (channel
            mean/std of ImageNet), applied by :meth:`ClassDataset.to_float`.
        layout: Force ``"pickle"`` or ``"csv"``; None detects.
        cache_dir: Cache folder for the converted CSV layout.
        num_workers: JPEG decoding threads for the first conversion.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of {tuple(NORMALIZATIONS)}")
    images, names = load_miniimagenet_arrays(
        data_root, split, image_size=image_size, layout=layout, cache_dir=cache_dir, num_workers=num_workers
    )
    mean, std = NORMALIZATIONS[normalization]
    return ClassDataset(images=images, class_names=names, name="miniimagenet", split=split, mean=mean, std=std)
