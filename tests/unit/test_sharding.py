"""ringtrain.train.sharding: permutations, exact proportional splits, no drop and no repeat."""

from __future__ import annotations

import hashlib
from fractions import Fraction

import numpy as np
import pytest

from ringtrain.errors import ConfigError
from ringtrain.train.sharding import (
    DataPosition,
    Sampler,
    epoch_permutation,
    epoch_shards,
    split_proportional,
)


def test_epoch_permutation_is_a_deterministic_permutation():
    perm = epoch_permutation(1000, seed=3, epoch=2)
    assert perm.dtype == np.int64
    assert sorted(perm.tolist()) == list(range(1000))
    np.testing.assert_array_equal(perm, epoch_permutation(1000, seed=3, epoch=2))
    assert not np.array_equal(perm, epoch_permutation(1000, seed=3, epoch=3))
    assert not np.array_equal(perm, epoch_permutation(1000, seed=4, epoch=2))
    assert epoch_permutation(0, seed=0, epoch=0).size == 0


def test_epoch_permutation_is_pinned_across_machines():
    # If this changes, members on different numpy versions would read different shards.
    assert epoch_permutation(20, seed=0, epoch=0).tolist() == [
        4, 19, 6, 2, 13, 16, 3, 11, 10, 8, 0, 12, 7, 5, 18, 17, 14, 9, 1, 15]
    digest = hashlib.sha256(epoch_permutation(10_000, seed=7, epoch=1).tobytes()).hexdigest()
    assert digest == "690f84be4483cb8f0b46792a296d7d2aca7274f30ce513856087b98222eca735"


@pytest.mark.parametrize("total, weights, expected", [
    (10, [1, 1, 1], [4, 3, 3]),
    (7, [0.5, 0.25, 0.25], [3, 2, 2]),
    (5, [1, 0, 1], [3, 0, 2]),
    (0, [2, 3], [0, 0]),
    (100, [1], [100]),
    (3, [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]),
    (10, [0.1, 0.2, 0.7], [1, 2, 7]),  # exact rationals: 0.1+0.2 != 0.3 cannot bite
])
def test_split_proportional_examples(total, weights, expected):
    assert split_proportional(total, weights) == expected


def test_split_proportional_sums_exactly_and_stays_within_one_of_each_share():
    rng = np.random.default_rng(0)
    for _ in range(500):
        members = int(rng.integers(1, 12))
        weights = rng.uniform(0, 5, size=members)
        weights[rng.random(members) < 0.2] = 0.0
        if weights.sum() == 0:
            weights[0] = 1.0
        total = int(rng.integers(0, 5000))
        parts = split_proportional(total, list(weights))
        assert sum(parts) == total
        weight_sum = sum(Fraction(float(w)) for w in weights)
        for part, weight in zip(parts, weights, strict=True):
            share = total * Fraction(float(weight)) / weight_sum
            assert share - 1 < part < share + 1
            assert weight > 0 or part == 0


@pytest.mark.parametrize("total, weights", [
    (-1, [1]), (3, []), (3, [0, 0]), (3, [1, -1]), (3, [float("inf")]),
    (3, [float("nan")]), (2.5, [1]), (3, ["1"]),
])
def test_split_proportional_refuses_bad_input(total, weights):
    with pytest.raises(ConfigError):
        split_proportional(total, weights)


@pytest.mark.parametrize("num_samples", [0, 1, 5, 97, 1000])
@pytest.mark.parametrize("num_members", [1, 2, 3, 7, 10])
def test_epoch_shards_are_disjoint_and_cover_every_sample_once(num_samples, num_members):
    rng = np.random.default_rng(num_samples * 31 + num_members)
    members = [f"node-{i}" for i in range(num_members)]
    for weights in (None, list(rng.uniform(0.1, 4.0, size=num_members))):
        shards = epoch_shards(num_samples, seed=1, epoch=5, members=members, weights=weights)
        assert list(shards) == members
        joined = np.concatenate(list(shards.values()))
        # Contiguous slices of the epoch's permutation, in member order.
        np.testing.assert_array_equal(joined, epoch_permutation(num_samples, 1, 5))
        expected_sizes = split_proportional(num_samples, weights or [1] * num_members)
        assert [len(shard) for shard in shards.values()] == expected_sizes


