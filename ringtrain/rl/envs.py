"""Gymnasium vector environments: the one module that imports ``gymnasium``.

``pip install 'ringtrain[rl]'`` brings Gymnasium (the maintained successor of OpenAI Gym:
CartPole, Acrobot, LunarLander, ...). Where an environment has a numpy-vectorised
implementation (CartPole does: one array operation steps every copy) it is used; otherwise
copies step one after another in this process (``SyncVectorEnv``). Either way autoreset is
*next step*, which :class:`~ringtrain.rl.rollout.Actor` expects.

No built-in CartPole: Gymnasium's vectorised one is numpy already, so a copy of its physics
here would only be a second implementation to keep right; the core install stays without
RL, and ``ringtrain[rl]`` is one small pure-Python package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

INSTALL_HINT = "install it with: pip install 'ringtrain[rl]'  (or: pip install gymnasium)"


@dataclass(frozen=True)
class EnvSpec:
    """What the learner needs to know of an environment."""

    obs_size: int
    actions: int


def _gymnasium() -> Any:
    try:
        import gymnasium  # noqa: PLC0415 - optional: only RL jobs need it
    except ImportError as exc:
        raise ConfigError(f"reinforcement learning needs Gymnasium, which is not installed; "
                          f"{INSTALL_HINT}") from exc
    return gymnasium


def make_vector_env(env_id: str, num_envs: int) -> tuple[Any, EnvSpec]:
    """``num_envs`` copies of Gymnasium environment ``env_id`` as one vector environment
    with next-step autoreset, and its spec (seed it with ``reset(seed=...)``).

    Raises:
        ConfigError: Gymnasium is missing, the id is unknown, or the environment's
            observations are not flat boxes or its actions not discrete; the message says
            which.
    """
    gymnasium = _gymnasium()
    if num_envs < 1:
        raise ConfigError(f"need at least one environment, got {num_envs}")
    next_step = gymnasium.vector.AutoresetMode.NEXT_STEP
    try:
        try:
            env = gymnasium.make_vec(env_id, num_envs=num_envs,
                                     vectorization_mode="vector_entry_point")
        except gymnasium.error.Error:  # no vectorised implementation: copies in turn
            env = gymnasium.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync",
                                     vector_kwargs={"autoreset_mode": next_step})
    except gymnasium.error.Error as exc:
        raise ConfigError(f"Gymnasium cannot make environment {env_id!r}: {exc}") from exc
    mode = env.metadata.get("autoreset_mode", next_step)
    obs_space, action_space = env.single_observation_space, env.single_action_space
    problem = None
    if mode != next_step:
        problem = f"autoreset mode {mode} (need next-step)"
    elif not isinstance(obs_space, gymnasium.spaces.Box) or len(obs_space.shape) != 1:
        problem = f"observation space {obs_space} (need a flat Box)"
    elif not isinstance(action_space, gymnasium.spaces.Discrete):
        problem = f"action space {action_space} (need Discrete)"
    if problem is not None:
        env.close()
        raise ConfigError(f"environment {env_id!r} has {problem}: the PPO learner handles "
                          f"discrete actions over vector observations")
    return env, EnvSpec(int(obs_space.shape[0]), int(action_space.n))
