"""Downloading the official Omniglot zips, checking their hashes, and extracting them safely."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import urllib.request
import zipfile
from collections.abc import Mapping
from pathlib import Path

from ._read import OMNIGLOT_ZIP_NAMES, _zip_entry_is_symlink

logger = logging.getLogger(__name__)

#: Where the official zips live (``<base>/images_background.zip``, ``.../images_evaluation.zip``).
OMNIGLOT_URL_BASE = "https://github.com/brendenlake/omniglot/raw/master/python"

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


# --------------------------------------------------------------------------------------
# Download and safe extraction
# --------------------------------------------------------------------------------------
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

