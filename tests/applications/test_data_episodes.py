"""Tests of the N-way K-shot episode sampler (applications.imaml.data.episodes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from applications.imaml.data import ClassDataset, EpisodeSampler


def _id_images(classes: int, per_class: int, side: int = 3) -> torch.Tensor:
    """Float images whose every pixel is ``100 * class + index``, to trace each image back."""
    ids = 100 * torch.arange(classes).view(-1, 1) + torch.arange(per_class).view(1, -1)
    return ids.to(torch.float32).view(classes, per_class, 1, 1, 1).expand(classes, per_class, 1, side, side).clone()


def _ids(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(start_dim=x.ndim - 3)[..., 0].to(torch.int64)


def test_shapes_dtypes_and_uint8_conversion() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10, 8, 1, 5, 5), dtype=np.uint8)
    sampler = EpisodeSampler(images, ways=3, shots=2, queries=4, seed=0)
    ep = sampler.next_episode()
    assert ep.support_x.shape == (6, 1, 5, 5) and ep.query_x.shape == (12, 1, 5, 5)
    assert ep.support_y.shape == (6,) and ep.query_y.shape == (12,) and ep.classes.shape == (3,)
    assert ep.support_x.dtype == torch.float32 and ep.support_y.dtype == torch.int64
    assert 0.0 <= float(ep.support_x.min()) and float(ep.support_x.max()) <= 1.0
    # The default transform is x / 255 of the stored bytes.
    c, first = int(ep.classes[0]), ep.support_x[0]
    assert any(torch.equal(first, torch.from_numpy(images[c, n]).float() / 255) for n in range(8))

    batch = sampler.sample(7)
    assert batch.support_x.shape == (7, 6, 1, 5, 5)
    assert batch.query_x.shape == (7, 12, 1, 5, 5)
    assert batch.support_y.shape == (7, 6) and batch.query_y.shape == (7, 12)
    assert batch.classes.shape == (7, 3)
    assert sampler.position == 8


def test_labels_balanced_images_distinct_and_from_the_labelled_class() -> None:
    images = _id_images(classes=12, per_class=9)
    sampler = EpisodeSampler(images, ways=5, shots=3, queries=4, seed=1)
    for i in range(20):
        ep = sampler.episode(i)
        assert torch.equal(torch.bincount(ep.support_y, minlength=5), torch.full((5,), 3))
        assert torch.equal(torch.bincount(ep.query_y, minlength=5), torch.full((5,), 4))
        assert len(set(ep.classes.tolist())) == 5
        support, query = _ids(ep.support_x), _ids(ep.query_x)
        all_ids = torch.cat([support, query]).tolist()
        assert len(set(all_ids)) == len(all_ids), "an image appears twice in one episode"
        assert torch.equal(support // 100, ep.classes[ep.support_y])
        assert torch.equal(query // 100, ep.classes[ep.query_y])


def test_same_seed_same_episodes_different_seed_differs() -> None:
    images = _id_images(classes=20, per_class=10)
    a, b = EpisodeSampler(images, 5, 1, 5, seed=3), EpisodeSampler(images, 5, 1, 5, seed=3)
    c = EpisodeSampler(images, 5, 1, 5, seed=4)
    for _ in range(5):
        ea, eb = a.next_episode(), b.next_episode()
        assert torch.equal(ea.support_x, eb.support_x) and torch.equal(ea.query_x, eb.query_x)
        assert torch.equal(ea.classes, eb.classes)
    differs = [not torch.equal(a.episode(i).query_x, c.episode(i).query_x) for i in range(5)]
    assert all(differs)


def test_episode_index_is_independent_of_history_and_batch_size() -> None:
    images = _id_images(classes=8, per_class=6)
    s1 = EpisodeSampler(images, 4, 2, 2, seed=9)
    s2 = EpisodeSampler(images, 4, 2, 2, seed=9)
    stream = [s1.next_episode() for _ in range(6)]
    batch = s2.sample(4)
    batch2 = s2.sample(2)
    for i in range(4):
        assert torch.equal(batch.support_x[i], stream[i].support_x)
        assert torch.equal(batch.classes[i], stream[i].classes)
    assert torch.equal(batch2.query_x[1], stream[5].query_x)
    # Fixed evaluation set: episode(i) on a fresh sampler is the same.
    fresh = EpisodeSampler(images, 4, 2, 2, seed=9)
    assert torch.equal(fresh.episode(3).query_x, stream[3].query_x)
    # Resuming from a saved position continues the stream.
    fresh.position = 4
    assert torch.equal(fresh.next_episode().support_x, stream[4].support_x)


def test_label_to_class_mapping_is_random_per_episode() -> None:
    images = _id_images(classes=5, per_class=4)
    sampler = EpisodeSampler(images, ways=5, shots=1, queries=1, seed=0)
    mappings = {tuple(sampler.episode(i).classes.tolist()) for i in range(30)}
    # With all 5 classes in every episode only the label permutation varies.
    assert len(mappings) > 10


def test_list_input_with_unequal_class_sizes() -> None:
    classes = [np.full((n, 1, 2, 2), 10 * c, dtype=np.uint8) for c, n in enumerate([5, 7, 6, 9])]
    sampler = EpisodeSampler(classes, ways=3, shots=2, queries=3, seed=0)
    ep = sampler.episode(0)
    assert ep.support_x.shape == (6, 1, 2, 2)
    assert torch.allclose(ep.support_x[:, 0, 0, 0] * 255, (10 * ep.classes[ep.support_y]).float())
    with pytest.raises(ValueError, match=r"= 6 exceeds the 5 images per class available \(class 0\)"):
        EpisodeSampler(classes, ways=3, shots=3, queries=3)


def test_too_many_ways_or_images_gives_a_clear_error() -> None:
    images = np.zeros((5, 20, 1, 2, 2), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"ways=6 exceeds the number of classes \(5\)"):
        EpisodeSampler(images, ways=6, shots=1, queries=1)
    with pytest.raises(ValueError, match=r"shots \+ queries = 5 \+ 16 = 21 exceeds the 20 images per class"):
        EpisodeSampler(images, ways=5, shots=5, queries=16)
    with pytest.raises(ValueError, match="shots must be an integer >= 1"):
        EpisodeSampler(images, ways=2, shots=0, queries=1)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        EpisodeSampler(images, ways=2, shots=1, queries=1, seed=-1)
    dataset = ClassDataset(images=images, class_names=[str(i) for i in range(5)], name="toy", split="train")
    with pytest.raises(ValueError, match="exceeds the 20 images per class"):
        dataset.sampler(ways=2, shots=10, queries=11)


def test_class_dataset_normalisation() -> None:
    images = np.full((2, 3, 3, 2, 2), 255, dtype=np.uint8)
    ds = ClassDataset(images, ["a", "b"], "toy", "train", mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    ep = ds.sampler(ways=2, shots=1, queries=1).episode(0)
    assert torch.allclose(ep.support_x[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        ClassDataset(np.zeros((3, 2, 1, 2, 2), np.uint8), ["a", "b"], "toy", "train")


@settings(max_examples=40, deadline=None)
@given(
    classes=st.integers(1, 8),
    per_class=st.integers(2, 8),
    ways=st.integers(1, 8),
    shots=st.integers(1, 4),
    queries=st.integers(0, 4),
    seed=st.integers(0, 2**32),
    index=st.integers(0, 10**6),
)
def test_episode_invariants_property(classes: int, per_class: int, ways: int, shots: int, queries: int, seed: int, index: int) -> None:
    images = _id_images(classes, per_class, side=1)
    if ways > classes or shots + queries > per_class:
        with pytest.raises(ValueError):
            EpisodeSampler(images, ways, shots, queries, seed)
        return
    ep = EpisodeSampler(images, ways, shots, queries, seed).episode(index)
    assert ep.support_x.shape[0] == ways * shots and ep.query_x.shape[0] == ways * queries
    ids = torch.cat([_ids(ep.support_x), _ids(ep.query_x)])
    assert len(set(ids.tolist())) == ids.numel()
    assert torch.equal(_ids(ep.support_x) // 100, ep.classes[ep.support_y])
