"""Reading Omniglot: the three on-disk layouts, conversion and the cache (see the package docstring)."""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..base import atomic_save_npz, load_npz_cache, pil_resample_lanczos, resolve_cache_dir

if TYPE_CHECKING:  # PIL is imported lazily: it is only needed to convert images
    from PIL import Image

logger = logging.getLogger(__name__)

#: The two halves of the official data set.
SOURCE_SPLITS: tuple[str, ...] = ("background", "evaluation")
OMNIGLOT_ZIP_NAMES: dict[str, str] = {s: f"images_{s}.zip" for s in SOURCE_SPLITS}


_NPZ_COPY_NAME = "omniglot_{split}_{size}.npz"
# Folders inside a data root that may hold the files (torchvision uses "omniglot-py").
_SUBFOLDERS = ("", "omniglot", "omniglot-py")
_CHARACTER_RE = re.compile(r"^character(\d+)$")
_PNG_RE = re.compile(r"^(\d+)_(\d+)\.png$", re.IGNORECASE)
_CACHE_VERSION = "omniglot-cache-v1"




def _zip_entry_is_symlink(info: zipfile.ZipInfo) -> bool:
    # Unix mode bits live in the high 16 bits of external_attr for zips made on Unix.
    return stat.S_ISLNK(info.external_attr >> 16)


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
    def concatenate(parts: Sequence[OmniglotCharacters]) -> OmniglotCharacters:
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
    try:
        # The file handle is ours: numpy leaks its own when the file is not an archive.
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as data:
            missing = [k for k in ("images", "alphabet_names", "alphabet", "character") if k not in data.files]
            if missing:
                raise ValueError(f"{path} is not an Omniglot .npz of this format: it lacks the array(s) {missing}")
            raw = data["images"]
            alphabet_names = [str(a) for a in data["alphabet_names"]]
            names = tuple(f"{alphabet_names[a]}/character{c:02d}"
                          for a, c in zip(data["alphabet"].tolist(), data["character"].tolist()))
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, IndexError) as e:
        raise ValueError(f"{path} is not a readable .npz file (truncated or corrupt): {type(e).__name__}") from None
    except ValueError as e:
        if "lacks the array" in str(e):
            raise
        # numpy's own text suggests allow_pickle=True for a file that is not a plain array
        # archive: never pass that advice on to a user.
        raise ValueError(f"{path} is not a readable .npz file of arrays (corrupt, or not written by numpy.savez)") from None
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

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path} is not a readable zip archive (truncated or corrupt): {e}") from None
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
