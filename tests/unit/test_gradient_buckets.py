"""train.gradient_buckets: where a gradient is cut to travel while backward still runs."""

from __future__ import annotations

import pytest

from ringtrain.train.trainer import gradient_buckets


@pytest.mark.parametrize("starts,size,least,expected", [
    ([0, 100, 300], 310, 50, [(100, 310)]),  # the tiny last layer joins the one before it
    ([0, 100, 300], 310, 5, [(300, 310), (100, 300)]),
    ([0, 100, 300], 310, 400, []),  # nothing big enough: all of it after backward
    ([0], 1000, 1, []),  # the first layer always goes last, with the control values
    ([0, 10, 20, 30, 40], 50, 20, [(30, 50), (10, 30)]),
])
def test_buckets_are_whole_layers_from_the_end_the_first_layer_left_for_last(
        starts, size, least, expected):
    buckets = gradient_buckets(starts, size, least)
    assert buckets == expected
    for (lo, _), (_, next_hi) in zip(buckets[:-1], buckets[1:], strict=True):
        assert next_hi == lo  # contiguous, from the end backwards
    assert all(hi - lo >= least for lo, hi in buckets)
