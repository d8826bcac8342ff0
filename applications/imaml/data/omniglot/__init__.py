"""Omniglot (Lake et al., 2015): reading, caching, standard splits and download.

Three on-disk layouts are understood, per source split (``background`` = 30 alphabets /
964 characters, ``evaluation`` = 20 alphabets / 659 characters, 20 drawings each):

* the offline array copy: ``omniglot_background_28.npz`` / ``omniglot_evaluation_28.npz``
  (``images`` ``uint8`` ``(C, 20, 28, 28)`` with 255 = white background, 0 = ink, plus
  ``alphabet``, ``alphabet_names`` and ``character``), or the ``*_105.npz`` files
  (``bool``, True = background) for other image sizes;
* the official folders ``images_background/<Alphabet>/characterNN/XXXX_YY.png`` and
  ``images_evaluation/...`` (105×105 one-bit PNGs, white background);
* the official zips ``images_background.zip`` / ``images_evaluation.zip`` holding that
  folder layout under some top folder, read in place without extracting.

Images are returned with **ink = 255 and background = 0** (``uint8``), i.e. ink 1.0
after ``/255``, as MAML-style models expect.  The official PNGs are converted exactly as
the offline 28×28 copy was made: 0/255 grey image → PIL LANCZOS resize → inversion, so
both layouts give the same pixels.  The conversion of the official layouts is done once
and cached as an ``.npz`` (written atomically) in ``<data_root>/bilevel_cache/`` or a
given cache folder; the offline copy at 28×28 needs no conversion and is read directly.

Splits (:func:`load_omniglot`): the Vinyals et al. (2016) split as used by
Prototypical Networks — 1028 / 172 / 423 characters for train / val / test, each in four
rotations (0°, 90°, 180°, 270°) that count as separate classes, i.e. 4112 / 688 / 1692
classes — or MAML's split (seeded shuffle of all 1623 characters; 1200 for
meta-training, of which the last 100 are held out for validation; 423 for test).

The package is split by concern: :mod:`._read` (layouts, conversion, cache),
:mod:`._splits` (Vinyals and MAML splits) and :mod:`._download` (official zips);
:func:`load_omniglot` puts them together.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..base import ClassDataset
from ._download import (
    OMNIGLOT_URL_BASE,
    OMNIGLOT_ZIP_MD5,
    OMNIGLOT_ZIP_SHA256,
    download_omniglot,
    safe_extract,
)
from ._read import (
    OMNIGLOT_ZIP_NAMES,
    SOURCE_SPLITS,
    OmniglotCharacters,
    OmniglotSource,
    find_omniglot_sources,
    load_omniglot_characters,
    read_omniglot_npz,
    read_omniglot_official,
)
from ._splits import (
    DEFAULT_ROTATIONS,
    SPLIT_SCHEMES,
    SPLITS,
    omniglot_split_classes,
    vinyals_split_lines,
)

__all__ = [
    "DEFAULT_ROTATIONS",
    "OMNIGLOT_URL_BASE",
    "OMNIGLOT_ZIP_MD5",
    "OMNIGLOT_ZIP_NAMES",
    "OMNIGLOT_ZIP_SHA256",
    "OmniglotCharacters",
    "OmniglotSource",
    "SOURCE_SPLITS",
    "SPLITS",
    "SPLIT_SCHEMES",
    "download_omniglot",
    "find_omniglot_sources",
    "load_omniglot",
    "load_omniglot_characters",
    "omniglot_split_classes",
    "read_omniglot_npz",
    "read_omniglot_official",
    "safe_extract",
    "vinyals_split_lines",
]


def load_omniglot(
    data_root: str | os.PathLike[str],
    split: str,
    *,
    split_scheme: str = "vinyals",
    rotations: Sequence[int] = DEFAULT_ROTATIONS,
    image_size: int = 28,
    cache_dir: str | os.PathLike[str] | None = None,
    split_seed: int = 1,
) -> ClassDataset:
    """Omniglot few-shot split as a :class:`ClassDataset`.

    Each class is one character in one rotation (counter-clockwise, ``np.rot90``), named
    ``"Alphabet/characterNN/rotDDD"``; images are ``uint8`` ``(C, 20, 1, H, W)`` with
    ink 255 (1.0 after :meth:`ClassDataset.to_float`, which does not normalise further).

    Args:
        data_root: Folder with any supported layout (:func:`find_omniglot_sources`).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"trainval"``.
        split_scheme: ``"vinyals"`` (4112 / 688 / 1692 classes) or ``"maml"``
            (4400 / 400 / 1692 classes with the four default rotations).
        rotations: Rotations that make classes (default all four).
        image_size: Side length (28 standard).
        cache_dir: Cache folder for converted official layouts.
        split_seed: Seed of the MAML-scheme shuffle.
    """
    chars = load_omniglot_characters(data_root, image_size=image_size, cache_dir=cache_dir)
    classes = omniglot_split_classes(
        chars.names, split, scheme=split_scheme, rotations=rotations, split_seed=split_seed, data_root=data_root
    )
    char_idx = np.array([c for c, _ in classes], dtype=np.int64)
    rots = np.array([r for _, r in classes], dtype=np.int64)
    images = np.empty((len(classes), chars.images.shape[1], 1, image_size, image_size), dtype=np.uint8)
    for degrees in np.unique(rots):
        rows = np.flatnonzero(rots == degrees)
        images[rows, :, 0] = np.rot90(chars.images[char_idx[rows]], k=int(degrees) // 90, axes=(-2, -1))
    names = [f"{chars.names[c]}/rot{r:03d}" for c, r in classes]
    return ClassDataset(images=images, class_names=names, name="omniglot", split=split)
