"""PowerSGD (ringtrain.ring.powersgd) with the members simulated in one process: the three
stages with the sums a ring would compute in between."""

from __future__ import annotations

import numpy as np
import pytest

from ringtrain.errors import ConfigError
from ringtrain.ring.powersgd import PowerSGD, parse_powersgd

SHAPES = [(12, 9), (9,), (9, 5), (5,), (3, 1)]  # matrices, biases and a thin matrix


def _exchange(members: list[PowerSGD], gradients: list[np.ndarray]) -> list[np.ndarray]:
    """One step: every member's result after the two summed exchanges."""
    firsts = [np.empty(m.first_size, m.dtype) for m in members]
    for member, gradient, first in zip(members, gradients, firsts, strict=True):
        member.first(gradient, first)
    summed_first = np.sum(firsts, axis=0)
    seconds = [np.empty(m.second_size, m.dtype) for m in members]
    for member, second in zip(members, seconds, strict=True):
        member.second(summed_first, second)
    summed_second = np.sum(seconds, axis=0)
    results = []
    for member in members:
        out = np.empty(member.size, member.dtype)
        member.finish(summed_first, summed_second, out)
        results.append(out)
    return results


def _gradients(size: int, members: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(size) for _ in range(members)]


def test_matrices_whose_factors_are_not_smaller_travel_whole():
    members = [PowerSGD(SHAPES, rank=9, dtype=np.float64) for _ in range(3)]
    assert members[0].matrices == []  # factors would not be smaller: matrices travel whole
    gradients = _gradients(members[0].size, 3, seed=1)
    results = _exchange(members, gradients)
    for result in results:
        np.testing.assert_array_equal(result, results[0])
    np.testing.assert_allclose(results[0] / 3, np.mean(gradients, axis=0), rtol=0, atol=1e-12)


def test_full_rank_factors_reproduce_the_mean():
    shapes = [(40, 3), (3,), (60, 4), (4, 7)]  # rank min(rows, cols) of each: full
    members = [PowerSGD(shapes, rank=4, dtype=np.float64, only_smaller=False)
               for _ in range(4)]
    assert [(rows, cols, r) for _, rows, cols, r in members[0].matrices] == [(40, 3, 3),
                                                                            (60, 4, 4), (4, 7, 4)]
    gradients = _gradients(members[0].size, 4, seed=2)
    for step in range(3):  # warm start and error feedback carry nothing at full rank
        results = _exchange(members, gradients)
        np.testing.assert_array_equal(results[1], results[0])
        np.testing.assert_allclose(results[0] / 4, np.mean(gradients, axis=0), rtol=0,
                                   atol=1e-12, err_msg=f"step {step}")


def test_low_rank_loses_detail_but_error_feedback_delivers_it_over_steps():
    shapes = [(64, 32), (32,)]
    members = [PowerSGD(shapes, rank=2, dtype=np.float64) for _ in range(2)]
    assert members[0].wire_elements() == 32 + 2 * (64 + 32)
    gradients = _gradients(members[0].size, 2, seed=3)
    mean = np.mean(gradients, axis=0)
    delivered = np.zeros_like(mean)
    first_error = None
    for _ in range(60):
        result = _exchange(members, gradients)[0] / 2
        if first_error is None:
            first_error = np.abs(result - mean).max()
            np.testing.assert_array_equal(result[64 * 32:], mean[64 * 32:])  # bias exact
        delivered += result
    assert first_error > 0.1  # rank 2 of a random 64 x 32 matrix leaves much out ...
    assert np.abs(delivered / 60 - mean).max() < 0.3 * first_error  # ... feedback brings it


def test_bad_ranks_and_names_are_refused():
    assert parse_powersgd("powersgd") == 4 and parse_powersgd("powersgd:2") == 2
    assert parse_powersgd("int8") is None
    for bad in ("powersgd:0", "powersgd:x"):
        with pytest.raises(ConfigError):
            parse_powersgd(bad)
    with pytest.raises(ConfigError):
        PowerSGD(SHAPES, rank=0)
    member = PowerSGD(SHAPES, rank=2)
    with pytest.raises(ConfigError, match="expected"):
        member.first(np.zeros(3, np.float32), np.zeros(member.first_size, np.float32))
