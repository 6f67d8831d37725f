"""What nodes tell each other once per round, and the state a joiner or survivor adopts.

Pure packing (numpy): each node's round report is one float64 row (:class:`RoundShare`);
the learner all-reduces a (world_size, row) matrix in which each node filled only its own
row, so the sum *is* the all-gather (adding zeros is exact), and every node then combines
the rows in rank order. The learner's full state is one float64 vector too
(:func:`pack_state`), broadcast from the most advanced member after the ring re-forms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ProtocolError
from ..train.optim import Adam
from .ppo import ActorCritic
from .stats import EpisodeWindow, Moments, ReturnScaler, RunningNormalizer


@dataclass(frozen=True)
class RoundShare:
    """One node's part of a round: what it collected and whether it wants the ring to
    re-form (a joiner waits, or it is leaving)."""

    reform: bool
    samples: int
    obs: Moments
    returns: Moments
    finished: int  # episodes finished in the round
    episode_returns: tuple[float, ...]  # of the last (up to window) finished episodes
    episode_lengths: tuple[float, ...]

    @staticmethod
    def width(obs_size: int, window: int) -> int:
        """Length of a packed row."""
        return 2 + (1 + 2 * obs_size) + 3 + 2 + 2 * window

    def pack(self, obs_size: int, window: int) -> np.ndarray:
        """This share as a row of :meth:`width` float64 values."""
        kept = min(len(self.episode_returns), window)
        row = np.zeros(self.width(obs_size, window))
        returns = list(self.episode_returns[len(self.episode_returns) - kept:])
        lengths = list(self.episode_lengths[len(self.episode_lengths) - kept:])
        head = [float(self.reform), float(self.samples), *self.obs.pack(),
                *self.returns.pack(), float(self.finished), float(kept)]
        row[:len(head)] = head
        row[len(head):len(head) + kept] = returns
        row[len(head) + window:len(head) + window + kept] = lengths
        return row

    @classmethod
    def unpack(cls, row: np.ndarray, obs_size: int, window: int, peer: str) -> RoundShare:
        """A row sent by ``peer``, checked.

        Raises:
            ProtocolError: a count is negative, fractional or non-finite, or moments are
                inconsistent; names the peer.
        """
        if row.shape != (cls.width(obs_size, window),) or not np.isfinite(row).all():
            raise ProtocolError("round share", f"{cls.width(obs_size, window)} finite values",
                                f"shape {row.shape}", peer)
        o = 2 + 1 + 2 * obs_size
        reform, samples = row[0], row[1]
        finished, kept = row[o + 3], row[o + 4]
        counts = (samples, finished, kept, row[2], row[o])
        if any(c < 0 or c != int(c) for c in counts) or kept > window or kept > finished \
                or reform not in (0.0, 1.0):
            raise ProtocolError("round share counts", "non-negative whole numbers", counts,
                                peer)
        try:
            obs = Moments.unpack(row[2:o], (obs_size,))
            returns = Moments.unpack(row[o:o + 3], ())
        except ValueError as exc:
            raise ProtocolError("round share moments", "valid moments", str(exc), peer) \
                from exc
        start, k = o + 5, int(kept)
        return cls(bool(reform), int(samples), obs, returns, int(finished),
                   tuple(row[start:start + k].tolist()),
                   tuple(row[start + window:start + window + k].tolist()))


@dataclass
class Counters:
    """Progress every member holds alike."""

    rounds: int = 0  # rounds whose shares were combined
    updates: int = 0  # optimizer steps applied
    env_steps: int = 0  # valid environment steps of the whole ring, in combined rounds

    def pack(self) -> list[float]:
        return [float(self.rounds), float(self.updates), float(self.env_steps)]


def pack_state(model: ActorCritic, optimizers: tuple[Adam, Adam],
               obs_norm: RunningNormalizer, returns: ReturnScaler, window: EpisodeWindow,
               counters: Counters) -> np.ndarray:
    """Everything a member needs to carry on from this node's state, as float64 (the
    float32 parameters convert exactly)."""
    parts: list[np.ndarray | list[float]] = [model.policy.params, model.value.params]
    for adam in optimizers:
        parts += [adam.exp_avg, adam.exp_avg_sq, [float(adam.steps)]]
    parts += [obs_norm.moments.pack(), returns.moments.pack(), window.pack(), counters.pack()]
    return np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in parts])


def load_state(flat: np.ndarray, model: ActorCritic, optimizers: tuple[Adam, Adam],
               obs_norm: RunningNormalizer, returns: ReturnScaler, window: EpisodeWindow,
               counters: Counters) -> None:
    """The inverse of :func:`pack_state`, into the same objects."""
    at = 0

    def take(size: int) -> np.ndarray:
        nonlocal at
        at += size
        return flat[at - size:at]

    model.policy.params[...] = take(model.policy.num_params)
    model.value.params[...] = take(model.value.num_params)
    for adam in optimizers:
        adam.exp_avg[...] = take(adam.exp_avg.size)
        adam.exp_avg_sq[...] = take(adam.exp_avg_sq.size)
        adam.steps = int(take(1)[0])
    obs_norm.moments = Moments.unpack(take(1 + 2 * model.obs_size), (model.obs_size,))
    returns.moments = Moments.unpack(take(3), ())
    window.load(take(2 + 2 * window.size))
    counters.rounds, counters.updates, counters.env_steps = (int(v) for v in take(3))
