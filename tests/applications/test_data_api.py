"""Tests of the common data API (applications.imaml.data.load_dataset and friends)."""

from __future__ import annotations

from pathlib import Path

import pytest

from applications.imaml.data import DATASETS, SinusoidTasks, load_dataset, sinusoid_tasks


def test_unknown_dataset_lists_the_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar-fs'; valid names are omniglot, miniimagenet"):
        load_dataset("cifar-fs", "/tmp", "train")
    assert DATASETS == ("omniglot", "miniimagenet")


def test_unknown_split() -> None:
    with pytest.raises(ValueError, match=r"unknown miniimagenet split 'trainval'; valid splits are train, val, test"):
        load_dataset("miniimagenet", "/tmp", "trainval")


@pytest.mark.parametrize(("name", "env_var"), [("omniglot", "BILEVEL_OMNIGLOT"), ("miniimagenet", "BILEVEL_MINIIMAGENET")])
def test_missing_data_root(name: str, env_var: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(env_var, raising=False)
    with pytest.raises(FileNotFoundError, match=f"no data root given for {name}: pass data_root .* set the {env_var}"):
        load_dataset(name, None, "train")
    absent = tmp_path / "not-here"
    with pytest.raises(FileNotFoundError, match=f"{name} data root '{absent}' does not exist"):
        load_dataset(name, absent, "train")
    monkeypatch.setenv(env_var, str(absent))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(name, None, "train")
    # An existing but empty root: the loader says which files it looked for.
    with pytest.raises(FileNotFoundError, match="Looked for"):
        load_dataset(name, tmp_path, "train")


def test_sinusoid_task_source() -> None:
    tasks = sinusoid_tasks(shots=5, queries=3, seed=2)
    assert isinstance(tasks, SinusoidTasks)
    batch = tasks.sample(2)
    assert batch.support_x.shape == (2, 5, 1) and batch.query_y.shape == (2, 3, 1)
