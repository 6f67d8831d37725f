"""Proximal policy optimisation in numpy: the actor-critic, GAE and the clipped objective.

Pure arithmetic (numpy and :mod:`ringtrain.train.nn`); no I/O, no ring. The policy and the
value function are separate :class:`~ringtrain.train.nn.Sequential` MLPs (tanh), each with
its parameters in one flat buffer; :class:`ActorCritic` lays both gradients out in one flat
vector, which is what travels in the ring's all-reduce.

:func:`ppo_gradients` returns *sums* over a minibatch, not means: a node sends the sum of its
samples' gradients and its sample count, the ring adds both, and dividing gives the mean
over every node's samples, exactly the gradient one process would compute on the union
minibatch (so nodes with more samples weigh more, in proportion).

The objective (Schulman et al., 2017), per sample, with ratio ``r = pi(a|s) / pi_old(a|s)``
and advantage ``A``::

    loss = -min(r A, clip(r, 1 - eps, 1 + eps) A) + vf_coef * (V(s) - R)^2 / 2
           - ent_coef * entropy(pi(.|s))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..train.nn import Dense, Sequential, Tanh

LAST_LAYER_SCALE = 0.01  # the policy starts near uniform: its last layer's weights shrunk


@dataclass(frozen=True)
class PPOConfig:
    """Hyperparameters of the update (every member must use the same)."""

    gamma: float = 0.98
    """Discount."""
    gae_lambda: float = 0.8
    """GAE's lambda."""
    clip: float = 0.2
    """The ratio clip epsilon."""
    lr: float = 2e-3
    """Adam's learning rate."""
    epochs: int = 4
    """Passes over a round's samples."""
    minibatches: int = 2
    """Gradient steps per pass; each node cuts its own samples into this many."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus."""
    max_grad_norm: float = 0.5
    """The averaged gradient is scaled down to at most this global norm (0: off)."""
    hidden: tuple[int, ...] = (64, 64)
    """Hidden layer widths of both networks."""

    def __post_init__(self) -> None:
        if not (0 < self.gamma <= 1 and 0 <= self.gae_lambda <= 1 and 0 < self.clip < 1
                and self.lr > 0 and self.vf_coef >= 0 and self.ent_coef >= 0
                and self.max_grad_norm >= 0):
            raise ConfigError(f"PPO settings out of range: {self}")
        if self.epochs < 1 or self.minibatches < 1 or not self.hidden \
                or min(self.hidden) < 1:
            raise ConfigError(f"PPO needs epochs, minibatches and hidden widths >= 1: {self}")


def _mlp(inputs: int, hidden: tuple[int, ...], outputs: int, seed: int) -> Sequential:
    widths = [inputs, *hidden]
    layers: list = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [Dense(a, b), Tanh()]
    layers.append(Dense(widths[-1], outputs))
    return Sequential(*layers, seed=seed, dtype=np.float32)


