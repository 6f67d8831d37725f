"""ringtrain.rl across real node processes: the environment statistics every node holds are
bit-identical after every round and equal to the statistics of all nodes' samples pooled;
the policy is the same everywhere; nodes of different modes and env counts train together."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from ringtrain.testing import LocalCluster, run_local

pytest.importorskip("gymnasium")

ROUNDS = 5


def _train(node, modes, envs, victim=None, kill_round=0):
    from ringtrain.rl import DistributedPPO, RLConfig, make_vector_env
    from ringtrain.rl.ppo import PPOConfig

    config = RLConfig(envs_per_node=envs[node.rank], rollout_steps=16, mode=modes[node.rank],
                      ppo=PPOConfig(epochs=2, minibatches=2, hidden=(16,)),
                      target_return=None, max_env_steps=10**9)
    env, spec = make_vector_env(config.env_id, config.envs_per_node)
    learner = DistributedPPO(node, env, spec.obs_size, spec.actions, config)
    raw, rounds = [], []
    finish = learner.actor.finish

    def recording_finish():  # this node's raw observations of every rollout, in order
        raw.append(np.concatenate(learner.actor._raw))
        return finish()

    learner.actor.finish = recording_finish

    def on_round(report):
        rounds.append({
            "round": report.round, "staleness": report.staleness,
            "obs": learner.obs_norm.moments.pack().tobytes(),
            "returns": learner.actor.returns.moments.pack().tobytes(),
            "window": learner.window.pack().tobytes(),
            "params": hashlib.sha256(learner.model.policy.params.tobytes()
                                     + learner.model.value.params.tobytes()).hexdigest()})
        if node.node_id == victim and report.round == kill_round:
            os.kill(os.getpid(), signal.SIGKILL)  # dies between two rounds' collectives
        if report.round == ROUNDS:
            learner.done = True

    learner.run(on_round)
    return {"rounds": rounds, "raw": raw, "world_size": node.world_size,
            "reforms": learner.reforms}


def test_statistics_are_identical_everywhere_and_pooled_exactly():
    # three nodes: different env counts (so averages of averages would be wrong), one async
    results = run_local(_train, 3, args=(["sync", "async", "sync"], [3, 8, 5]), timeout=90)
    rounds = [r["rounds"] for r in results]
    assert all(len(r) == ROUNDS for r in rounds), [len(r) for r in rounds]
    for k in range(ROUNDS):
        for key in ("obs", "returns", "window", "params"):
            assert len({r[k][key] for r in rounds}) == 1, f"round {k + 1}: {key} differs"
    assert max(r["staleness"] for r in rounds[1]) >= 1  # the async node acted ahead
    assert all(r["staleness"] == 0 for r in rounds[0])
    # after round k the moments are those of every node's first k rollouts pooled
    for k in range(1, ROUNDS + 1):
        pooled = np.concatenate([obs for result in results for obs in result["raw"][:k]])
        packed = np.frombuffer(rounds[0][k - 1]["obs"])
        count, mean, m2 = packed[0], packed[1:5], packed[5:]
        assert count == len(pooled)
        np.testing.assert_allclose(mean, pooled.mean(axis=0), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(m2 / count, pooled.var(axis=0), rtol=1e-10)


def test_survivors_of_a_killed_node_go_on_with_the_same_policy():
    cluster = LocalCluster(_train, 3, (["async", "sync", "sync"], [4, 4, 4], "node-02", 2),
                           timeout=90).start()
    results = cluster.results(allow_failed=[2])
    survivors = results[:2]
    assert results[2] is None and all(r["world_size"] == 2 for r in survivors)
    assert all(r["reforms"] >= 1 for r in survivors)
    last = [r["rounds"][-1] for r in survivors]
    assert last[0]["round"] == last[1]["round"] == ROUNDS
    for key in ("obs", "returns", "window", "params"):
        assert last[0][key] == last[1][key], key


def _train_join(node, started_file):
    from ringtrain.rl import DistributedPPO, RLConfig, make_vector_env
    from ringtrain.rl.ppo import PPOConfig

    config = RLConfig(envs_per_node=4, rollout_steps=16, target_return=None,
                      max_env_steps=10**9, ppo=PPOConfig(epochs=2, minibatches=2, hidden=(16,)))
    env, spec = make_vector_env(config.env_id, config.envs_per_node)
    joiner = node.joined_running_ring
    learner = DistributedPPO(node, env, spec.obs_size, spec.actions, config)
    # the round after which the ring had 3 members: the joiner adopts the counters of then
    joined = [learner.counters.rounds] if joiner else []
    adopted = learner.obs_norm.moments.count if joiner else 0.0
    last = {}

    def on_round(report):
        Path(started_file).touch()  # the parent starts the joiner once a round is done
        if not joined and node.world_size == 3:
            joined.append(report.round)
        if not joined:
            time.sleep(0.1)  # give the joiner time to start (a loaded machine: seconds)
        last.update(round=report.round, world_size=node.world_size,
                    obs=learner.obs_norm.moments.pack().tobytes(),
                    window=learner.window.pack().tobytes(),
                    adam=learner.optimizers[0].exp_avg.tobytes(),
                    params=learner.model.policy.params.tobytes())
        if (joined and report.round == joined[0] + 3) or report.round >= 900:
            learner.done = True

    learner.run(on_round)
    return {**last, "joiner": joiner, "adopted": adopted, "joined": joined}


def test_a_joiner_receives_policy_optimizer_and_normaliser_state(tmp_path):
    started = tmp_path / "trained"
    cluster = LocalCluster(_train_join, 2, (str(started),), timeout=150).start()
    deadline = time.monotonic() + 60
    while not started.exists():  # the ring of two must be training before the third comes
        if time.monotonic() > deadline:
            cluster.fail("the first two nodes did not finish a round in 60 s")
        time.sleep(0.05)
    cluster.start_extra(2)
    results = cluster.results()
    assert [r["joiner"] for r in results] == [False, False, True]
    assert results[2]["adopted"] > 0  # the ring's statistics, not a fresh normaliser
    assert all(r["world_size"] == 3 and r["joined"] == results[0]["joined"] for r in results)
    for key in ("round", "obs", "window", "adam", "params"):
        assert len({r[key] for r in results}) == 1, key