def test_epoch_shards_follow_the_weights():
    shards = epoch_shards(1000, seed=0, epoch=0, members=["fast", "slow"], weights=[3, 1])
    assert len(shards["fast"]) == 750 and len(shards["slow"]) == 250


def test_epoch_shards_refuse_bad_members():
    with pytest.raises(ConfigError):
        epoch_shards(10, 0, 0, members=[])
    with pytest.raises(ConfigError):
        epoch_shards(10, 0, 0, members=["a", "a"])
    with pytest.raises(ConfigError):
        epoch_shards(10, 0, 0, members=["a", "b"], weights=[1])


def test_sampler_serves_consecutive_slices_and_a_short_last_step():
    sampler = Sampler(25, seed=2)
    perm = sampler.permutation(0)
    at = DataPosition()
    served = []
    sizes_seen = []
    while at.epoch == 0:
        batches, at = sampler.next_batches(at, [4, 4, 2])
        sizes_seen.append([len(b) for b in batches])
        served.extend(batches)
    assert sizes_seen == [[4, 4, 2], [4, 4, 2], [2, 2, 1]]
    np.testing.assert_array_equal(np.concatenate(served), perm)
    assert at == DataPosition(epoch=1, position=0)
    next_batches, _ = sampler.next_batches(at, [1])
    assert next_batches[0][0] == epoch_permutation(25, 2, 1)[0]


def test_resharding_mid_epoch_drops_and_repeats_nothing():
    """Members come and go mid-epoch; the global position keeps every sample exactly once."""
    sampler = Sampler(1000, seed=9)
    rng = np.random.default_rng(1)
    at = DataPosition(epoch=3, position=0)
    served = []
    while at.epoch == 3:
        members = int(rng.integers(1, 6))  # the ring changes size every step
        sizes = [int(s) for s in rng.integers(0, 40, size=members)]
        if sum(sizes) == 0:
            sizes[0] = 1
        batches, after = sampler.next_batches(at, sizes)
        end = after.position if after.epoch == 3 else 1000
        assert sum(len(b) for b in batches) == end - at.position
        served.extend(batches)
        at = after
    joined = np.concatenate(served)
    assert len(joined) == 1000 and len(set(joined.tolist())) == 1000
    np.testing.assert_array_equal(joined, epoch_permutation(1000, 9, 3))


def test_resume_needs_only_seed_epoch_and_position():
    original = Sampler(300, seed=5)
    at = DataPosition()
    for _ in range(7):
        _, at = original.next_batches(at, [16, 16, 8])
    expected, expected_after = original.next_batches(at, [16, 16, 8])

    restored = Sampler(300, seed=5)
    batches, after = restored.next_batches(DataPosition(at.epoch, at.position), [16, 16, 8])
    assert after == expected_after
    for got, want in zip(batches, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_global_batch_split_by_member_speed_feeds_the_sampler():
    sizes = split_proportional(64, [2.0, 1.0, 1.0])
    assert sizes == [32, 16, 16]
    batches, at = Sampler(100, seed=0).next_batches(DataPosition(), sizes)
    assert [len(b) for b in batches] == sizes and at.position == 64


def test_sampler_refuses_bad_input():
    with pytest.raises(ConfigError):
        Sampler(0, seed=0)
    with pytest.raises(ConfigError):
        Sampler(10, seed=-1)
    sampler = Sampler(10, seed=0)
    with pytest.raises(ConfigError):
        sampler.next_batches(DataPosition(0, 10), [1])
    with pytest.raises(ConfigError):
        sampler.next_batches(DataPosition(), [])
    with pytest.raises(ConfigError):
        sampler.next_batches(DataPosition(), [0, 0])
    with pytest.raises(ConfigError):
        sampler.next_batches(DataPosition(), [2, -1])
    with pytest.raises(ConfigError):
        DataPosition(epoch=-1)
