"""Omniglot character splits: Vinyals et al. (2016) and MAML's seeded split (see the package docstring)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._read import _CHARACTER_RE, _SUBFOLDERS

logger = logging.getLogger(__name__)

#: Few-shot splits understood by :func:`load_omniglot`.
SPLITS: tuple[str, ...] = ("train", "val", "test", "trainval")
#: Character split protocols understood by :func:`load_omniglot`.
SPLIT_SCHEMES: tuple[str, ...] = ("vinyals", "maml")
#: Rotations (degrees, counter-clockwise) that turn each character into four classes.
DEFAULT_ROTATIONS: tuple[int, ...] = (0, 90, 180, 270)


# The Vinyals split as distributed with Prototypical Networks (splits/vinyals/*.txt) is
# a rule over alphabets: 5 background alphabets are the validation set; the test set is
# the last 423 characters of the evaluation half in alphabetical order, i.e. 12 whole
# alphabets plus Gurmukhi characters 42-45; everything else is training.  The rule lets
# the split be rebuilt when the list files are not at hand (official layouts); a test
# checks that it reproduces the list files exactly.
VINYALS_VAL_ALPHABETS: tuple[str, ...] = (
    "Armenian",
    "Bengali",
    "Early_Aramaic",
    "Hebrew",
    "Mkhedruli_(Georgian)",
)
VINYALS_TEST_ALPHABETS: tuple[str, ...] = (
    "Kannada",
    "Keble",
    "Malayalam",
    "Manipuri",
    "Mongolian",
    "Old_Church_Slavonic_(Cyrillic)",
    "Oriya",
    "Sylheti",
    "Syriac_(Serto)",
    "Tengwar",
    "Tibetan",
    "ULOG",
)
_VINYALS_SPLIT_ALPHABET = ("Gurmukhi", 42)  # characters >= 42 of this alphabet are test

#: MAML's protocol: 1200 meta-training characters (the last 100 of them for validation).
MAML_TRAINVAL_CHARACTERS = 1200
MAML_VAL_CHARACTERS = 100

_SPLIT_LIST_DIRS = ("splits_vinyals", os.path.join("splits", "vinyals"))


def _vinyals_split_of(name: str) -> str:
    alphabet, character = name.split("/")
    if alphabet in VINYALS_VAL_ALPHABETS:
        return "val"
    number = int(_CHARACTER_RE.match(character).group(1))  # type: ignore[union-attr]
    if alphabet in VINYALS_TEST_ALPHABETS or (alphabet == _VINYALS_SPLIT_ALPHABET[0] and number >= _VINYALS_SPLIT_ALPHABET[1]):
        return "test"
    return "train"


def vinyals_split_lines(
    split: str,
    *,
    data_root: str | os.PathLike[str] | None = None,
    character_names: Sequence[str] | None = None,
) -> list[str]:
    """The Vinyals split as ``"Alphabet/characterNN/rotDDD"`` lines.

    Uses ``<data_root>/splits_vinyals/<split>.txt`` (or ``splits/vinyals/``, the
    Prototypical Networks layout) when present; otherwise rebuilds the same list from
    the alphabet rule (:data:`VINYALS_VAL_ALPHABETS`, :data:`VINYALS_TEST_ALPHABETS`)
    applied to ``character_names``.

    Raises:
        ValueError: Unknown split.
        FileNotFoundError: No list file and no ``character_names`` to apply the rule to.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown Omniglot split {split!r}; expected one of {SPLITS}")
    if data_root is not None:
        for sub in _SUBFOLDERS:
            for lists in _SPLIT_LIST_DIRS:
                file = Path(data_root).expanduser() / sub / lists / f"{split}.txt"
                if file.is_file():
                    return [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if character_names is None:
        raise FileNotFoundError(f"no Vinyals split list {split}.txt under {data_root!r} and no character names to rebuild it from")
    wanted = ("train", "val") if split == "trainval" else (split,)
    return [
        f"{name}/rot{rot:03d}" for name in character_names if _vinyals_split_of(name) in wanted for rot in DEFAULT_ROTATIONS
    ]


def omniglot_split_classes(
    character_names: Sequence[str],
    split: str,
    *,
    scheme: str = "vinyals",
    rotations: Sequence[int] = DEFAULT_ROTATIONS,
    split_seed: int = 1,
    data_root: str | os.PathLike[str] | None = None,
    maml_sizes: tuple[int, int] = (MAML_TRAINVAL_CHARACTERS, MAML_VAL_CHARACTERS),
) -> list[tuple[int, int]]:
    """The classes of a few-shot split as ``(character index, rotation)`` pairs.

    Args:
        character_names: ``"Alphabet/characterNN"`` per character (index = position).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"trainval"`` (train + val).
        scheme: ``"vinyals"`` (list files from ``data_root`` if present, else the
            equivalent alphabet rule) or ``"maml"`` (seeded shuffle of the character names
            in sorted order; first ``maml_sizes[0]`` characters are meta-training, the
            last ``maml_sizes[1]`` of them validation, the rest test).
        rotations: Rotations in degrees (multiples of 90) that make separate classes.
            For ``"vinyals"`` they filter the listed rotations.
        split_seed: Seed of the MAML shuffle (MAML used ``random.seed(1)``; its exact
            membership also depended on ``os.listdir`` order, so it cannot be matched).
        data_root: Where to look for the Vinyals list files.
        maml_sizes: ``(meta-training characters, of which validation)`` for ``"maml"``.

    Raises:
        ValueError: Unknown split or scheme, bad rotation, or a listed character missing.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown Omniglot split {split!r}; expected one of {SPLITS}")
    if scheme not in SPLIT_SCHEMES:
        raise ValueError(f"unknown split scheme {scheme!r}; expected one of {SPLIT_SCHEMES}")
    rotations = tuple(int(r) for r in rotations)
    bad = [r for r in rotations if r not in DEFAULT_ROTATIONS]
    if bad or not rotations or len(set(rotations)) != len(rotations):
        raise ValueError(f"rotations must be distinct values among {DEFAULT_ROTATIONS}, got {rotations}")
    index = {name: i for i, name in enumerate(character_names)}

    if scheme == "vinyals":
        lines = vinyals_split_lines(split, data_root=data_root, character_names=character_names)
        classes: list[tuple[int, int]] = []
        missing: list[str] = []
        for line in lines:
            alphabet, character, rot = line.split("/")
            name, degrees = f"{alphabet}/{character}", int(rot.removeprefix("rot"))
            if degrees not in rotations:
                continue
            if name not in index:
                missing.append(name)
                continue
            classes.append((index[name], degrees))
        if missing:
            raise ValueError(
                f"{len(set(missing))} characters of the Vinyals {split} list are not in the loaded data "
                f"(e.g. {missing[0]}); the split needs both the background and evaluation halves"
            )
        return classes

    trainval, val = maml_sizes
    total = len(character_names)
    if not 0 < val < trainval < total:
        raise ValueError(f"MAML split sizes {maml_sizes} do not fit {total} characters")
    # Shuffle sorted names, not load order, so the split is the same for every layout.
    ordered = sorted(character_names)
    perm = np.random.default_rng(split_seed).permutation(total)
    shuffled = [ordered[i] for i in perm]
    chosen = {
        "train": shuffled[: trainval - val],
        "val": shuffled[trainval - val : trainval],
        "trainval": shuffled[:trainval],
        "test": shuffled[trainval:],
    }[split]
    return [(index[name], rot) for name in chosen for rot in rotations]


