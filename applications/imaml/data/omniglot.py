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
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import stat
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import numpy as np

from .base import ClassDataset, atomic_save_npz, load_npz_cache, pil_resample_lanczos, resolve_cache_dir

__all__ = [
    "DEFAULT_ROTATIONS",
    "OMNIGLOT_URL_BASE",
    "OMNIGLOT_ZIP_MD5",
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

if TYPE_CHECKING:  # PIL is imported lazily: it is only needed to convert images
    from PIL import Image

logger = logging.getLogger(__name__)

#: The two halves of the official data set.
SOURCE_SPLITS: tuple[str, ...] = ("background", "evaluation")
#: Few-shot splits understood by :func:`load_omniglot`.
SPLITS: tuple[str, ...] = ("train", "val", "test", "trainval")
#: Character split protocols understood by :func:`load_omniglot`.
SPLIT_SCHEMES: tuple[str, ...] = ("vinyals", "maml")
#: Rotations (degrees, counter-clockwise) that turn each character into four classes.
DEFAULT_ROTATIONS: tuple[int, ...] = (0, 90, 180, 270)

#: Where the official zips live (``<base>/images_background.zip``, ``.../images_evaluation.zip``).
OMNIGLOT_URL_BASE = "https://github.com/brendenlake/omniglot/raw/master/python"
OMNIGLOT_ZIP_NAMES: dict[str, str] = {s: f"images_{s}.zip" for s in SOURCE_SPLITS}

#: MD5 of the official zips as published in torchvision's ``datasets.Omniglot``
#: (``zips_md5``) and repeated in many other projects.  They were read from that source
#: code, not recomputed here: this environment has no internet and no copy of the two
#: full zips.
OMNIGLOT_ZIP_MD5: dict[str, str | None] = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
}

#: SHA-256 of the official zips.  UNKNOWN here (no internet, no copy of the full zips),
#: so deliberately None rather than a made-up value.  Someone with internet access
#: should download the files, check their MD5 against :data:`OMNIGLOT_ZIP_MD5`, and fill
#: these in; :func:`download_omniglot` logs the SHA-256 it computes to make that easy.
OMNIGLOT_ZIP_SHA256: dict[str, str | None] = {
    "images_background.zip": None,
    "images_evaluation.zip": None,
}

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

_NPZ_COPY_NAME = "omniglot_{split}_{size}.npz"
_SPLIT_LIST_DIRS = ("splits_vinyals", os.path.join("splits", "vinyals"))
# Folders inside a data root that may hold the files (torchvision uses "omniglot-py").
_SUBFOLDERS = ("", "omniglot", "omniglot-py")
_CHARACTER_RE = re.compile(r"^character(\d+)$")
_PNG_RE = re.compile(r"^(\d+)_(\d+)\.png$", re.IGNORECASE)
_CACHE_VERSION = "omniglot-cache-v1"


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; compare by identity
class OmniglotCharacters:
    """Omniglot characters before the few-shot split.

    Attributes:
        images: ``uint8`` ``(C, drawers, H, W)``; ink 255, background 0.
        names: ``C`` names ``"Alphabet/characterNN"`` (official folder spelling).
        source_splits: ``C`` entries, ``"background"`` or ``"evaluation"``.
    """

    images: np.ndarray
    names: tuple[str, ...]
    source_splits: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)

    @staticmethod
    def concatenate(parts: Sequence["OmniglotCharacters"]) -> "OmniglotCharacters":
        """Join several parts (e.g. background and evaluation) into one."""
        return OmniglotCharacters(
            images=np.concatenate([p.images for p in parts]),
            names=tuple(n for p in parts for n in p.names),
            source_splits=tuple(s for p in parts for s in p.source_splits),
        )


@dataclass(frozen=True)
class OmniglotSource:
    """Where one source split was found.

    Attributes:
        split: ``"background"`` or ``"evaluation"``.
        kind: ``"npz"`` (offline array copy), ``"folder"`` or ``"zip"`` (official layout).
        path: The file or folder.
    """

    split: str
    kind: str
    path: Path


