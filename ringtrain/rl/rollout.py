"""Collecting experience: an :class:`Actor` steps this node's vectorised environments with a
frozen copy of the policy and records a :class:`Rollout`.

Pure logic: the environments come in as any object with the Gymnasium vector API
(``reset(seed=) -> (obs, info)``, ``step(actions) -> (obs, rewards, terminated, truncated,
info)``) whose autoreset mode is *next step* (Gymnasium's default): after an episode ends,
the next ``step`` resets that environment, ignores its action and returns the first
observation of the new episode. Such a reset step is recorded as not *valid*: it trains
nothing and counts in no statistic.

The actor acts with a snapshot (policy parameters and observation normaliser) taken when a
rollout begins, so a learner may change the live model meanwhile (the asynchronous mode
trains the previous round while this one is collected, and refreshes the snapshot's
parameters after each update with :meth:`Actor.refresh`); the rollout carries the oldest
policy version (count of updates) that acted in it, and the learner reports how far that
lags behind the model it trains (staleness).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .ppo import ActorCritic
from .stats import Moments, ReturnScaler


class VectorEnv(Protocol):
    """What the actor needs of a Gymnasium vector environment."""

    num_envs: int

    def reset(self, *, seed: int | None = None) -> tuple[np.ndarray, dict[str, Any]]: ...

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                 np.ndarray, dict[str, Any]]: ...


@dataclass
class Rollout:
    """One round's experience on this node; arrays are (steps, envs)."""

    obs: np.ndarray  # normalised as the policy saw them, float32 (steps, envs, obs_size)
    actions: np.ndarray
    logp: np.ndarray  # log pi_old(a|s)
    values: np.ndarray  # V_old(s)
    rewards: np.ndarray  # raw rewards
    terminated: np.ndarray
    truncated: np.ndarray
    bootstrap: np.ndarray  # V_old(final observation) where truncated, else 0
    valid: np.ndarray
    last_values: np.ndarray  # V_old of the observation after the last step, per env
    version: int  # the oldest policy version (updates applied) that acted in it
    obs_moments: Moments  # of the raw observations of valid steps
    return_moments: Moments  # of the discounted returns seen (reward scaling)
    episode_returns: list[float]
    episode_lengths: list[int]

    @property
    def samples(self) -> int:
        """Valid steps: what this rollout trains on."""
        return int(self.valid.sum())


class Actor:
    """Steps ``env`` with snapshots of ``model``'s policy.

    Args:
        env: the vector environment (next-step autoreset).
        model: the live model; :meth:`begin` copies its parameters.
        seed: seeds the environments' resets and the action draws (each node its own).
        gamma: discount of the return scaler.
    """

    def __init__(self, env: VectorEnv, model: ActorCritic, seed: int, gamma: float):
        self.env = env
        self.num_envs = int(env.num_envs)
        self.snapshot = ActorCritic(model.obs_size, model.actions, model.hidden)
        self.rng = np.random.default_rng(seed)
        self.obs, _ = env.reset(seed=seed)
        self.obs = np.asarray(self.obs, dtype=np.float64)
        self.prev_done = np.zeros(self.num_envs, dtype=bool)
        self.episode_return = np.zeros(self.num_envs)
        self.episode_length = np.zeros(self.num_envs, dtype=np.int64)
        self.returns = ReturnScaler(self.num_envs, gamma)
        self.env_steps = 0  # valid steps taken, ever
        self._mean = np.zeros(model.obs_size)
        self._scale = np.ones(model.obs_size)
        self._clip = np.inf
        self._steps: list[tuple[np.ndarray, ...]] = []
        self._raw: list[np.ndarray] = []
        self._episodes: tuple[list[float], list[int]] = ([], [])
        self.version = -1

    def begin(self, model: ActorCritic, normalizer: Any, version: int) -> None:
        """Start a rollout acting with a copy of ``model``'s parameters and of the
        normaliser's current statistics (a :class:`~ringtrain.rl.stats.RunningNormalizer`,
        or None for raw observations)."""
        self.snapshot.policy.params[...] = model.policy.params
        self.snapshot.value.params[...] = model.value.params
        if normalizer is not None and normalizer.moments.count > 0:
            self._mean = normalizer.moments.mean.copy()
            self._scale = 1.0 / np.sqrt(normalizer.moments.variance + 1e-8)
            self._clip = normalizer.clip
        self.version = version
        self._steps, self._raw = [], []
        self._episodes = ([], [])

    def refresh(self, model: ActorCritic) -> None:
        """Act with ``model``'s current parameters from the next step on (the normaliser
        and the rollout's version stay as :meth:`begin` set them)."""
        self.snapshot.policy.params[...] = model.policy.params
        self.snapshot.value.params[...] = model.value.params

    def _normalize(self, obs: np.ndarray) -> np.ndarray:
        return np.clip((obs - self._mean) * self._scale, -self._clip, self._clip
                       ).astype(np.float32)

    def step(self) -> int:
        """One step of every environment; returns the valid steps it took."""
        valid = ~self.prev_done
        seen = self._normalize(self.obs)
        actions, logp, values = self.snapshot.act(seen, self.rng)
        obs, rewards, terminated, truncated, _ = self.env.step(actions)
        obs = np.asarray(obs, dtype=np.float64)
        rewards = np.asarray(rewards, dtype=np.float64)
        terminated = np.asarray(terminated, dtype=bool) & valid
        truncated = np.asarray(truncated, dtype=bool) & valid & ~terminated
        done = terminated | truncated
        bootstrap = np.zeros(self.num_envs)
        if truncated.any():  # the final observation stands in for the rest of the episode
            bootstrap[truncated] = self.snapshot.values(self._normalize(obs[truncated]))
        self._steps.append((seen, actions, logp, values, rewards, terminated, truncated,
                            bootstrap, valid))
        self._raw.append(self.obs[valid])
        self.returns.observe(rewards, done, valid)
        self.episode_return += np.where(valid, rewards, 0.0)
        self.episode_length += valid
        for i in np.flatnonzero(done):
            self._episodes[0].append(float(self.episode_return[i]))
            self._episodes[1].append(int(self.episode_length[i]))
        self.episode_return[done] = 0.0
        self.episode_length[done] = 0
        self.obs, self.prev_done = obs, done
        taken = int(valid.sum())
        self.env_steps += taken
        return taken

    @property
    def steps(self) -> int:
        """Vector steps in the rollout so far."""
        return len(self._steps)

    def finish(self) -> Rollout:
        """The rollout since :meth:`begin` (at least one step must have been taken)."""
        columns = [np.stack(column) for column in zip(*self._steps, strict=True)]
        obs, actions, logp, values, rewards, terminated, truncated, bootstrap, valid = columns
        last_values = self.snapshot.values(self._normalize(self.obs))
        raw = np.concatenate(self._raw) if self._raw else np.zeros((0, self.obs.shape[1]))
        rollout = Rollout(obs, actions, logp, values, rewards, terminated, truncated,
                          bootstrap, valid, last_values, self.version, Moments.of(raw),
                          self.returns.take_moments(), *self._episodes)
        self._steps, self._raw, self._episodes = [], [], ([], [])
        return rollout

