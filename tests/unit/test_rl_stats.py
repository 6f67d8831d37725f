"""The environment statistics the ring combines: pooled exactly, packed safely."""

from __future__ import annotations

import numpy as np
import pytest

from ringtrain.errors import ConfigError, ProtocolError
from ringtrain.rl.exchange import RoundShare
from ringtrain.rl.stats import EpisodeWindow, Moments, RunningNormalizer, combine_all


@pytest.mark.parametrize("sizes", [[5], [1, 1], [0, 7, 3], [100, 1, 0, 50], [3, 0, 0]])
def test_combined_moments_are_the_pooled_statistics(sizes):
    rng = np.random.default_rng(len(sizes))
    parts = [rng.normal(3.0, 2.0, (n, 4)) * rng.uniform(0.5, 5) for n in sizes]
    pooled = np.concatenate(parts)
    combined = combine_all([Moments.of(p) for p in parts], Moments.empty((4,)))
    assert combined.count == len(pooled)
    np.testing.assert_allclose(combined.mean, pooled.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(combined.variance, pooled.var(axis=0), rtol=1e-10)


def test_an_average_of_averages_would_differ():
    # the reason for the parallel-variance formula: unequal counts
    a, b = np.zeros((1, 1)), np.ones((9, 1))
    combined = Moments.of(a).combine(Moments.of(b))
    assert combined.mean[0] == pytest.approx(0.9)  # not 0.5
    assert combined.variance[0] == pytest.approx(np.concatenate([a, b]).var())


def test_moments_pack_round_trip_and_refuse_nonsense():
    m = Moments.of(np.arange(12.0).reshape(4, 3))
    back = Moments.unpack(m.pack(), (3,))
    assert back.count == m.count and np.array_equal(back.mean, m.mean)
    with pytest.raises(ConfigError):
        Moments.unpack(m.pack()[:-1], (3,))
    bad = m.pack()
    bad[0] = -1
    with pytest.raises(ConfigError):
        Moments.unpack(bad, (3,))


def test_normalizer_uses_the_running_statistics():
    norm = RunningNormalizer((2,), clip=5.0)
    x = np.array([[1.0, 10.0], [3.0, 30.0]])
    assert np.array_equal(norm.normalize(x), x.astype(np.float32))  # nothing seen yet
    norm.update([Moments.of(x)])
    np.testing.assert_allclose(norm.normalize(x), [[-1, -1], [1, 1]], atol=1e-6)


def test_episode_window_keeps_the_last_episodes_and_packs():
    window = EpisodeWindow(3)
    window.add([1.0, 2.0], [1, 2], 2)
    window.add([3.0, 4.0], [3, 4], 5)
    assert list(window.returns) == [2.0, 3.0, 4.0] and window.episodes == 7 and window.full
    other = EpisodeWindow(3)
    other.load(window.pack())
    assert list(other.returns) == [2.0, 3.0, 4.0] and list(other.lengths) == [2, 3, 4]
    assert other.episodes == 7 and other.mean_return == 3.0


def test_round_share_round_trip_keeps_the_last_episodes():
    share = RoundShare(True, 640, Moments.of(np.ones((5, 4))), Moments.of(np.ones(5)), 5,
                       (1.0, 2.0, 3.0, 4.0, 5.0), (1, 2, 3, 4, 5))
    row = share.pack(4, 3)
    back = RoundShare.unpack(row, 4, 3, "peer-a")
    assert back.reform and back.samples == 640 and back.finished == 5
    assert back.episode_returns == (3.0, 4.0, 5.0) and back.episode_lengths == (3, 4, 5)


@pytest.mark.parametrize("index, value", [(0, 0.5), (1, -3.0), (1, np.nan), (2, -1.0),
                                          (15, 99.0)])
def test_a_hostile_round_share_is_refused_naming_the_peer(index, value):
    row = RoundShare(False, 10, Moments.of(np.ones((2, 4))), Moments.of(np.ones(2)), 1,
                     (1.0,), (1,)).pack(4, 3)
    row[index] = value
    with pytest.raises(ProtocolError, match="peer-b"):
        RoundShare.unpack(row, 4, 3, "peer-b")
