"""Tests of the Mini-ImageNet loaders on generated fixtures (applications.imaml.data.miniimagenet).

There is no real copy here; the fixtures reproduce the Ravi & Larochelle layout
(``images/`` + ``{train,val,test}.csv``) and the ``mini-imagenet-cache-<split>.pkl`` format.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from applications.imaml.data import load_dataset, miniimagenet
from applications.imaml.data.miniimagenet import (
    find_miniimagenet_source,
    load_miniimagenet,
    read_miniimagenet_csv,
    read_miniimagenet_pickle,
)

_SPLITS = {"train": ["n01532829", "n01558993", "n01704323", "n01749939"], "val": ["n01855672"], "test": ["n01930112"]}
_PER_CLASS = 25
_COLOURS = {label: (40 * i + 20, 200 - 30 * i, (70 * i) % 256) for i, label in enumerate(sum(_SPLITS.values(), []))}


def _write_csv_layout(root: Path, *, per_class_folders: bool = False) -> None:
    """6 classes x 25 small JPEGs of a solid colour per class, odd sizes, some grey-scale."""
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True)
    for split, labels in _SPLITS.items():
        lines = ["filename,label"]
        for label in labels:
            for k in range(_PER_CLASS):
                filename = f"{label}{k + 1:08d}.jpg"
                size = (30 + k, 20 + 2 * k)  # not square, not 84: exercises the resize
                img = Image.new("RGB", size, _COLOURS[label])
                if k == 3:
                    img = img.convert("L")  # grey-scale JPEGs exist in ImageNet
                target = images / label if per_class_folders else images
                target.mkdir(exist_ok=True)
                img.save(target / filename, quality=95)
                lines.append(f"{filename},{label}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")


def _pickle_payload(split: str, seed: int = 0) -> tuple[dict, np.ndarray]:
    """A pickle-cache dict with rows of different classes interleaved, and the expected array."""
    rng = np.random.default_rng(seed)
    labels = _SPLITS[split]
    expected = rng.integers(0, 256, size=(len(labels), 6, 84, 84, 3), dtype=np.uint8)
    order = rng.permutation(len(labels) * 6)
    # Row r holds image j of class c where order[r] = 6c + j; class_dict lists, for each
    # class (in reversed label order, to check the loader sorts them), rows for j = 0..5.
    image_data = expected.reshape(-1, 84, 84, 3)[order]
    row_of = np.argsort(order)
    class_dict = {label: [int(row_of[c * 6 + j]) for j in range(6)] for c, label in reversed(list(enumerate(labels)))}
    return {"image_data": image_data, "class_dict": class_dict}, expected.transpose(0, 1, 4, 2, 3)


@pytest.fixture(scope="module")
def csv_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mini_csv")
    _write_csv_layout(root)
    return root


def test_csv_layout_conversion_colours_and_cache(csv_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = load_miniimagenet(csv_root, "train", num_workers=2)
    assert ds.images.shape == (4, _PER_CLASS, 3, 84, 84) and ds.images.dtype == np.uint8
    assert ds.class_names == sorted(_SPLITS["train"]) and ds.name == "miniimagenet"
    for c, label in enumerate(ds.class_names):
        colour = ds.images[c, 0].reshape(3, -1).mean(axis=1)
        np.testing.assert_allclose(colour, _COLOURS[label], atol=4)
        grey = ds.images[c, 3].astype(float)
        assert np.abs(grey[0] - grey[1]).max() <= 1 and np.abs(grey[1] - grey[2]).max() <= 1
    assert (csv_root / "bilevel_cache" / "miniimagenet_train_84.npz").is_file()

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(miniimagenet, "read_miniimagenet_csv", fail)
    cached = load_miniimagenet(csv_root, "train")
    np.testing.assert_array_equal(cached.images, ds.images)
    assert cached.class_names == ds.class_names

    # Default normalisation keeps [0, 1]; episodes come out as float (B, N*K, 3, 84, 84).
    batch = cached.sampler(ways=3, shots=2, queries=5, seed=0).sample(2)
    assert batch.support_x.shape == (2, 6, 3, 84, 84) and batch.query_x.shape == (2, 15, 3, 84, 84)
    assert batch.support_x.dtype == torch.float32
    assert 0.0 <= float(batch.support_x.min()) and float(batch.support_x.max()) <= 1.0


def test_val_and_test_splits_and_imagenet_normalisation(csv_root: Path, tmp_path: Path) -> None:
    val = load_miniimagenet(csv_root, "val", cache_dir=tmp_path, normalization="imagenet")
    test = load_miniimagenet(csv_root, "test", cache_dir=tmp_path)
    assert val.class_names == _SPLITS["val"] and test.class_names == _SPLITS["test"]
    assert (tmp_path / "miniimagenet_val_84.npz").is_file()
    x = val.to_float(torch.from_numpy(val.images[0, :1]))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (torch.from_numpy(val.images[0, 0]).float() / 255 - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    torch.testing.assert_close(x[0], expected)
    with pytest.raises(ValueError, match="unknown normalization 'zscore'"):
        load_miniimagenet(csv_root, "val", normalization="zscore")


def test_per_class_image_folders_are_accepted(tmp_path: Path) -> None:
    _write_csv_layout(tmp_path, per_class_folders=True)
    images, names = read_miniimagenet_csv(tmp_path / "test.csv", tmp_path / "images", image_size=32, num_workers=1)
    assert images.shape == (1, _PER_CLASS, 3, 32, 32) and names == _SPLITS["test"]


def test_csv_errors_name_the_problem(tmp_path: Path) -> None:
    _write_csv_layout(tmp_path)
    (tmp_path / "images" / "n0193011200000007.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of the 25 images listed in .*test\.csv .*n0193011200000007\.jpg"):
        read_miniimagenet_csv(tmp_path / "test.csv", tmp_path / "images")
    (tmp_path / "val.csv").write_text("file,class\nx.jpg,n1\n")
    with pytest.raises(ValueError, match="must start with the header 'filename,label'"):
        load_miniimagenet(tmp_path, "val")
    lines = (tmp_path / "train.csv").read_text().splitlines()
    (tmp_path / "train.csv").write_text("\n".join(lines[:-1]) + "\n")  # one class now has 24 images
    with pytest.raises(ValueError, match=r"different numbers of images \(n01749939: 24"):
        load_miniimagenet(tmp_path, "train", cache_dir=tmp_path / "c")


def test_missing_layout_lists_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_miniimagenet(tmp_path, "train")
    message = str(info.value)
    assert "mini-imagenet-cache-train.pkl" in message and "train.csv" in message and str(tmp_path) in message
    (tmp_path / "train.csv").write_text("filename,label\n")  # CSV without images/ folder
    with pytest.raises(FileNotFoundError, match=f"with {tmp_path / 'images'}/"):
        find_miniimagenet_source(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_miniimagenet(tmp_path / "absent", "train")
    with pytest.raises(ValueError, match="unknown Mini-ImageNet split 'trainval'"):
        load_miniimagenet(tmp_path, "trainval")


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pickle_cache_layout(tmp_path: Path, protocol: int) -> None:
    payload, expected = _pickle_payload("train")
    sub = tmp_path / "mini-imagenet"
    sub.mkdir()
    with open(sub / "mini-imagenet-cache-train.pkl", "wb") as handle:
        pickle.dump(payload, handle, protocol=protocol)
    source = find_miniimagenet_source(tmp_path, "train")
    assert source.kind == "pickle"
    ds = load_miniimagenet(tmp_path, "train")
    assert ds.class_names == sorted(_SPLITS["train"])
    np.testing.assert_array_equal(ds.images, expected)
    small, _ = read_miniimagenet_pickle(source.path, image_size=42)
    assert small.shape == (4, 6, 3, 42, 42)
    assert not (tmp_path / "bilevel_cache").exists()  # the pickle is already an array file


def test_both_layouts_present_and_layout_choice(csv_root: Path, tmp_path: Path) -> None:
    payload, _ = _pickle_payload("test")
    root = tmp_path / "both"
    root.mkdir()
    os.symlink(csv_root / "images", root / "images")
    os.symlink(csv_root / "test.csv", root / "test.csv")
    with open(root / "mini-imagenet-cache-test.pkl", "wb") as handle:
        pickle.dump(payload, handle)
    assert find_miniimagenet_source(root, "test").kind == "pickle"
    assert load_miniimagenet(root, "test").images_per_class == 6
    assert load_miniimagenet(root, "test", layout="csv", cache_dir=tmp_path / "c").images_per_class == _PER_CLASS


class _Exploit:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.target),))


def test_malicious_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    with open(tmp_path / "mini-imagenet-cache-val.pkl", "wb") as handle:
        pickle.dump({"image_data": _Exploit(target), "class_dict": {}}, handle)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load (posix|nt|os)\.mkdir"):
        load_miniimagenet(tmp_path, "val")
    assert not target.exists()


def test_wrong_pickle_content(tmp_path: Path) -> None:
    with open(tmp_path / "mini-imagenet-cache-val.pkl", "wb") as handle:
        pickle.dump({"images": np.zeros((2, 84, 84, 3), np.uint8)}, handle)
    with pytest.raises(ValueError, match="dict with 'image_data' and 'class_dict'"):
        load_miniimagenet(tmp_path, "val")


def test_load_dataset_miniimagenet(tmp_path: Path) -> None:
    payload, expected = _pickle_payload("val")
    with open(tmp_path / "mini-imagenet-cache-val.pkl", "wb") as handle:
        pickle.dump(payload, handle)
    ds = load_dataset("mini-ImageNet", tmp_path, "val")
    np.testing.assert_array_equal(ds.images, expected)
    with pytest.raises(ValueError, match=r"shots \+ queries = 1 \+ 15 = 16 exceeds the 6 images per class"):
        ds.sampler(ways=1, shots=1, queries=15)
