"""Deterministic data order and per-sample seeded augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xrayfm.data.torch_dataset import CachedDataset
from xrayfm.data.transforms import build_transform
from xrayfm.errors import DataError
from xrayfm.train.sampler import EpochBatches, RawImage, SeededView, shard_batches


def _indices(batches) -> list[list[int]]:
    return [[i for i, _ in b] for b in batches]


def test_ranks_slices_make_up_the_single_process_batch():
    single = _indices(EpochBatches(50, 8, epoch=3, seed=7))
    ranks = [_indices(EpochBatches(50, 4, epoch=3, seed=7, rank=r, world_size=2)) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 50 // 8
    for b, batch in enumerate(single):
        assert ranks[0][b] + ranks[1][b] == batch
    used = [i for batch in single for i in batch]
    assert len(set(used)) == len(used)  # a permutation: no sample twice in an epoch


def test_order_depends_on_seed_and_epoch_only():
    a = _indices(EpochBatches(40, 5, epoch=0, seed=1))
    assert a == _indices(EpochBatches(40, 5, epoch=0, seed=1))
    assert a != _indices(EpochBatches(40, 5, epoch=1, seed=1))
    assert a != _indices(EpochBatches(40, 5, epoch=0, seed=2))
    keys = list(EpochBatches(40, 5, epoch=4, seed=1))[0]
    assert all(epoch == 4 for _, epoch in keys)


def test_start_batch_skips_without_changing_the_rest():
    full = _indices(EpochBatches(40, 5, epoch=2, seed=3))
    tail = EpochBatches(40, 5, epoch=2, seed=3, start_batch=3)
    assert len(tail) == len(full) - 3
    assert _indices(tail) == full[3:]


def test_weighted_draws_follow_the_weights_and_stay_deterministic_and_split_across_ranks():
    weights = np.where(np.arange(100) < 10, 0.5 / 10, 0.5 / 90)  # 10 images get half of the draws
    draws = np.array(_indices(EpochBatches(100, 10, epoch=0, seed=5, weights=weights))).ravel()
    assert len(draws) == 100 and len(set(draws.tolist())) < 100  # with replacement
    shares = [
        np.mean(np.array(_indices(EpochBatches(100, 10, epoch=e, seed=5, weights=weights))) < 10)
        for e in range(40)
    ]
    assert abs(np.mean(shares) - 0.5) < 0.05  # unweighted, the first 10 would get 0.1
    again = _indices(EpochBatches(100, 10, epoch=0, seed=5, weights=weights))
    assert again == _indices(EpochBatches(100, 10, epoch=0, seed=5, weights=weights))
    ranks = [
        _indices(EpochBatches(100, 5, epoch=0, seed=5, rank=r, world_size=2, weights=weights)) for r in (0, 1)
    ]
    assert [a + b for a, b in zip(*ranks, strict=True)] == again
    with pytest.raises(DataError, match="3 draw weights for 100 training images"):
        EpochBatches(100, 10, epoch=0, weights=np.ones(3))


def test_too_few_images_for_one_global_batch():
    with pytest.raises(DataError, match="cannot fill one global batch"):
        EpochBatches(7, 4, epoch=0, world_size=2)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_batches_cover_everything_in_order(world):
    shards = [shard_batches(11, 2, rank=r, world_size=world) for r in range(world)]
    flat = [i for shard in shards for batch in shard for i, _ in batch]
    assert flat == list(range(11))


def test_seeded_view_augmentation_is_a_function_of_seed_epoch_and_sample(chest_cache):
    base = CachedDataset(chest_cache, transform=RawImage())
    view = SeededView(base, build_transform(True, 32), seed=5, label_columns=[2, 1])
    torch.manual_seed(123)
    first = view[(3, 0)]["image"]
    state = torch.get_rng_state()
    torch.manual_seed(999)  # the global RNG does not matter...
    assert torch.equal(view[(3, 0)]["image"], first)
    assert not torch.equal(view[(3, 1)]["image"], first)  # ...but the epoch does
    assert not torch.equal(view[(4, 0)]["image"], view[(4, 1)]["image"])
    torch.set_rng_state(state)
    view[(3, 0)]
    assert torch.equal(torch.get_rng_state(), state)  # and drawing an item leaves the global RNG alone
    item = view[(3, 0)]
    assert item["labels"].tolist() == base[3]["labels"][[2, 1]].tolist()
    assert np.array_equal(view.labels, base.labels[:, [2, 1]], equal_nan=True)