# --------------------------------------------------------------------------------------
# Finding and reading the files
# --------------------------------------------------------------------------------------
def _candidates(root: Path, split: str, image_size: int) -> list[tuple[str, Path]]:
    # The 28x28 copy only serves 28x28 output; the 105x105 one can be resized to anything.
    sizes = (28, 105) if image_size == 28 else (105,)
    out: list[tuple[str, Path]] = []
    for sub in _SUBFOLDERS:
        base = root / sub if sub else root
        out += [("npz", base / _NPZ_COPY_NAME.format(split=split, size=s)) for s in sizes]
        out.append(("folder", base / f"images_{split}"))
        out.append(("zip", base / OMNIGLOT_ZIP_NAMES[split]))
    return out


def find_omniglot_sources(
    data_root: str | os.PathLike[str],
    *,
    image_size: int = 28,
    source_splits: Sequence[str] = SOURCE_SPLITS,
) -> dict[str, OmniglotSource]:
    """Detect which Omniglot layout is present under ``data_root``.

    For each source split, the first existing candidate is used, in this order: the
    offline ``.npz`` copy, the official folder, the official zip; in ``data_root`` itself,
    then in its ``omniglot/`` and ``omniglot-py/`` subfolders.

    Raises:
        FileNotFoundError: ``data_root`` does not exist, or a split has no candidate; the
            message lists every path that was looked for.
    """
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Omniglot data root {str(root)!r} does not exist or is not a folder")
    found: dict[str, OmniglotSource] = {}
    missing: list[str] = []
    for split in source_splits:
        if split not in SOURCE_SPLITS:
            raise ValueError(f"unknown Omniglot source split {split!r}; expected one of {SOURCE_SPLITS}")
        candidates = _candidates(root, split, image_size)
        for kind, path in candidates:
            if (kind == "folder" and path.is_dir()) or (kind != "folder" and path.is_file()):
                found[split] = OmniglotSource(split, kind, path)
                break
        else:
            missing.append(split)
    if missing:
        looked = "\n  ".join(str(p) + ("/" if k == "folder" else "") for s in missing for k, p in _candidates(root, s, image_size))
        raise FileNotFoundError(
            f"no Omniglot data for the {' and '.join(missing)} split(s) under {str(root)!r}. "
            f"Looked for the offline copy (omniglot_<split>_28.npz / _105.npz), the official "
            f"folders (images_<split>/<Alphabet>/characterNN/*.png) and the official zips "
            f"(images_<split>.zip):\n  {looked}\n"
            "Use download_omniglot(root) (or --download) to fetch the official zips."
        )
    return found


def _ink_from_grey(image: Image.Image, image_size: int) -> np.ndarray:
    """0/255 grey image (white background) → ``uint8`` ``(size, size)`` with ink = 255."""
    if image.size != (image_size, image_size):
        # Resize before inverting, exactly like the offline 28x28 copy was made, so that
        # both layouts give identical pixels (LANCZOS rounding is not symmetric in 0/255).
        image = image.resize((image_size, image_size), pil_resample_lanczos())
    return 255 - np.asarray(image, dtype=np.uint8)


def read_omniglot_npz(path: str | os.PathLike[str], *, source_split: str, image_size: int = 28) -> OmniglotCharacters:
    """Read one file of the offline array copy (``omniglot_<split>_{28,105}.npz``).

    The stored polarity (255 / True = background) is inverted to ink = 255.  The 105×105
    file can produce any ``image_size`` (LANCZOS resize of the 0/255 image, as above).
    """
    from PIL import Image

    path = Path(path)
    with np.load(path, allow_pickle=False) as data:
        raw = data["images"]
        alphabet_names = [str(a) for a in data["alphabet_names"]]
        names = tuple(f"{alphabet_names[a]}/character{c:02d}" for a, c in zip(data["alphabet"].tolist(), data["character"].tolist()))
    if raw.dtype == np.bool_:
        grey = raw.astype(np.uint8) * np.uint8(255)  # True = white background
    else:
        grey = raw.astype(np.uint8, copy=False)
    if grey.shape[-1] == image_size and grey.shape[-2] == image_size:
        images = 255 - grey
    elif grey.shape[-1] == 105:
        flat = grey.reshape(-1, *grey.shape[-2:])
        out = np.stack([_ink_from_grey(Image.fromarray(img, mode="L"), image_size) for img in flat])
        images = out.reshape(*grey.shape[:2], image_size, image_size)
    else:
        raise ValueError(f"{path} holds {grey.shape[-1]}x{grey.shape[-2]} images; cannot produce {image_size}x{image_size}")
    return OmniglotCharacters(np.ascontiguousarray(images), names, (source_split,) * len(names))


