"""Layer 4, reinforcement learning on a ring: every node runs its own environments, the ring
averages the policy and value gradients and keeps the environment statistics identical.

`ppo` (the actor-critic, GAE, the clipped objective), `stats` (moments, normalisers, the
episode window), `rollout` (collecting experience), `exchange` (what nodes share each round,
the state a joiner adopts), `envs` (Gymnasium, the only importer), `learner`
(:class:`DistributedPPO`: sync and async modes, elastic).

May import: every lower layer, `train.nn`, `train.optim` and `train.agreement`; never the
CLI, benchmarks or lab.
"""

from .envs import EnvSpec, make_vector_env
from .learner import DistributedPPO, RLConfig, RoundReport
from .ppo import ActorCritic, PPOConfig

__all__ = ["ActorCritic", "DistributedPPO", "EnvSpec", "PPOConfig", "RLConfig", "RoundReport",
           "make_vector_env"]