class ActorCritic:
    """A categorical policy and a value function over vector observations.

    Args:
        obs_size: length of an observation.
        actions: number of discrete actions.
        hidden: hidden widths of both networks.
        seed: parameters are drawn from this seed (bit-identical everywhere).
    """

    def __init__(self, obs_size: int, actions: int, hidden: tuple[int, ...] = (64, 64),
                 seed: int = 0):
        if obs_size < 1 or actions < 2:
            raise ConfigError(f"need observations of length >= 1 and >= 2 actions, got "
                              f"{obs_size} and {actions}")
        self.obs_size, self.actions, self.hidden = obs_size, actions, tuple(hidden)
        self.policy = _mlp(obs_size, hidden, actions, seed)
        self.value = _mlp(obs_size, hidden, 1, seed + 1)
        last = self.policy.layers[-1]
        assert isinstance(last, Dense) and last.weight is not None
        last.weight *= LAST_LAYER_SCALE
        self.size = self.policy.num_params + self.value.num_params
        """Parameters of both networks (the length of :meth:`flat_grads`)."""

    def schema(self) -> str:
        """What members must share to average gradients: both networks' layouts."""
        return f"policy {self.policy.schema_hash()[:16]} value {self.value.schema_hash()[:16]}"

    def probabilities(self, obs: np.ndarray) -> np.ndarray:
        """Action probabilities, shape (batch, actions)."""
        return _softmax(self.policy.forward(obs))

    def values(self, obs: np.ndarray) -> np.ndarray:
        """State values, shape (batch,)."""
        return self.value.forward(obs)[:, 0]

    def act(self, obs: np.ndarray, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sample one action per observation: (actions, their log-probabilities, values)."""
        probs = self.probabilities(obs)
        draws = rng.random(len(obs))
        cumulative = np.cumsum(probs, axis=1)
        actions = (draws[:, None] >= cumulative[:, :-1]).sum(axis=1)
        chosen = probs[np.arange(len(obs)), actions]
        return actions, np.log(np.maximum(chosen, 1e-12)), self.values(obs)

    def write_grads(self, out: np.ndarray) -> None:
        """Copy both networks' gradients into ``out[:size]`` (policy first)."""
        p = self.policy.num_params
        out[:p] = self.policy.grads
        out[p:self.size] = self.value.grads


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class LossSums:
    """Sums over a minibatch's samples of the loss terms and diagnostics."""

    policy: float
    value: float
    entropy: float
    approx_kl: float
    clipped: float  # samples whose ratio was clipped


def ppo_gradients(model: ActorCritic, obs: np.ndarray, actions: np.ndarray,
                  old_logp: np.ndarray, advantages: np.ndarray, returns: np.ndarray,
                  config: PPOConfig) -> LossSums:
    """Fill ``model.policy.grads`` and ``model.value.grads`` with the gradient of the
    *sum* over these samples of the PPO loss; returns the loss terms' sums."""
    n = len(obs)
    logits = model.policy.forward(obs)
    probs = _softmax(logits)
    rows = np.arange(n)
    logp = np.log(np.maximum(probs[rows, actions], 1e-12))
    ratio = np.exp(logp - old_logp)
    low, high = 1.0 - config.clip, 1.0 + config.clip
    clipped_ratio = np.clip(ratio, low, high)
    # the gradient flows through the unclipped term wherever it is the smaller one
    unclipped = ratio * advantages <= clipped_ratio * advantages
    d_logp = -(advantages * ratio * unclipped)
    d_logits = -probs * d_logp[:, None]
    d_logits[rows, actions] += d_logp
    log_probs = np.log(np.maximum(probs, 1e-12))
    entropy = -(probs * log_probs).sum(axis=1)
    if config.ent_coef:
        # d(-ent_coef * H)/d logits = ent_coef * p * (log p + H)
        d_logits += config.ent_coef * probs * (log_probs + entropy[:, None])
    model.policy.backward(d_logits.astype(np.float32), input_grad=False)
    values = model.value.forward(obs)[:, 0]
    error = values - returns
    model.value.backward((config.vf_coef * error)[:, None].astype(np.float32),
                         input_grad=False)
    surrogate = np.minimum(ratio * advantages, clipped_ratio * advantages)
    log_ratio = logp - old_logp
    return LossSums(policy=float(-surrogate.sum()), value=float(0.5 * (error * error).sum()),
                    entropy=float(entropy.sum()),
                    approx_kl=float(((ratio - 1) - log_ratio).sum()),
                    clipped=float((np.abs(ratio - 1) > config.clip).sum()))


def gae(rewards: np.ndarray, values: np.ndarray, last_values: np.ndarray,
        terminated: np.ndarray, truncated: np.ndarray, bootstrap: np.ndarray,
        gamma: float, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimates and value targets of a rollout, arrays (steps, envs).

    Args:
        rewards: (already scaled) rewards.
        values: V(s_t) as computed when acting.
        last_values: V of the observation after the last step, per env.
        terminated: the episode ended in a terminal state at t (no value after it).
        truncated: the episode was cut at t by a time limit; ``bootstrap[t]`` holds V of its
            final observation, which stands in for what would have followed.
        gamma, lam: discount and GAE lambda.

    Returns:
        (advantages, returns), returns = advantages + values. An episode's end breaks the
        chain, so the step after it (the environment's reset) may be anything.
    """
    steps = len(rewards)
    advantages = np.zeros(rewards.shape, dtype=np.float64)
    last = np.zeros(rewards.shape[1:], dtype=np.float64)
    next_values = np.asarray(last_values, dtype=np.float64)
    for t in range(steps - 1, -1, -1):
        going = 1.0 - (terminated[t] | truncated[t])
        delta = (rewards[t] + gamma * (next_values * going + bootstrap[t] * truncated[t])
                 - values[t])
        last = delta + gamma * lam * going * last
        advantages[t] = last
        next_values = values[t]
    return advantages, advantages + values
