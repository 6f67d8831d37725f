"""Which layers each pipeline stage runs: contiguous runs of layers, cut so that the slowest
stage is as fast as it can be, within each device's memory.

A layer's cost is its multiply-adds per sample (a Dense layer ``in x out``, an elementwise
layer its width); a stage's time is the sum of its layers' costs over the device's measured
speed. Its memory is its parameters, their gradients and an optimizer's two arrays, plus
the activations it keeps for a micro-batch. :func:`partition_layers` finds the cut that
minimises the largest stage time, by dynamic programming over (stage, first layer): exact,
and the same on every member given the same measured numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from ..train.nn import Dense, Sequential

__all__ = ["Partition", "layer_costs", "layer_memory", "partition_layers"]

PARAM_COPIES = 4  # parameters, gradients, and up to two optimizer arrays (Adam)


@dataclass(frozen=True)
class Partition:
    """Stage s runs layers ``bounds[s]`` to ``bounds[s + 1]`` (exclusive).

    Attributes:
        bounds: layer indexes, ``stages + 1`` of them, from 0 to the number of layers.
        times: each stage's estimated seconds per sample (cost / speed).
    """

    bounds: tuple[int, ...]
    times: tuple[float, ...]

    @property
    def stages(self) -> int:
        """Number of stages."""
        return len(self.bounds) - 1

    def layers(self, stage: int) -> range:
        """The layer indexes of ``stage``."""
        return range(self.bounds[stage], self.bounds[stage + 1])


def _widths(model: Sequential) -> list[int]:
    """The output width of each layer (elementwise layers keep their input's)."""
    widths, width = [], 0
    for layer in model.layers:
        if isinstance(layer, Dense):
            width = layer.out_features
        widths.append(width)
    return widths


def layer_costs(model: Sequential) -> list[float]:
    """Multiply-adds per sample of each layer (forward; backward costs about twice that)."""
    widths = _widths(model)
    return [float(layer.in_features * layer.out_features) if isinstance(layer, Dense)
            else float(widths[index]) for index, layer in enumerate(model.layers)]


def layer_memory(model: Sequential, rows: int) -> list[float]:
    """Bytes each layer needs on a stage: ``PARAM_COPIES`` x its parameters, plus its
    output for ``rows`` samples (kept for backward)."""
    itemsize = model.dtype.itemsize
    widths = _widths(model)
    return [float(PARAM_COPIES * itemsize * sum(math.prod(s) for _, s in layer.parameter_shapes())
                  + rows * widths[index] * itemsize)
            for index, layer in enumerate(model.layers)]


def partition_layers(costs: Sequence[float], memory: Sequence[float],
                     speeds: Sequence[float], capacities: Sequence[float]) -> Partition:
    """Cut the layers into ``len(speeds)`` non-empty contiguous stages, stage s on a device
    of speed ``speeds[s]`` (cost units per second) and memory ``capacities[s]`` bytes,
    minimising the slowest stage's time.

    Raises:
        ConfigError: fewer layers than stages, a speed that is not positive, or no cut that
            fits every device's memory (the message says how much the stages needed).
    """
    layers, stages = len(costs), len(speeds)
    if len(memory) != layers or len(capacities) != stages:
        raise ConfigError("partition_layers: one memory per layer and one capacity per stage")
    if not 1 <= stages <= layers:
        raise ConfigError(f"cannot split {layers} layers over {stages} stages: each stage "
                          f"needs at least one layer")
    if not all(s > 0 and math.isfinite(s) for s in speeds):
        raise ConfigError(f"device speeds must be positive, got {list(speeds)}")
    cost_prefix = [0.0]
    memory_prefix = [0.0]
    for cost, need in zip(costs, memory, strict=True):
        cost_prefix.append(cost_prefix[-1] + cost)
        memory_prefix.append(memory_prefix[-1] + need)
    inf = math.inf
    # best[s][i]: the least possible slowest-stage time with layers i.. on stages s..
    best = [[inf] * (layers + 1) for _ in range(stages + 1)]
    cut = [[-1] * (layers + 1) for _ in range(stages + 1)]
    best[stages][layers] = 0.0
    for s in range(stages - 1, -1, -1):
        for i in range(layers - (stages - s), s - 1, -1):
            for j in range(i + 1, layers - (stages - s - 1) + 1):  # stage s runs i..j-1
                if memory_prefix[j] - memory_prefix[i] > capacities[s]:
                    break
                time = max((cost_prefix[j] - cost_prefix[i]) / speeds[s], best[s + 1][j])
                if time < best[s][i]:
                    best[s][i], cut[s][i] = time, j
    if best[0][0] == inf:
        raise ConfigError(f"no split of {layers} layers ({memory_prefix[-1] / 1e6:.1f} MB in "
                          f"all) fits the stages' memory {[round(c / 1e6, 1) for c in capacities]}"
                          f" MB")
    bounds, at = [0], 0
    for s in range(stages):
        at = cut[s][at]
        bounds.append(at)
    times = tuple((cost_prefix[b] - cost_prefix[a]) / speeds[s]
                  for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)))
    return Partition(tuple(bounds), times)