def _official_entries(path: Path, alphabets: set[str] | None) -> tuple[list[tuple[int, str, int, Callable[[], bytes]]], Callable[[], None]]:
    """List ``(char_id, 'Alphabet/characterNN', drawer, read_bytes)`` of an official folder or zip."""
    entries: list[tuple[int, str, int, Callable[[], bytes]]] = []

    def add(parts: Sequence[str], reader: Callable[[], bytes]) -> None:
        if len(parts) < 3:
            return
        alphabet, character, filename = parts[-3], parts[-2], parts[-1]
        m_char, m_png = _CHARACTER_RE.match(character), _PNG_RE.match(filename)
        if m_char is None or m_png is None:
            logger.debug("skipping %s: not <Alphabet>/characterNN/XXXX_YY.png", "/".join(parts))
            return
        if alphabets is not None and alphabet not in alphabets:
            return
        entries.append((int(m_png.group(1)), f"{alphabet}/character{int(m_char.group(1)):02d}", int(m_png.group(2)), reader))

    if path.is_dir():
        for png in path.rglob("*"):
            if png.is_file() and png.suffix.lower() == ".png":
                add(png.relative_to(path).parts, png.read_bytes)
        return entries, lambda: None

    archive = zipfile.ZipFile(path)
    for info in archive.infolist():
        name = info.filename
        # Skip directories, macOS resource forks and anything that is not a regular file.
        if info.is_dir() or name.startswith("__MACOSX/") or "/._" in name or _zip_entry_is_symlink(info):
            continue
        if name.lower().endswith(".png"):
            add(name.split("/"), lambda info=info: archive.read(info))
    return entries, archive.close


def read_omniglot_official(
    path: str | os.PathLike[str],
    *,
    source_split: str,
    image_size: int = 28,
    alphabets: Iterable[str] | None = None,
) -> OmniglotCharacters:
    """Read the official PNG layout from a folder or a zip (without extracting it).

    The layout below ``path`` is ``[<top folder>/]<Alphabet>/characterNN/XXXX_YY.png``;
    any top folder name is accepted (e.g. ``images_background_small1/``).  Characters
    are ordered by their global id ``XXXX`` (the order of the offline copy) and drawings
    by ``YY``.

    Args:
        path: The ``images_<split>`` folder or the ``images_<split>*.zip`` file.
        source_split: ``"background"`` or ``"evaluation"`` (recorded per character).
        image_size: Output side length; 105 keeps the original resolution.
        alphabets: Only read these alphabets (default: all).

    Raises:
        FileNotFoundError: ``path`` is missing or contains no character PNGs.
        ValueError: Characters have different sets of drawings.
    """
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Omniglot folder or zip {str(path)!r} does not exist")
    wanted = set(alphabets) if alphabets is not None else None
    entries, close = _official_entries(path, wanted)
    try:
        if not entries:
            raise FileNotFoundError(
                f"no <Alphabet>/characterNN/XXXX_YY.png files found in {str(path)!r}"
                + (f" for alphabets {sorted(wanted)}" if wanted else "")
            )
        by_char: dict[tuple[int, str], dict[int, Callable[[], bytes]]] = {}
        for char_id, name, drawer, reader in entries:
            by_char.setdefault((char_id, name), {})[drawer] = reader
        keys = sorted(by_char)
        drawers = sorted(by_char[keys[0]])
        for key in keys:
            if sorted(by_char[key]) != drawers:
                raise ValueError(
                    f"character {key[1]} in {path} has drawings {sorted(by_char[key])}, "
                    f"expected the same set as {keys[0][1]}: {drawers}"
                )
        images = np.empty((len(keys), len(drawers), image_size, image_size), dtype=np.uint8)
        for i, key in enumerate(keys):
            for j, drawer in enumerate(drawers):
                with Image.open(io.BytesIO(by_char[key][drawer]())) as img:
                    # One-bit PNG → 0/255 grey, the input the offline copy was made from.
                    images[i, j] = _ink_from_grey(img.convert("L"), image_size)
    finally:
        close()
    names = tuple(name for _, name in keys)
    return OmniglotCharacters(images, names, (source_split,) * len(names))


