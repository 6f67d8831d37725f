"""Environment statistics that every node holds alike: running moments and episode windows.

Pure data and arithmetic (numpy only). The learner combines what every node saw in a round
with :func:`combine_all` in rank order after one all-gather, so every node ends with the
very same bits, and the result is the statistics of all nodes' samples pooled (the
parallel-variance formula of Chan, Golub and LeVeque), never an average of averages.

* :class:`Moments`: count, mean and sum of squared deviations (``m2``) of a stream of
  vectors, in float64.
* :class:`RunningNormalizer`: observation normalisation by running mean and variance.
* :class:`ReturnScaler`: reward scaling by the running standard deviation of the discounted
  return, as Gymnasium's ``NormalizeReward`` does for one process.
* :class:`EpisodeWindow`: the returns and lengths of the last ``size`` episodes of the
  whole ring, and the totals.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

EPSILON = 1e-8  # added to variances before dividing by their square root


@dataclass(frozen=True)
class Moments:
    """Count, mean and sum of squared deviations from the mean of some vectors (float64).

    ``variance`` is the population variance ``m2 / count``.
    """

    count: float
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, shape: tuple[int, ...]) -> Moments:
        """No samples yet."""
        return cls(0.0, np.zeros(shape), np.zeros(shape))

    @classmethod
    def of(cls, samples: np.ndarray) -> Moments:
        """The moments of ``samples`` (first axis: the samples)."""
        samples = np.asarray(samples, dtype=np.float64)
        if len(samples) == 0:
            return cls.empty(samples.shape[1:])
        mean = samples.mean(axis=0)
        return cls(float(len(samples)), mean, ((samples - mean) ** 2).sum(axis=0))

    @property
    def variance(self) -> np.ndarray:
        """Population variance (zeros with no samples)."""
        return self.m2 / self.count if self.count > 0 else np.zeros_like(self.m2)

    def combine(self, other: Moments) -> Moments:
        """The moments of both sets of samples pooled (Chan et al.'s parallel update)."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / count)
        return Moments(count, mean, m2)

    def pack(self) -> np.ndarray:
        """``[count, mean..., m2...]`` as one float64 vector (see :meth:`unpack`)."""
        return np.concatenate([[self.count], self.mean.ravel(), self.m2.ravel()])

    @classmethod
    def unpack(cls, flat: np.ndarray, shape: tuple[int, ...]) -> Moments:
        """The inverse of :meth:`pack`.

        Raises:
            ConfigError: the vector has the wrong length or holds a negative or non-finite
                count (a peer sent nonsense).
        """
        size = int(np.prod(shape))
        flat = np.asarray(flat, dtype=np.float64)
        if flat.shape != (1 + 2 * size,):
            raise ConfigError(f"packed moments of shape {shape} need {1 + 2 * size} values, "
                              f"got {flat.shape}")
        count = float(flat[0])
        if not np.isfinite(flat).all() or count < 0 or (flat[1 + size:] < 0).any():
            raise ConfigError(f"packed moments hold a negative or non-finite value: count "
                              f"{count}")
        return cls(count, flat[1:1 + size].reshape(shape).copy(),
                   flat[1 + size:].reshape(shape).copy())


def combine_all(parts: Iterable[Moments], start: Moments) -> Moments:
    """``start`` combined with every part, in the order given (rank order: every node that
    combines the same parts in the same order gets the same bits)."""
    result = start
    for part in parts:
        result = result.combine(part)
    return result


class RunningNormalizer:
    """Normalises vectors by the running mean and variance of everything seen so far.

    Args:
        shape: the shape of one vector.
        clip: normalised values are clipped to [-clip, clip].
    """

    def __init__(self, shape: tuple[int, ...], clip: float = 10.0):
        self.shape = tuple(shape)
        self.clip = float(clip)
        self.moments = Moments.empty(self.shape)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """``(x - mean) / sqrt(var + eps)``, clipped, as float32 (identity until the first
        update)."""
        if self.moments.count == 0:
            return np.asarray(x, dtype=np.float32)
        scale = 1.0 / np.sqrt(self.moments.variance + EPSILON)
        out = (np.asarray(x, dtype=np.float64) - self.moments.mean) * scale
        return np.clip(out, -self.clip, self.clip).astype(np.float32)

    def update(self, parts: Sequence[Moments]) -> None:
        """Add the moments of new samples (every node's, in rank order)."""
        self.moments = combine_all(parts, self.moments)


class ReturnScaler:
    """Scales rewards by the running standard deviation of the discounted return.

    Each environment keeps its own discounted return ``g = gamma * g + r`` (reset when an
    episode ends); :meth:`observe` records them, and the moments of every recorded ``g`` of
    the whole ring (:meth:`update`) give the scale.

    Args:
        num_envs: environments on this node.
        gamma: the discount.
    """

    def __init__(self, num_envs: int, gamma: float):
        self.gamma = float(gamma)
        self.returns = np.zeros(num_envs)
        self.moments = Moments.empty(())
        self._seen: list[np.ndarray] = []

    def observe(self, rewards: np.ndarray, done: np.ndarray, valid: np.ndarray) -> None:
        """Record one vector step: ``rewards`` of the envs, which ended an episode, and which
        steps were real (not the reset step that follows an episode's end)."""
        self.returns = np.where(valid, self.returns * self.gamma + rewards, self.returns)
        self._seen.append(self.returns[valid].copy())
        self.returns[done & valid] = 0.0

    def take_moments(self) -> Moments:
        """The moments of the returns recorded since the last call (this node's part)."""
        seen = np.concatenate(self._seen) if self._seen else np.zeros(0)
        self._seen = []
        return Moments.of(seen)

    def update(self, parts: Sequence[Moments]) -> None:
        """Add every node's part, in rank order."""
        self.moments = combine_all(parts, self.moments)

    @property
    def scale(self) -> float:
        """What rewards are multiplied by: 1 / sqrt(var + eps) (1 until the first update)."""
        if self.moments.count == 0:
            return 1.0
        return float(1.0 / np.sqrt(self.moments.variance + EPSILON))


class EpisodeWindow:
    """The last ``size`` finished episodes of the whole ring, and the totals.

    Episodes are ordered by round, then by the rank of the node that ran them, then in the
    order they finished there: every node that adds the same rounds in the same way holds
    the same window.
    """

    def __init__(self, size: int = 100):
        if size < 1:
            raise ConfigError(f"an episode window needs size >= 1, got {size}")
        self.size = size
        self.returns: deque[float] = deque(maxlen=size)
        self.lengths: deque[float] = deque(maxlen=size)
        self.episodes = 0  # episodes finished on the ring, ever

    def add(self, returns: Sequence[float], lengths: Sequence[float], finished: int) -> None:
        """One node's episodes of a round: the returns and lengths of (up to ``size``) of the
        last it finished, and how many it finished in all."""
        self.returns.extend(returns)
        self.lengths.extend(lengths)
        self.episodes += int(finished)

    @property
    def full(self) -> bool:
        """Whether ``size`` episodes have finished."""
        return len(self.returns) == self.size

    @property
    def mean_return(self) -> float:
        """Mean return over the window (NaN when empty)."""
        return float(np.mean(self.returns)) if self.returns else float("nan")

    @property
    def mean_length(self) -> float:
        """Mean length over the window (NaN when empty)."""
        return float(np.mean(self.lengths)) if self.lengths else float("nan")

    def pack(self) -> np.ndarray:
        """``[episodes, filled, returns (size), lengths (size)]`` (float64, zero-padded)."""
        flat = np.zeros(2 + 2 * self.size)
        flat[0], flat[1] = self.episodes, len(self.returns)
        flat[2:2 + len(self.returns)] = list(self.returns)
        flat[2 + self.size:2 + self.size + len(self.lengths)] = list(self.lengths)
        return flat

    def load(self, flat: np.ndarray) -> None:
        """Replace the window by a packed one (see :meth:`pack`).

        Raises:
            ConfigError: it does not fit this window.
        """
        flat = np.asarray(flat, dtype=np.float64)
        filled = int(flat[1]) if flat.shape == (2 + 2 * self.size,) else -1
        if not 0 <= filled <= self.size or not np.isfinite(flat).all():
            raise ConfigError(f"a packed episode window of size {self.size} needs "
                              f"{2 + 2 * self.size} finite values with 0-{self.size} filled")
        self.episodes = int(flat[0])
        self.returns = deque(flat[2:2 + filled].tolist(), maxlen=self.size)
        self.lengths = deque(flat[2 + self.size:2 + self.size + filled].tolist(),
                             maxlen=self.size)
