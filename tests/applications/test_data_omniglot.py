"""Tests of the Omniglot data layer (applications.imaml.data.omniglot).

Real-data tests use the offline copy found through ``BILEVEL_OMNIGLOT`` or at
``<repo>/../shared/data/omniglot`` and are skipped when it is absent; the other tests
build tiny official-layout fixtures (folders, zips) with PIL.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from applications.imaml.data import load_dataset, omniglot
from applications.imaml.data.omniglot import (
    SPLITS,
    download_omniglot,
    find_omniglot_sources,
    load_omniglot,
    load_omniglot_characters,
    omniglot_split_classes,
    read_omniglot_official,
    safe_extract,
    vinyals_split_lines,
)

_DEFAULT_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "omniglot"
OMNIGLOT_ROOT = Path(os.environ.get("BILEVEL_OMNIGLOT") or _DEFAULT_ROOT)
_REAL_FILES = ("omniglot_background_28.npz", "omniglot_evaluation_28.npz", "splits_vinyals/train.txt")


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def real_root() -> Path:
    missing = [f for f in _REAL_FILES if not (OMNIGLOT_ROOT / f).is_file()]
    if missing:
        pytest.skip(f"real Omniglot copy not found at {OMNIGLOT_ROOT} (missing {', '.join(missing)}); set BILEVEL_OMNIGLOT")
    return OMNIGLOT_ROOT


@pytest.fixture(scope="session")
def real_chars(real_root: Path, tmp_path_factory: pytest.TempPathFactory) -> omniglot.OmniglotCharacters:
    return load_omniglot_characters(real_root, cache_dir=tmp_path_factory.mktemp("omniglot_cache"))


@pytest.fixture(scope="session")
def real_splits(real_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], object]:
    cache = tmp_path_factory.mktemp("omniglot_split_cache")
    return {
        (scheme, split): load_omniglot(real_root, split, split_scheme=scheme, cache_dir=cache)
        for scheme in ("vinyals", "maml")
        for split in SPLITS
    }


def _glyph(rng: np.random.Generator) -> np.ndarray:
    """A 105x105 bool image, True = white background, with a few black strokes."""
    img = np.ones((105, 105), dtype=bool)
    for _ in range(3):
        r, c = rng.integers(10, 90, size=2)
        h, w = rng.integers(3, 15, size=2)
        img[r : r + h, c : c + w * 3] = False
    return img


# Alphabets chosen so that the Vinyals rule puts them in train (Latin, part of Gurmukhi),
# val (Hebrew) and test (Tibetan, rest of Gurmukhi); (first char id, #characters).
_FIXTURE = {
    "background": {"Latin": (700, 3), "Hebrew": (800, 2)},
    "evaluation": {"Gurmukhi": (1160, 3), "Tibetan": (1300, 2)},
}
_DRAWERS = 4


def _write_official(root: Path, split: str, top: str, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Official folder layout ``<root>/<top>/<Alphabet>/characterNN/XXXX_YY.png``."""
    from PIL import Image

    rng = np.random.default_rng(seed + (split == "evaluation"))
    truth: dict[str, list[np.ndarray]] = {}
    for alphabet, (first_id, count) in _FIXTURE[split].items():
        for k in range(count):
            # Gurmukhi starts at character 41 so that 42+ fall into the Vinyals test set.
            number = k + (41 if alphabet == "Gurmukhi" else 1)
            folder = root / top / alphabet / f"character{number:02d}"
            folder.mkdir(parents=True)
            glyphs = []
            for drawer in range(1, _DRAWERS + 1):
                glyph = _glyph(rng)
                Image.fromarray(glyph).save(folder / f"{first_id + k:04d}_{drawer:02d}.png")  # mode "1"
                glyphs.append(glyph)
            truth[f"{alphabet}/character{number:02d}"] = glyphs
    return truth


def _zip_tree(folder: Path, zip_path: Path, top: str) -> None:
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr(top + "/", "")
        for file in sorted(folder.rglob("*")):
            archive.write(file, f"{top}/{file.relative_to(folder).as_posix()}" + ("/" if file.is_dir() else ""))


