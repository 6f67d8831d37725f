"""The speed policy of synchronous training: cut each global batch by measured member speed.

Speed-adaptive batches (``Trainer(adaptive=True)``, the default). Each member times its own
forward and backward pass and keeps a smoothed throughput (samples per second, an
exponentially weighted moving average with weight ``SPEED_SMOOTHING`` on the newest step).
Every ``share_every`` steps the members all-gather their throughputs (8 bytes each) and from
then on cut the global batch in proportion to them (:func:`.sharding.split_proportional`),
every member getting at least one sample so its speed stays measured. A member twice as fast
then gets about twice the samples, and fast members stop idling behind slow ones at every
step. The gradient weights are the sample counts, so the result is the same big-batch gradient
whatever the split (up to float rounding). Switch it off with ``adaptive=False`` to cut every
batch evenly (bit-reproducible runs: the split, and with it the rounding, then never depends
on timing).
"""

from __future__ import annotations

import logging

import numpy as np

from ..node.node import Node
from .sharding import split_proportional

__all__ = ["SPEED_SMOOTHING", "SpeedPolicy"]

log = logging.getLogger(__name__)

SPEED_SMOOTHING = 0.3  # weight of the newest step in the throughput average: adapts in ~3 shares


class SpeedPolicy:
    """This member's measured throughput and the batch split the members agreed on.

    Args:
        adaptive: cut batches by speed (False: evenly).
        share_every: steps between throughput exchanges.
    """

    def __init__(self, adaptive: bool, share_every: int):
        self.adaptive = adaptive
        self.share_every = share_every
        self.throughput = 0.0
        """This node's smoothed compute throughput, samples per second (0: not measured)."""
        self.speeds: list[float] | None = None
        """Every member's throughput from the last exchange, in rank order (None: even)."""

    def record(self, samples: int, seconds: float) -> None:
        """Fold one step's compute time into the smoothed throughput."""
        if samples and seconds > 0:
            rate = samples / seconds
            self.throughput = rate if self.throughput == 0 else \
                SPEED_SMOOTHING * rate + (1 - SPEED_SMOOTHING) * self.throughput

    def share_due(self, step: int) -> bool:
        """Whether the members exchange throughputs after global step ``step``."""
        return self.adaptive and step % self.share_every == 0

    def share(self, node: Node, timeout: float | None) -> None:
        """All-gather the members' throughputs (a collective); keep them if all are usable."""
        speeds = node.all_gather(np.array([self.throughput]), timeout=timeout)[:, 0]
        if (speeds > 0).all() and np.isfinite(speeds).all():
            self.speeds = [float(s) for s in speeds]
            log.debug("member throughputs %s samples/s", [round(s) for s in self.speeds])

    def forget(self) -> None:
        """The members changed: cut evenly until the next exchange."""
        self.speeds = None

    def batch_sizes(self, total: int, world_size: int) -> list[int]:
        """Every member's share of a global batch of ``total`` samples, in rank order."""
        if self.speeds is None or len(self.speeds) != world_size:
            return split_proportional(total, [1] * world_size)
        # one sample each first, so a slow member keeps being measured
        return [1 + size for size in split_proportional(total - world_size, self.speeds)]