def _fingerprint(source: OmniglotSource, image_size: int) -> str:
    resolved = source.path.resolve()
    st = resolved.stat()
    if source.kind == "folder":
        # A folder's mtime changes when alphabets are added or removed; listing the
        # alphabets catches edits below it as well, at a negligible cost.
        content = ",".join(sorted(p.name for p in resolved.iterdir()))
        detail = f"{st.st_mtime_ns}|{content}"
    else:
        detail = f"{st.st_size}|{st.st_mtime_ns}"
    return f"{_CACHE_VERSION}|{source.kind}|{resolved}|{detail}|size={image_size}"


def _load_source(source: OmniglotSource, image_size: int, cache_root: Path) -> OmniglotCharacters:
    if source.kind == "npz" and source.path.name.endswith(f"_{image_size}.npz"):
        return read_omniglot_npz(source.path, source_split=source.split, image_size=image_size)
    cache_file = cache_root / f"omniglot_{source.split}_{image_size}.npz"
    fingerprint = _fingerprint(source, image_size)
    cached = load_npz_cache(cache_file, fingerprint, ("images", "names", "source_splits"))
    if cached is not None:
        logger.info("loaded Omniglot %s from cache %s", source.split, cache_file)
        return OmniglotCharacters(
            cached["images"], tuple(str(n) for n in cached["names"]), tuple(str(s) for s in cached["source_splits"])
        )
    logger.info("converting Omniglot %s from %s (%s); done once, then cached in %s", source.split, source.path, source.kind, cache_file)
    if source.kind == "npz":
        chars = read_omniglot_npz(source.path, source_split=source.split, image_size=image_size)
    else:
        chars = read_omniglot_official(source.path, source_split=source.split, image_size=image_size)
    atomic_save_npz(
        cache_file,
        images=chars.images,
        names=np.array(chars.names, dtype=str),
        source_splits=np.array(chars.source_splits, dtype=str),
        fingerprint=np.array(fingerprint),
    )
    return chars


def load_omniglot_characters(
    data_root: str | os.PathLike[str],
    *,
    image_size: int = 28,
    cache_dir: str | os.PathLike[str] | None = None,
    source_splits: Sequence[str] = SOURCE_SPLITS,
) -> OmniglotCharacters:
    """All characters of the requested source splits, background first.

    Args:
        data_root: Folder holding one of the layouts (see :func:`find_omniglot_sources`).
        image_size: Output side length (28 is the few-shot standard).
        cache_dir: Where converted arrays are kept; default ``<data_root>/bilevel_cache``.
            A read-only location only disables caching (a warning is logged).
        source_splits: Which halves to load.

    Returns:
        :class:`OmniglotCharacters` with ``uint8`` images, ink = 255.
    """
    sources = find_omniglot_sources(data_root, image_size=image_size, source_splits=source_splits)
    cache_root = resolve_cache_dir(Path(data_root).expanduser(), cache_dir)
    return OmniglotCharacters.concatenate([_load_source(sources[s], image_size, cache_root) for s in source_splits])


# --------------------------------------------------------------------------------------
# Few-shot splits
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# Download and safe extraction
# --------------------------------------------------------------------------------------
def _zip_entry_is_symlink(info: zipfile.ZipInfo) -> bool:
    # Unix mode bits live in the high 16 bits of external_attr for zips made on Unix.
    return stat.S_ISLNK(info.external_attr >> 16)