def _expected_ink(glyph: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    grey = Image.fromarray(glyph.astype(np.uint8) * 255, mode="L")
    return 255 - np.asarray(grey.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


@pytest.fixture()
def official_tree(tmp_path: Path) -> tuple[Path, dict[str, list[np.ndarray]]]:
    truth = _write_official(tmp_path, "background", "images_background")
    truth.update(_write_official(tmp_path, "evaluation", "images_evaluation"))
    return tmp_path, truth


# --------------------------------------------------------------------------------------
# Real data (offline copy)
# --------------------------------------------------------------------------------------
def test_real_counts_polarity_and_range(real_chars: omniglot.OmniglotCharacters) -> None:
    chars = real_chars
    assert chars.images.shape == (964 + 659, 20, 28, 28) and chars.images.dtype == np.uint8
    assert chars.source_splits.count("background") == 964 and chars.source_splits.count("evaluation") == 659
    assert len(set(chars.names)) == 1623
    alphabets = {n.split("/")[0] for n in chars.names}
    assert len(alphabets) == 50
    ink = chars.images.astype(np.float32) / 255.0
    assert 0.0 <= ink.min() and ink.max() <= 1.0
    # Ink (1.0 after inversion) covers about 8% of the pixels; the border is background.
    assert 0.06 < float(ink.mean()) < 0.10
    assert 0.06 < float((ink > 0.5).mean()) < 0.10
    assert float(ink[:, :, 0, :].mean()) < 0.01


def test_real_vinyals_split_counts_and_disjointness(real_splits: dict) -> None:
    counts = {split: real_splits[("vinyals", split)].num_classes for split in SPLITS}
    assert counts == {"train": 4112, "val": 688, "test": 1692, "trainval": 4800}
    train = real_splits[("vinyals", "train")]
    assert train.images.shape == (4112, 20, 1, 28, 28)
    assert all(name.count("/") == 2 for name in train.class_names)


@pytest.mark.parametrize("scheme", ["vinyals", "maml"])
def test_real_splits_are_disjoint_and_cover_all_characters(real_splits: dict, scheme: str) -> None:
    chars = {
        split: {name.rsplit("/", 1)[0] for name in real_splits[(scheme, split)].class_names} for split in ("train", "val", "test")
    }
    assert not chars["train"] & chars["val"] and not chars["train"] & chars["test"] and not chars["val"] & chars["test"]
    assert len(chars["train"] | chars["val"] | chars["test"]) == 1623
    expected = {"vinyals": (1028, 172, 423), "maml": (1100, 100, 423)}[scheme]
    assert tuple(len(chars[s]) for s in ("train", "val", "test")) == expected
    trainval = {name.rsplit("/", 1)[0] for name in real_splits[(scheme, "trainval")].class_names}
    assert trainval == chars["train"] | chars["val"]
    # Every character appears in all four rotations, each its own class.
    names = real_splits[(scheme, "test")].class_names
    assert len(set(names)) == len(names) == 4 * len(chars["test"])


def test_real_rotations_are_rot90_of_the_original(real_splits: dict, real_chars: omniglot.OmniglotCharacters) -> None:
    ds = real_splits[("vinyals", "val")]
    index = {name: i for i, name in enumerate(ds.class_names)}
    base = ds.images[index["Hebrew/character05/rot000"], :, 0]
    original = real_chars.images[real_chars.names.index("Hebrew/character05")]
    np.testing.assert_array_equal(base, original)
    for degrees in (90, 180, 270):
        rotated = ds.images[index[f"Hebrew/character05/rot{degrees:03d}"], :, 0]
        np.testing.assert_array_equal(rotated, np.rot90(base, k=degrees // 90, axes=(-2, -1)))


def test_real_vinyals_rule_reproduces_the_list_files(real_root: Path, real_chars: omniglot.OmniglotCharacters) -> None:
    for split in SPLITS:
        from_files = vinyals_split_lines(split, data_root=real_root)
        from_rule = vinyals_split_lines(split, character_names=real_chars.names)
        assert len(from_files) == len(set(from_files))
        assert set(from_files) == set(from_rule), split


def test_real_maml_split_is_seeded(real_chars: omniglot.OmniglotCharacters) -> None:
    a = omniglot_split_classes(real_chars.names, "test", scheme="maml", split_seed=1)
    b = omniglot_split_classes(real_chars.names, "test", scheme="maml", split_seed=1)
    c = omniglot_split_classes(real_chars.names, "test", scheme="maml", split_seed=2)
    assert a == b and set(a) != set(c)


def test_real_episodes_from_the_train_split(real_splits: dict) -> None:
    sampler = real_splits[("vinyals", "train")].sampler(ways=5, shots=1, queries=15, seed=0)
    batch = sampler.sample(4)
    assert batch.support_x.shape == (4, 5, 1, 28, 28) and batch.query_x.shape == (4, 75, 1, 28, 28)
    assert batch.support_x.dtype == torch.float32
    assert 0.0 <= float(batch.query_x.min()) and float(batch.query_x.max()) <= 1.0
    assert int(batch.classes.max()) < 4112


def test_load_dataset_omniglot_via_env_var(real_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILEVEL_OMNIGLOT", str(real_root))
    ds = load_dataset("Omniglot", None, "val", rotations=(0,))
    assert ds.num_classes == 172 and ds.name == "omniglot" and ds.split == "val"


def test_official_small_zip_matches_the_npz_copy(real_root: Path, real_chars: omniglot.OmniglotCharacters) -> None:
    small = real_root / "images_background_small1.zip"
    if not small.is_file():
        pytest.skip(f"{small} not found")
    chars = read_omniglot_official(small, source_split="background", alphabets=["Greek", "Latin"])
    assert {n.split("/")[0] for n in chars.names} == {"Greek", "Latin"}
    assert chars.images.shape == (24 + 26, 20, 28, 28)
    index = {n: i for i, n in enumerate(real_chars.names)}
    reference = real_chars.images[[index[n] for n in chars.names]]
    # Same 105x105 pixels and the same LANCZOS pipeline: identical up to rounding.
    assert int(np.abs(chars.images.astype(int) - reference.astype(int)).max()) <= 1
    # At the original resolution they are pixel-identical to the 105 copy.
    full = read_omniglot_official(small, source_split="background", image_size=105, alphabets=["Greek"])
    with np.load(real_root / "omniglot_background_105.npz", allow_pickle=False) as data:
        ref105 = data["images"][[index[n] for n in full.names]]
    np.testing.assert_array_equal(full.images == 255, ~ref105)


def test_official_small_zip_through_the_loader_is_cached(
    real_root: Path, real_chars: omniglot.OmniglotCharacters, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = real_root / "images_background_small1.zip"
    if not small.is_file():
        pytest.skip(f"{small} not found")
    (tmp_path / "images_background.zip").symlink_to(small)
    start = time.perf_counter()
    chars = load_omniglot_characters(tmp_path, source_splits=("background",))
    elapsed = time.perf_counter() - start
    print(f"converted images_background_small1.zip ({len(chars)} characters) in {elapsed:.2f} s")
    assert len(chars) == 136 and (tmp_path / "bilevel_cache" / "omniglot_background_28.npz").is_file()
    index = {n: i for i, n in enumerate(real_chars.names)}
    np.testing.assert_array_equal(chars.images, real_chars.images[[index[n] for n in chars.names]])

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(omniglot._read, "read_omniglot_official", fail)
    again = load_omniglot_characters(tmp_path, source_splits=("background",))
    np.testing.assert_array_equal(again.images, chars.images)
    assert again.names == chars.names


# --------------------------------------------------------------------------------------
# Generated official layouts
# --------------------------------------------------------------------------------------
def test_folder_layout_conversion_and_cache(official_tree: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    root, truth = official_tree
    sources = find_omniglot_sources(root)
    assert {s.kind for s in sources.values()} == {"folder"}
    chars = load_omniglot_characters(root)
    # Ordered by the global character id of the file names, background first.
    assert chars.names == (
        "Latin/character01", "Latin/character02", "Latin/character03", "Hebrew/character01", "Hebrew/character02",
        "Gurmukhi/character41", "Gurmukhi/character42", "Gurmukhi/character43", "Tibetan/character01", "Tibetan/character02",
    )  # fmt: skip
    assert chars.source_splits == ("background",) * 5 + ("evaluation",) * 5
    assert chars.images.shape == (10, _DRAWERS, 28, 28) and chars.images.dtype == np.uint8
    for i, name in enumerate(chars.names):
        for d in range(_DRAWERS):
            np.testing.assert_array_equal(chars.images[i, d], _expected_ink(truth[name][d], 28))
    cache = root / "bilevel_cache"
    assert sorted(p.name for p in cache.iterdir()) == ["omniglot_background_28.npz", "omniglot_evaluation_28.npz"]

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(omniglot._read, "read_omniglot_official", fail)
    cached = load_omniglot_characters(root)
    np.testing.assert_array_equal(cached.images, chars.images)
    assert cached.names == chars.names and cached.source_splits == chars.source_splits
    monkeypatch.undo()

    # Adding an alphabet changes the source, so the cache is rebuilt.
    (root / "images_background" / "Extra" / "character01").mkdir(parents=True)
    for d in range(1, _DRAWERS + 1):
        src = next((root / "images_background" / "Latin" / "character01").glob(f"*_{d:02d}.png"))
        (root / "images_background" / "Extra" / "character01" / f"0999_{d:02d}.png").write_bytes(src.read_bytes())
    assert len(load_omniglot_characters(root)) == 11


def test_zip_layout_with_any_top_folder_matches_folders(official_tree: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> None:
    root, _ = official_tree
    from_folders = load_omniglot_characters(root, cache_dir=root / "c1")
    zroot = tmp_path_factory.mktemp("zips")
    _zip_tree(root / "images_background", zroot / "images_background.zip", "images_background_small1")
    _zip_tree(root / "images_evaluation", zroot / "images_evaluation.zip", "images_evaluation")
    sources = find_omniglot_sources(zroot)
    assert {s.kind for s in sources.values()} == {"zip"}
    custom_cache = zroot / "my cache"
    from_zips = load_omniglot_characters(zroot, cache_dir=custom_cache)
    assert from_zips.names == from_folders.names
    np.testing.assert_array_equal(from_zips.images, from_folders.images)
    assert (custom_cache / "omniglot_evaluation_28.npz").is_file()
    assert not (zroot / "bilevel_cache").exists()
    only = read_omniglot_official(zroot / "images_evaluation.zip", source_split="evaluation", alphabets=["Tibetan"], image_size=105)
    assert only.names == ("Tibetan/character01", "Tibetan/character02") and only.images.shape == (2, _DRAWERS, 105, 105)


def test_vinyals_rule_and_rotations_on_the_fixture(official_tree: tuple[Path, dict]) -> None:
    root, _ = official_tree
    members = {
        split: sorted({n.rsplit("/", 1)[0] for n in load_omniglot(root, split).class_names}) for split in ("train", "val", "test")
    }
    assert members == {
        "train": ["Gurmukhi/character41", "Latin/character01", "Latin/character02", "Latin/character03"],
        "val": ["Hebrew/character01", "Hebrew/character02"],
        "test": ["Gurmukhi/character42", "Gurmukhi/character43", "Tibetan/character01", "Tibetan/character02"],
    }
    ds = load_omniglot(root, "val", rotations=(0, 90), image_size=105)
    assert ds.class_names == [f"Hebrew/character0{k}/rot{r:03d}" for k in (1, 2) for r in (0, 90)]
    assert ds.images.shape == (4, _DRAWERS, 1, 105, 105)
    np.testing.assert_array_equal(ds.images[1], np.rot90(ds.images[0], axes=(-2, -1)))


def test_split_function_errors_and_maml_sizes() -> None:
    names = [f"A{a}/character{c:02d}" for a in range(5) for c in range(1, 11)]
    parts = {s: omniglot_split_classes(names, s, scheme="maml", maml_sizes=(30, 10), rotations=(0,)) for s in SPLITS}
    assert [len(parts[s]) for s in ("train", "val", "test", "trainval")] == [20, 10, 20, 30]
    assert set(parts["trainval"]) == set(parts["train"]) | set(parts["val"])
    # The MAML split depends on the names, not on their order.
    shuffled = list(reversed(names))
    again = omniglot_split_classes(shuffled, "test", scheme="maml", maml_sizes=(30, 10), rotations=(0,))
    assert {shuffled[i] for i, _ in again} == {names[i] for i, _ in parts["test"]}
    with pytest.raises(ValueError, match="unknown split scheme 'protonet'"):
        omniglot_split_classes(names, "train", scheme="protonet")
    with pytest.raises(ValueError, match="unknown Omniglot split 'dev'"):
        omniglot_split_classes(names, "dev")
    with pytest.raises(ValueError, match="rotations must be distinct values among"):
        omniglot_split_classes(names, "train", rotations=(45,))
    with pytest.raises(ValueError, match=r"do not fit 50 characters"):
        omniglot_split_classes(names, "train", scheme="maml")


def test_missing_data_lists_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_omniglot(tmp_path, "train")
    message = str(info.value)
    for expected in ("background and evaluation", "omniglot_background_28.npz", "images_evaluation.zip", "images_background/", str(tmp_path)):
        assert expected in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_omniglot(tmp_path / "nope", "train")
    # Only one half present: the message names the missing one.
    (tmp_path / "images_background").mkdir()
    with pytest.raises(FileNotFoundError, match=r"for the evaluation split\(s\)"):
        find_omniglot_sources(tmp_path)


def test_unequal_drawings_are_reported(official_tree: tuple[Path, dict]) -> None:
    root, _ = official_tree
    next((root / "images_evaluation" / "Tibetan" / "character02").glob("*_03.png")).unlink()
    with pytest.raises(ValueError, match=r"Tibetan/character02 .* has drawings \[1, 2, 4\]"):
        read_omniglot_official(root / "images_evaluation", source_split="evaluation")


# --------------------------------------------------------------------------------------
# Safe extraction and download
# --------------------------------------------------------------------------------------
def _zip_with(path: Path, entries: list[zipfile.ZipInfo | str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ok/fine.txt", "fine")
        for entry in entries:
            archive.writestr(entry, "payload")
    return path


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../evil.txt", "'..' path component"),
        ("/abs.txt", "absolute path"),
        ("a/../../b", "'..' path component"),
        ("a/b/../../../c.txt", "'..' path component"),
        ("C:/windows.txt", "absolute path"),
        ("..\\evil.txt", "backslash"),
    ],
)
def test_safe_extract_rejects_path_traversal(tmp_path: Path, name: str, reason: str) -> None:
    archive = _zip_with(tmp_path / "bad.zip", [zipfile.ZipInfo(name)])
    assert name in zipfile.ZipFile(archive).namelist()  # the crafted name survived zipfile
    dest = tmp_path / "out"
    with pytest.raises(ValueError, match="unsafe entry") as info:
        safe_extract(archive, dest)
    assert repr(name) in str(info.value) and reason in str(info.value)
    assert list(dest.rglob("*")) == []  # nothing extracted, not even the good entry
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "b").exists()


def test_safe_extract_rejects_symlinks(tmp_path: Path) -> None:
    link = zipfile.ZipInfo("ok/link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = _zip_with(tmp_path / "link.zip", [link])
    with pytest.raises(ValueError, match=r"unsafe entry 'ok/link'.*symbolic link"):
        safe_extract(archive, tmp_path / "out")


def test_safe_extract_extracts_a_good_zip(tmp_path: Path) -> None:
    archive = _zip_with(tmp_path / "good.zip", ["ok/sub/x.txt", "top.txt"])
    paths = safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "ok" / "sub" / "x.txt").read_text() == "payload"
    assert (tmp_path / "out" / "top.txt").is_file() and len(paths) == 3


def test_download_verifies_checksums_and_extracts(official_tree: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> None:
    root, _ = official_tree
    server = tmp_path_factory.mktemp("server")
    _zip_tree(root / "images_background", server / "images_background.zip", "images_background")
    _zip_tree(root / "images_evaluation", server / "images_evaluation.zip", "images_evaluation")
    sha = {n: hashlib.sha256((server / n).read_bytes()).hexdigest() for n in ("images_background.zip", "images_evaluation.zip")}

    dest = tmp_path_factory.mktemp("dest")
    out = download_omniglot(dest, url_base=server.as_uri(), expected_sha256=sha, expected_md5={})
    assert out == {"background": dest / "images_background.zip", "evaluation": dest / "images_evaluation.zip"}
    assert (dest / "images_background" / "Latin" / "character01").is_dir()
    assert find_omniglot_sources(dest)["evaluation"].kind == "folder"
    assert len(load_omniglot_characters(dest)) == 10
    # Already present: re-verified, not fetched (the bad URL would fail otherwise).
    download_omniglot(dest, url_base="file:///nonexistent", expected_sha256=sha, expected_md5={}, extract=False)

    # Wrong checksum: error, and neither the file nor a temporary is left behind.
    bad = tmp_path_factory.mktemp("bad")
    wrong = {**sha, "images_background.zip": "0" * 64}
    with pytest.raises(ValueError, match="SHA-256 mismatch for images_background.zip"):
        download_omniglot(bad, url_base=server.as_uri(), expected_sha256=wrong, expected_md5={})
    assert list(bad.iterdir()) == []
    # Defaults: the published MD5 is enforced (this fake data cannot match it).
    with pytest.raises(ValueError, match="MD5 mismatch for images_background.zip"):
        download_omniglot(bad, url_base=server.as_uri())
    assert list(bad.iterdir()) == []
    # No checksum at all: refuse before touching the network.
    with pytest.raises(ValueError, match="refusing to download unverified data"):
        download_omniglot(bad, url_base=server.as_uri(), expected_sha256={}, expected_md5={})


def test_unverified_sha256_is_not_presented_as_known() -> None:
    # The SHA-256 values could not be checked here; they must stay None until someone
    # with internet access verifies them (the MD5 values are torchvision's published ones).
    assert set(omniglot.OMNIGLOT_ZIP_SHA256) == set(omniglot.OMNIGLOT_ZIP_MD5)
    for value in omniglot.OMNIGLOT_ZIP_SHA256.values():
        assert value is None or len(value) == 64
