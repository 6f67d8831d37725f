"""Cutting a model's layers over pipeline stages by speed and memory: pure."""

from __future__ import annotations

import itertools

import pytest

from ringtrain.errors import ConfigError
from ringtrain.pipeline import layer_costs, layer_memory, partition_layers
from ringtrain.train.nn import Dense, ReLU, Sequential


def brute_force(costs, memory, speeds, capacities):
    """The least slowest-stage time over every cut (the oracle)."""
    best = None
    layers, stages = len(costs), len(speeds)
    for cuts in itertools.combinations(range(1, layers), stages - 1):
        bounds = (0, *cuts, layers)
        spans = list(zip(bounds[:-1], bounds[1:], strict=True))
        if any(sum(memory[a:b]) > capacities[s] for s, (a, b) in enumerate(spans)):
            continue
        time = max(sum(costs[a:b]) / speeds[s] for s, (a, b) in enumerate(spans))
        best = time if best is None else min(best, time)
    return best


@pytest.mark.parametrize("seed", range(30))
def test_the_cut_is_optimal_against_brute_force(seed):
    import random
    rng = random.Random(seed)
    layers = rng.randint(2, 8)
    stages = rng.randint(1, layers)
    costs = [rng.uniform(1, 100) for _ in range(layers)]
    memory = [rng.uniform(1, 10) for _ in range(layers)]
    speeds = [rng.uniform(0.5, 4) for _ in range(stages)]
    capacities = [rng.uniform(5, 40) for _ in range(stages)]
    expected = brute_force(costs, memory, speeds, capacities)
    if expected is None:
        with pytest.raises(ConfigError, match="fits"):
            partition_layers(costs, memory, speeds, capacities)
        return
    cut = partition_layers(costs, memory, speeds, capacities)
    assert cut.stages == stages and cut.bounds[0] == 0 and cut.bounds[-1] == layers
    assert all(a < b for a, b in zip(cut.bounds[:-1], cut.bounds[1:], strict=True))
    assert max(cut.times) == pytest.approx(expected)


def test_a_slower_device_gets_fewer_layers_and_a_small_memory_caps_its_share():
    costs, memory = [10.0] * 8, [1.0] * 8
    even = partition_layers(costs, memory, [1, 1], [100, 100])
    assert even.bounds == (0, 4, 8)
    slow_second = partition_layers(costs, memory, [2, 1], [100, 100])
    assert slow_second.bounds[1] > 4  # the fast first device takes more layers
    small_first = partition_layers(costs, memory, [2, 1], [2, 100])
    assert small_first.bounds[1] == 2  # it would take more, but only 2 layers fit


def test_costs_and_memory_of_a_model():
    model = Sequential(Dense(4, 3), ReLU(), Dense(3, 2), seed=0)
    assert layer_costs(model) == [12.0, 3.0, 6.0]
    memory = layer_memory(model, rows=10)
    assert memory == [4 * 4 * 15 + 10 * 3 * 4, 10 * 3 * 4, 4 * 4 * 8 + 10 * 2 * 4]


def test_more_stages_than_layers_is_refused():
    with pytest.raises(ConfigError, match="at least one layer"):
        partition_layers([1.0], [1.0], [1, 1], [9, 9])
