"""Distributed PPO on a ring: every node runs its own environments; the ring shares the rest.

A round on every node:

1. **Collect.** The :class:`~ringtrain.rl.rollout.Actor` steps this node's environments
   (its own seeds) with a frozen copy of the policy: ``rollout_steps`` vector steps.
2. **Exchange.** One all-reduce of a (world_size, row) matrix in which each node filled its
   own row (:class:`~ringtrain.rl.exchange.RoundShare`): the sum is the all-gather. Every
   node then combines the rows in rank order: the observation normaliser's and the return
   scaler's moments (parallel variance: the statistics of every node's samples pooled), the
   episode window (the ring's last 100 episodes) and the counters. Same inputs, same order,
   same code: the same bits on every node after every round.
3. **Train.** GAE on this node's rollout (rewards scaled by the ring's return scale),
   advantages normalised over the node's rollout, then ``epochs`` x ``minibatches``
   gradient steps. Each node cuts its own samples into ``minibatches`` parts; each step
   all-reduces [sum of the policy and value gradients over the part, sample count, loss
   sums] and divides: the mean over the union minibatch of every node, so a node that
   collected more samples weighs more, in proportion. The averaged gradient is clipped to
   ``max_grad_norm`` and stepped by Adam, identically everywhere.

The ring stops every node at the same round: when the window's mean return reaches
``target_return`` (the window is the same everywhere) or the ring's environment steps reach
``max_env_steps``.

**Asynchronous mode** (``mode="async"``). Training is a generator that yields each
collective it starts (:meth:`DistributedPPO._train`). In sync mode the loop waits for each.
In async mode the node starts the next rollout at once and advances training between
environment steps whenever its collective has finished: a node that finishes early acts
instead of waiting, and waiting for the ring costs no environment time. The rollout acts
with the newest parameters this node has (the actor's snapshot is refreshed after every
update of the round being trained), so when it is trained its oldest steps are at most one
round of updates (``epochs`` x ``minibatches``) old; PPO's clipped ratio, taken against the
policy that really acted, corrects for the lag. A rollout goes on past ``rollout_steps``
while training is not done, up to ``max_rollout_steps``, and only then waits: staleness is
bounded by one round's updates, and every round reports it (in updates: 0 in sync mode).

**Elastic.** A member that fails makes the collective in flight raise
:class:`~ringtrain.errors.PeerFailedError` on every survivor: the round's training is
abandoned, the ring re-forms without it, and every member adopts the state of the member
with the most updates (parameters, Adam state, normalisers, episode window, counters),
broadcast as one vector: all survivors go on with the same policy, and the rollout in
flight starts anew. A member that sees a node waiting to join (``node.reform_due``) raises
the re-form flag in its exchange row; all members see it in the same round and re-form after
its training, and the joiner receives the same state.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..errors import ConfigError, MembershipError, PeerFailedError, ProtocolError
from ..node.node import Node, Work
from ..train.agreement import check_agreement
from ..train.optim import Adam
from .exchange import Counters, RoundShare, load_state, pack_state
from .ppo import ActorCritic, LossSums, PPOConfig, gae, ppo_gradients
from .rollout import Actor, Rollout, VectorEnv
from .stats import EpisodeWindow, RunningNormalizer

log = logging.getLogger(__name__)

CONTROL = 6  # after the gradients: samples, policy, value, entropy, approx_kl, clipped
REFORM_ROUND = 2.0  # seconds per attempt to re-form


@dataclass(frozen=True)
class RLConfig:
    """What one job trains and how (every member must use the same)."""

    env_id: str = "CartPole-v1"
    envs_per_node: int = 16
    rollout_steps: int = 64
    ppo: PPOConfig = field(default_factory=PPOConfig)
    normalize_obs: bool = True
    normalize_reward: bool = True
    mode: Literal["sync", "async"] = "sync"
    max_rollout_steps: int = 4096
    """Async mode: a rollout goes on while training is not done, up to this many steps."""
    target_return: float | None = 475.0
    """Stop once the mean return over the last ``window`` episodes reaches this."""
    window: int = 100
    max_env_steps: int = 2_000_000
    """Stop once the ring has taken this many environment steps."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("sync", "async"):
            raise ConfigError(f"mode must be 'sync' or 'async', got {self.mode!r}")
        if min(self.envs_per_node, self.rollout_steps, self.window, self.max_env_steps) < 1 \
                or self.max_rollout_steps < self.rollout_steps:
            raise ConfigError(f"need envs_per_node, rollout_steps, window, max_env_steps "
                              f">= 1 and max_rollout_steps >= rollout_steps: {self}")

    def facts(self) -> dict[str, str]:
        """What members check they share (all but the mode, which may differ per node)."""
        return {"env": self.env_id, "ppo": repr(self.ppo), "rollout": str(self.rollout_steps),
                "normalize": f"{self.normalize_obs},{self.normalize_reward}",
                "stop": f"{self.target_return},{self.window},{self.max_env_steps}",
                "seed": str(self.seed)}