def safe_extract(zip_path: str | os.PathLike[str], dest: str | os.PathLike[str]) -> list[Path]:
    """Extract a zip into ``dest`` after checking every entry.

    All entries are checked before anything is written, so a bad archive leaves ``dest``
    untouched.  Rejected: absolute paths (``/x``, ``\\x``, ``C:x``), any ``..``
    component, backslashes (a Windows separator that could hide ``..``), NUL bytes,
    symbolic links, and any entry that would resolve outside ``dest``.

    Returns:
        The extracted files and folders.

    Raises:
        ValueError: An unsafe entry; the message names it.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    base = dest.resolve()
    with zipfile.ZipFile(zip_path) as archive:
        infos = archive.infolist()
        for info in infos:
            name = info.filename
            reason = None
            if not name or "\x00" in name:
                reason = "empty name or NUL byte"
            elif name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
                reason = "absolute path"
            elif "\\" in name:
                reason = "backslash in path"
            elif ".." in name.split("/"):
                reason = "'..' path component"
            elif _zip_entry_is_symlink(info):
                reason = "symbolic link"
            elif not (base / name).resolve().is_relative_to(base):
                reason = "resolves outside the destination"
            if reason is not None:
                raise ValueError(f"unsafe entry {name!r} in zip {str(zip_path)!r}: {reason}; nothing was extracted")
        return [Path(archive.extract(info, dest)) for info in infos]


def _hash_file(path: Path) -> tuple[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def _check_hashes(name: str, sha: str, md5: str, want_sha: str | None, want_md5: str | None, where: str) -> None:
    if want_sha is not None and sha != want_sha.lower():
        raise ValueError(f"SHA-256 mismatch for {name} ({where}): expected {want_sha}, got {sha}")
    if want_md5 is not None and md5 != want_md5.lower():
        raise ValueError(f"MD5 mismatch for {name} ({where}): expected {want_md5}, got {md5}")


def download_omniglot(
    root: str | os.PathLike[str],
    *,
    url_base: str = OMNIGLOT_URL_BASE,
    expected_sha256: Mapping[str, str | None] | None = None,
    expected_md5: Mapping[str, str | None] | None = None,
    extract: bool = True,
    timeout: float = 60.0,
) -> dict[str, Path]:
    """Download (and by default extract) the official ``images_{background,evaluation}.zip``.

    Each file is streamed to a temporary file in ``root``, its checksums are verified,
    and only then is it moved into place with :func:`os.replace`; a file already present
    is re-verified instead of downloaded again.  Extraction uses :func:`safe_extract`.

    Checksums: ``expected_sha256`` defaults to :data:`OMNIGLOT_ZIP_SHA256` (currently
    unknown, None) and ``expected_md5`` to :data:`OMNIGLOT_ZIP_MD5` (torchvision's
    published values); a mapping given replaces the default.  Every file must have at
    least one expected checksum, otherwise nothing is downloaded.  The computed SHA-256
    is logged so that it can be pinned in :data:`OMNIGLOT_ZIP_SHA256`.

    Args:
        root: Destination folder (created if needed).
        url_base: URL prefix; ``<url_base>/images_background.zip`` etc.
        expected_sha256: File name → SHA-256 hex digest (or None).
        expected_md5: File name → MD5 hex digest (or None).
        extract: Also extract into ``root`` (gives the ``images_<split>/`` folders).
        timeout: Socket timeout in seconds.

    Returns:
        ``{"background": zip path, "evaluation": zip path}``.

    Raises:
        ValueError: No checksum known for a file, or a checksum mismatch (the
            downloaded data are deleted).
        OSError: Network or file-system failure (``urllib.error.URLError`` included).
    """
    root = Path(root).expanduser()
    sha_table = OMNIGLOT_ZIP_SHA256 if expected_sha256 is None else expected_sha256
    md5_table = OMNIGLOT_ZIP_MD5 if expected_md5 is None else expected_md5
    for name in OMNIGLOT_ZIP_NAMES.values():
        if sha_table.get(name) is None and md5_table.get(name) is None:
            raise ValueError(
                f"no expected checksum for {name}: refusing to download unverified data. "
                "Pass expected_sha256={...} (or expected_md5)."
            )
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for split, name in OMNIGLOT_ZIP_NAMES.items():
        target = root / name
        want_sha, want_md5 = sha_table.get(name), md5_table.get(name)
        if target.is_file():
            _check_hashes(name, *_hash_file(target), want_sha, want_md5, f"existing file {target}")
        else:
            url = f"{url_base.rstrip('/')}/{name}"
            logger.info("downloading %s", url)
            fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".part", dir=root)
            try:
                sha, md5 = hashlib.sha256(), hashlib.md5()
                with os.fdopen(fd, "wb") as handle, urllib.request.urlopen(url, timeout=timeout) as response:
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        handle.write(chunk)
                        sha.update(chunk)
                        md5.update(chunk)
                logger.info("%s: sha256 %s, md5 %s", name, sha.hexdigest(), md5.hexdigest())
                _check_hashes(name, sha.hexdigest(), md5.hexdigest(), want_sha, want_md5, f"downloaded from {url}")
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        if extract:
            safe_extract(target, root)
        out[split] = target
    return out
