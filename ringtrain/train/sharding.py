"""Which samples each member trains on: deterministic shards of a per-epoch permutation.

Every epoch has one permutation of the sample indices, drawn from (seed, epoch) and the same
on every machine. Members read it front to back as one shared stream:

* :func:`epoch_shards` cuts a whole epoch into one contiguous shard per member, sized in
  proportion to the members' weights.
* :meth:`Sampler.next_batches` serves one step: member ``i`` gets the next ``b_i`` indices
  of the stream after member ``i-1``'s. The position in the stream is global, not per member,
  so when the members change mid-epoch the new ring carries on from the same position and no
  sample of the epoch is dropped or repeated.

A resumed run needs only (seed, epoch, position): see :class:`DataPosition`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ringtrain.errors import ConfigError

__all__ = [
    "DataPosition",
    "Sampler",
    "epoch_permutation",
    "epoch_shards",
    "split_proportional",
]


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Return the epoch's permutation of ``range(num_samples)`` as int64.

    Drawn from ``np.random.default_rng([seed, epoch])``, whose bits are the same on every
    platform and numpy release that keeps the PCG64 stream.

    Raises:
        ConfigError: any argument is not a non-negative integer.
    """
    _check_count("num_samples", num_samples)
    _check_count("seed", seed)
    _check_count("epoch", epoch)
    rng = np.random.default_rng([int(seed), int(epoch)])
    return rng.permutation(int(num_samples)).astype(np.int64, copy=False)


def split_proportional(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` into integer parts proportional to ``weights`` that sum exactly.

    Largest remainder method: each part gets the floor of its exact share, and the units
    left over go to the largest fractional remainders, ties to the lower index. Shares are
    computed in exact rational arithmetic, so every machine gets the same parts.

    Args:
        total: the non-negative integer to split (a global batch, an epoch's samples).
        weights: one finite non-negative weight per part, not all zero.

    Returns:
        one non-negative integer per weight, summing to ``total``.

    Raises:
        ConfigError: total is negative, weights are empty, negative, not finite or all zero.
    """
    _check_count("total", total)
    exact_weights = _exact_weights(weights)
    weight_sum = sum(exact_weights)
    shares = [Fraction(int(total)) * w / weight_sum for w in exact_weights]
    parts = [int(share) for share in shares]  # floor: shares are non-negative
    leftover = int(total) - sum(parts)
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(shares[i] - parts[i]), i))
    for index in by_remainder[:leftover]:
        parts[index] += 1
    return parts


def epoch_shards(num_samples: int, seed: int, epoch: int, members: Sequence[str],
                 weights: Sequence[float] | None = None) -> dict[str, np.ndarray]:
    """Cut the epoch's permutation into one contiguous shard per member.

    The shards are disjoint and together hold every index exactly once. Shard sizes follow
    :func:`split_proportional` of ``num_samples`` by ``weights`` (equal when omitted), in
    the order of ``members``.

    Args:
        num_samples: size of the data set.
        seed: the run's data seed.
        epoch: the training epoch.
        members: member ids in ring order, each once.
        weights: relative speed or batch share of each member; equal if None.

    Returns:
        member id -> int64 indices into the data set.

    Raises:
        ConfigError: no members, a repeated member, or weights that do not fit.
    """
    if not members:
        raise ConfigError("epoch_shards needs at least one member")
    if len(set(members)) != len(members):
        raise ConfigError(f"members must be distinct, got {list(members)}")
    if weights is None:
        weights = [1] * len(members)
    if len(weights) != len(members):
        raise ConfigError(f"{len(weights)} weights for {len(members)} members")
    permutation = epoch_permutation(num_samples, seed, epoch)
    sizes = split_proportional(num_samples, weights)
    bounds = np.cumsum([0, *sizes])
    return {member: permutation[bounds[i]:bounds[i + 1]] for i, member in enumerate(members)}


@dataclass(frozen=True)
class DataPosition:
    """Where the sample stream stands; with the seed, all a resumed run needs.

    Attributes:
        epoch: the training epoch.
        position: samples of this epoch's permutation already consumed, in
            [0, num_samples). An epoch's last step moves the position to (epoch + 1, 0).
    """

    epoch: int = 0
    position: int = 0

    def __post_init__(self) -> None:
        _check_count("epoch", self.epoch)
        _check_count("position", self.position)


class Sampler:
    """Serves each step's per-member batches from the shared per-epoch stream.

    Args:
        num_samples: size of the data set (> 0).
        seed: the run's data seed (>= 0).

    Raises:
        ConfigError: a bad size or seed.
    """

    def __init__(self, num_samples: int, seed: int):
        _check_count("num_samples", num_samples)
        if num_samples == 0:
            raise ConfigError("a Sampler needs at least one sample")
        _check_count("seed", seed)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self._cached_epoch = -1
        self._cached_permutation = np.empty(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        """Return the epoch's permutation (cached for the most recent epoch; do not modify)."""
        if epoch != self._cached_epoch:
            self._cached_permutation = epoch_permutation(self.num_samples, self.seed, epoch)
            self._cached_permutation.setflags(write=False)
            self._cached_epoch = epoch
        return self._cached_permutation

    def next_batches(self, at: DataPosition, batch_sizes: Sequence[int]
                     ) -> tuple[list[np.ndarray], DataPosition]:
        """Return each member's indices for one step, and the position after it.

        Member ``i`` gets the ``batch_sizes[i]`` indices of the permutation that follow
        member ``i-1``'s. A step never crosses an epoch boundary: when fewer samples remain
        than the batch sizes add up to, the remainder is split in proportion to the batch
        sizes (:func:`split_proportional`), so the epoch's last step is short and some member
        may get none. Weight gradients by the returned sizes.

        Args:
            at: the position before the step.
            batch_sizes: per-member batch sizes in ring order; non-negative, not all zero.

        Returns:
            (one int64 index array per member, the position after the step).

        Raises:
            ConfigError: bad batch sizes, or a position past the end of the epoch.
        """
        if at.position >= self.num_samples:
            raise ConfigError(
                f"position {at.position} is past the end of epoch {at.epoch} "
                f"({self.num_samples} samples)"
            )
        if not batch_sizes:
            raise ConfigError("next_batches needs at least one member's batch size")
        for size in batch_sizes:
            _check_count("batch size", size)
        remaining = self.num_samples - at.position
        sizes = [int(size) for size in batch_sizes]
        if sum(sizes) == 0:
            raise ConfigError("batch sizes are all zero")
        if sum(sizes) > remaining:
            sizes = split_proportional(remaining, sizes)
        permutation = self.permutation(at.epoch)
        bounds = at.position + np.cumsum([0, *sizes])
        batches = [permutation[bounds[i]:bounds[i + 1]] for i in range(len(sizes))]
        end = int(bounds[-1])
        after = (DataPosition(at.epoch + 1, 0) if end == self.num_samples
                 else DataPosition(at.epoch, end))
        return batches, after


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")


def _exact_weights(weights: Sequence[float]) -> list[Fraction]:
    if len(weights) == 0:
        raise ConfigError("weights must not be empty")
    exact = []
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, (int, float, np.integer,
                                                               np.floating)):
            raise ConfigError(f"weights must be numbers, got {weight!r}")
        if not np.isfinite(weight) or weight < 0:
            raise ConfigError(f"weights must be finite and non-negative, got {list(weights)}")
        exact.append(Fraction(weight.item() if isinstance(weight, np.generic) else weight))
    if sum(exact) == 0:
        raise ConfigError(f"weights must not all be zero, got {list(weights)}")
    return exact