@dataclass(frozen=True)
class RoundReport:
    """One round on this node."""

    round: int  # rounds combined on the ring so far
    env_steps: int  # the ring's environment steps so far
    local_env_steps: int  # this node's, ever
    mean_return: float  # over the ring's last ``window`` episodes
    episodes: int  # the ring's, ever
    samples: int  # the ring's samples this round
    world_size: int
    staleness: int  # updates between the oldest policy that acted and the one trained
    policy_loss: float
    value_loss: float
    entropy: float
    approx_kl: float
    clip_fraction: float
    solved: bool


class DistributedPPO:
    """PPO trained by every member of ``node``'s ring together (see the module docstring).

    Constructing it is a collective: members check they share the config and the model,
    then take rank 0's state; a node joining a running ring takes the state of the most
    advanced member instead.

    Args:
        node: this process's node.
        env: this node's vector environment (Gymnasium API, next-step autoreset); see
            :func:`ringtrain.rl.envs.make_vector_env`.
        obs_size, actions: the observation length and the number of actions.
        config: the job's settings.
        rejoin_timeout: how long to wait for the ring to re-form after a failure.
    """

    def __init__(self, node: Node, env: VectorEnv, obs_size: int, actions: int,
                 config: RLConfig, rejoin_timeout: float = 120.0):
        self.node, self.config = node, config
        self.model = ActorCritic(obs_size, actions, config.ppo.hidden, config.seed)
        lr = config.ppo.lr
        self.optimizers = (Adam(self.model.policy.params, lr, eps=1e-5),
                           Adam(self.model.value.params, lr, eps=1e-5))
        self.obs_norm = RunningNormalizer((obs_size,))
        self.window = EpisodeWindow(config.window)
        self.counters = Counters()
        seed = (config.seed * 1_000_003 + zlib.crc32(node.node_id.encode())) % 2**31
        self.actor = Actor(env, self.model, seed, config.ppo.gamma)
        self.rejoin_timeout = rejoin_timeout
        self.done = False
        self.leaving = False
        """Set by :meth:`request_leave`: this node leaves after the current round."""
        self.reforms = 0
        self.dropped_rounds = 0  # rounds whose training a failure abandoned
        self.max_staleness = 0
        self.seconds = {"acting": 0.0, "training": 0.0, "waiting": 0.0}
        """Where this node's time went in :meth:`run`: stepping environments, computing
        updates (and the exchange), waiting for the ring's collectives."""
        self._buffer = np.zeros(self.model.size + CONTROL, dtype=np.float32)
        self._report: RoundReport | None = None
        self.facts = {**config.facts(), "model": self.model.schema()}
        if node.joined_running_ring:
            self._sync_with_retry()
        else:
            check_agreement(node, self.facts)
            self._broadcast_state(0)

    # the loop ---------------------------------------------------------------------------

    def run(self, on_round: Callable[[RoundReport], None] | None = None) -> RoundReport | None:
        """Train until the ring stops (target return or step budget); returns the last
        round's report."""
        self.actor.begin(self.model, self._acting_normalizer(), self.counters.updates)
        training: Iterator[Work] | None = None
        work: Work | None = None
        steps = self.config.rollout_steps
        sync = self.config.mode == "sync"
        while not self.done:
            started = time.perf_counter()
            self.actor.step()
            self.seconds["acting"] += time.perf_counter() - started
            # async: advance training whenever its collective is done, between env steps
            while work is not None and (work.done() or self.actor.steps
                                        >= self.config.max_rollout_steps):
                training, work = self._advance(training, work, on_round)
            if self.actor.steps < steps or (work is not None and not sync):
                continue
            rollout = self.actor.finish()
            training = self._train(rollout)
            work = next(training, None)
            if sync:
                while work is not None:
                    training, work = self._advance(training, work, on_round)
            if not self.done:
                self.actor.begin(self.model, self._acting_normalizer(), self.counters.updates)
        return self._report

    def _advance(self, training: Iterator[Work] | None, work: Work,
                 on_round: Callable[[RoundReport], None] | None
                 ) -> tuple[Iterator[Work] | None, Work | None]:
        """Wait for ``work`` (done already, in async mode) and run training to its next
        collective; on a failure, re-form and adopt the most advanced state."""
        assert training is not None
        try:
            waited = time.perf_counter()
            work.wait()
            computed = time.perf_counter()
            following = next(training, None)
            self.seconds["waiting"] += computed - waited
            self.seconds["training"] += time.perf_counter() - computed
        except PeerFailedError as exc:
            training.close()
            self.dropped_rounds += 1
            log.warning("node %s: round %d failed (%s); re-forming the ring", self.node.node_id,
                        self.counters.rounds + 1, exc)
            self._reform()
            # the rollout in flight acted with a policy from before the re-form: start anew,
            # so no trained rollout is more than one round of updates stale
            self.actor.begin(self.model, self._acting_normalizer(), self.counters.updates)
            return None, None
        if self.config.mode == "async":
            self.actor.refresh(self.model)
        if following is None and self._report is not None and on_round is not None:
            on_round(self._report)
        return (training if following is not None else None), following

    def _acting_normalizer(self) -> RunningNormalizer | None:
        return self.obs_norm if self.config.normalize_obs else None

    # one round's training: a generator of the collectives it starts -------------------------

    def _train(self, rollout: Rollout) -> Iterator[Work]:
        """Exchange the round's statistics, then PPO on this node's rollout, yielding each
        all-reduce it starts; the caller resumes it once that all-reduce is done."""
        config, ppo = self.config, self.config.ppo
        node, world = self.node, self.node.world_size
        leaving = self.leaving  # read once: a signal handler may set it meanwhile
        share = RoundShare(leaving or node.reform_due, rollout.samples, rollout.obs_moments,
                           rollout.return_moments, len(rollout.episode_returns),
                           tuple(rollout.episode_returns), tuple(rollout.episode_lengths))
        width = RoundShare.width(self.model.obs_size, config.window)
        table = np.zeros((world, width))
        table[node.rank] = share.pack(self.model.obs_size, config.window)
        work = node.all_reduce_async(table, out=table)
        yield work
        try:
            shares = [RoundShare.unpack(row, self.model.obs_size, config.window, member)
                      for row, member in zip(work.wait(), work.members or node.members,
                                             strict=True)]
        except ProtocolError as exc:
            # every member holds the same table, so every member skips this round alike
            self.dropped_rounds += 1
            log.warning("node %s: round %d skipped on every member: %s", node.node_id,
                        self.counters.rounds + 1, exc)
            return
        self._combine(shares)
        staleness = self.counters.updates - rollout.version
        self.max_staleness = max(self.max_staleness, staleness)
        solved = (config.target_return is not None and self.window.full
                  and self.window.mean_return >= config.target_return)
        if solved or self.counters.env_steps >= config.max_env_steps:
            self.done = True
            self._report = self._round_report(shares, staleness, None, 0, solved)
            return
        obs, actions, logp, advantages, returns = self._samples(rollout)
        sums = np.zeros(CONTROL - 1)
        rng = np.random.default_rng((config.seed, self.counters.rounds, node.rank))
        for _ in range(ppo.epochs):
            order = rng.permutation(len(obs))
            for part in np.array_split(order, ppo.minibatches):
                if len(part):
                    loss = ppo_gradients(self.model, obs[part], actions[part], logp[part],
                                         advantages[part], returns[part], ppo)
                    self.model.write_grads(self._buffer)
                else:
                    loss = LossSums(0.0, 0.0, 0.0, 0.0, 0.0)
                    self._buffer[:self.model.size] = 0
                self._buffer[self.model.size:] = (len(part), loss.policy, loss.value,
                                                  loss.entropy, loss.approx_kl, loss.clipped)
                work = node.all_reduce_async(self._buffer, out=self._buffer)
                yield work
                work.wait()
                sums += self._apply()
        self._report = self._round_report(shares, staleness, sums,
                                          ppo.epochs * ppo.minibatches, False)
        if leaving:  # the others know from the exchange: they re-form after this round
            self.done = True
            node.leave()
        elif any(s.reform for s in shares):  # a joiner waits, or a member leaves
            self._reform()

    def _combine(self, shares: list[RoundShare]) -> None:
        """Every node's round, in rank order, into the statistics every node holds."""
        if self.config.normalize_obs:
            self.obs_norm.update([s.obs for s in shares])
        if self.config.normalize_reward:
            self.actor.returns.update([s.returns for s in shares])
        for s in shares:
            self.window.add(s.episode_returns, s.episode_lengths, s.finished)
        self.counters.rounds += 1
        self.counters.env_steps += sum(s.samples for s in shares)

    def _samples(self, rollout: Rollout) -> tuple[np.ndarray, ...]:
        """This node's valid samples: observations, actions, old log-probabilities,
        normalised advantages and value targets."""
        ppo = self.config.ppo
        scale = self.actor.returns.scale if self.config.normalize_reward else 1.0
        advantages, returns = gae(rollout.rewards * scale, rollout.values, rollout.last_values,
                                  rollout.terminated, rollout.truncated, rollout.bootstrap,
                                  ppo.gamma, ppo.gae_lambda)
        valid = rollout.valid
        adv = advantages[valid]
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        return (rollout.obs[valid], rollout.actions[valid], rollout.logp[valid], adv,
                returns[valid])

    def _apply(self) -> np.ndarray:
        """Divide the summed buffer by the ring's sample count, clip, step Adam; returns
        the loss sums (zeros when the step is skipped)."""
        size = self.model.size
        control = self._buffer[size:].astype(np.float64)
        total = control[0]
        grads = self._buffer[:size]
        if not total > 0 or not np.isfinite(grads).all() or not np.isfinite(control).all():
            log.warning("node %s: skipped an update with no samples or a non-finite gradient",
                        self.node.node_id)
            return np.zeros(CONTROL - 1)
        grads /= total
        norm = float(np.sqrt(np.dot(grads, grads)))
        limit = self.config.ppo.max_grad_norm
        if limit and norm > limit:
            grads *= limit / norm
        split = self.model.policy.num_params
        self.optimizers[0].step(grads[:split])
        self.optimizers[1].step(grads[split:])
        self.counters.updates += 1
        return control[1:] / total

    def _round_report(self, shares: list[RoundShare], staleness: int,
                      sums: np.ndarray | None, steps: int, solved: bool) -> RoundReport:
        mean = (sums / steps) if sums is not None and steps else np.full(CONTROL - 1, math.nan)
        samples = sum(s.samples for s in shares)
        return RoundReport(self.counters.rounds, self.counters.env_steps, self.actor.env_steps,
                           self.window.mean_return, self.window.episodes, samples, len(shares),
                           staleness, float(mean[0]), float(mean[1]), float(mean[2]),
                           float(mean[3]), float(mean[4]), solved)

    # elasticity -------------------------------------------------------------------------

    def request_leave(self) -> None:
        """Leave after the current round: the round's exchange tells the others, who re-form
        without this node once its training is done, so no collective fails."""
        self.node.prepare_leave()
        self.leaving = True

    def _reform(self) -> None:
        """Re-form the ring and adopt the most advanced member's state, retrying until
        ``rejoin_timeout``."""
        deadline = time.monotonic() + self.rejoin_timeout
        while True:
            try:
                view = self.node.reform(timeout=max(1.0, min(REFORM_ROUND,
                                                             deadline - time.monotonic())))
                self.reforms += 1
                log.info("node %s: ring re-formed as generation %d with %d members",
                         self.node.node_id, view.generation, view.world_size)
                self._sync_state()
                return
            except PeerFailedError as exc:
                log.warning("another failure while re-forming (%s); trying again", exc)
            except MembershipError:
                if time.monotonic() >= deadline:
                    raise

    def _sync_with_retry(self) -> None:
        try:
            self._sync_state()
        except PeerFailedError as exc:
            log.warning("state sync after joining failed (%s); re-forming", exc)
            self._reform()

    def _sync_state(self) -> None:
        """Every member adopts the state of the member with the most updates (lowest rank
        among equals)."""
        progress = np.array([self.counters.updates, self.counters.rounds], dtype=np.int64)
        gathered = self.node.all_gather(progress)
        root = int(np.lexsort((-gathered[:, 1], -gathered[:, 0]))[0])
        self._broadcast_state(root)

    def _broadcast_state(self, root: int) -> None:
        flat = pack_state(self.model, self.optimizers, self.obs_norm, self.actor.returns,
                          self.window, self.counters)
        flat = self.node.broadcast(flat, root)
        load_state(flat, self.model, self.optimizers, self.obs_norm, self.actor.returns,
                   self.window, self.counters)
