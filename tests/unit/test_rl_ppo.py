"""PPO's pieces: the gradient of the clipped objective, GAE, and collecting a rollout."""

from __future__ import annotations

import numpy as np
import pytest

from ringtrain.rl.ppo import ActorCritic, PPOConfig, gae, ppo_gradients


def _loss_sum(model, obs, actions, old_logp, adv, returns, config):
    probs = model.probabilities(obs).astype(np.float64)
    logp = np.log(probs[np.arange(len(obs)), actions])
    ratio = np.exp(logp - old_logp)
    surrogate = np.minimum(ratio * adv, np.clip(ratio, 1 - config.clip, 1 + config.clip) * adv)
    entropy = -(probs * np.log(probs)).sum(axis=1)
    value = model.values(obs).astype(np.float64)
    return float((-surrogate + config.vf_coef * 0.5 * (value - returns) ** 2
                  - config.ent_coef * entropy).sum())


def test_ppo_gradients_match_finite_differences():
    config = PPOConfig(ent_coef=0.01, clip=0.2, hidden=(8,))
    model = ActorCritic(4, 3, config.hidden, seed=1)
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(32, 4)).astype(np.float32)
    actions = rng.integers(0, 3, 32)
    probs = model.probabilities(obs)
    # old policy a little off, so that some ratios are clipped and some are not
    old_logp = np.log(probs[np.arange(32), actions]) + rng.normal(0, 0.3, 32)
    adv, returns = rng.normal(size=32), rng.normal(size=32)
    sums = ppo_gradients(model, obs, actions, old_logp, adv, returns, config)
    assert sums.clipped > 0 and sums.clipped < 32
    grads = np.concatenate([model.policy.grads, model.value.grads]).astype(np.float64)
    params = [model.policy.params, model.value.params]
    checked = 0
    for index in rng.choice(model.size, 40, replace=False):
        net = 0 if index < model.policy.num_params else 1
        i = index if net == 0 else index - model.policy.num_params
        saved = params[net][i]
        losses = []
        for delta in (1e-2, -1e-2):
            params[net][i] = saved + delta
            losses.append(_loss_sum(model, obs, actions, old_logp, adv, returns, config))
        params[net][i] = saved
        numeric = (losses[0] - losses[1]) / 2e-2
        if abs(numeric) > 1e-3:
            checked += 1
        assert grads[index] == pytest.approx(numeric, rel=0.05, abs=2e-3), index
    assert checked >= 10


def _gae_reference(r, v, last, term, trunc, boot, gamma, lam):
    steps, envs = r.shape
    adv = np.zeros((steps, envs))
    for e in range(envs):
        running = 0.0
        for t in reversed(range(steps)):
            if term[t, e]:
                delta, running = r[t, e] - v[t, e], 0.0
            elif trunc[t, e]:
                delta, running = r[t, e] + gamma * boot[t, e] - v[t, e], 0.0
            else:
                nxt = v[t + 1, e] if t + 1 < steps else last[e]
                delta = r[t, e] + gamma * nxt - v[t, e]
            running = delta + gamma * lam * running
            adv[t, e] = running
    return adv


def test_gae_matches_a_per_environment_reference():
    rng = np.random.default_rng(3)
    r, v = rng.normal(size=(9, 4)), rng.normal(size=(9, 4))
    last, boot = rng.normal(size=4), rng.normal(size=(9, 4))
    term = rng.random((9, 4)) < 0.15
    trunc = (rng.random((9, 4)) < 0.15) & ~term
    boot = np.where(trunc, boot, 0.0)
    adv, returns = gae(r, v, last, term, trunc, boot, 0.98, 0.8)
    np.testing.assert_allclose(adv, _gae_reference(r, v, last, term, trunc, boot, 0.98, 0.8),
                               rtol=1e-12)
    np.testing.assert_allclose(returns, adv + v)


def test_actions_follow_the_probabilities():
    model = ActorCritic(2, 3, (4,), seed=0)
    obs = np.zeros((20000, 2), dtype=np.float32)
    actions, logp, _ = model.act(obs, np.random.default_rng(0))
    probs = model.probabilities(obs[:1])[0]
    np.testing.assert_allclose(np.bincount(actions, minlength=3) / len(obs), probs, atol=0.02)
    np.testing.assert_allclose(logp, np.log(probs[actions]), rtol=1e-5)


def test_a_rollout_of_cartpole_records_only_real_steps():
    pytest.importorskip("gymnasium")
    from ringtrain.rl.envs import make_vector_env
    from ringtrain.rl.rollout import Actor

    env, spec = make_vector_env("CartPole-v1", 4)
    model = ActorCritic(spec.obs_size, spec.actions, (8,), seed=0)
    actor = Actor(env, model, seed=5, gamma=0.99)
    actor.begin(model, None, version=7)
    taken = sum(actor.step() for _ in range(200))
    rollout = actor.finish()
    assert rollout.version == 7 and rollout.samples == taken == actor.env_steps
    assert rollout.obs_moments.count == taken
    # every real CartPole step pays 1; an episode's return is its length
    assert rollout.episode_returns == [float(n) for n in rollout.episode_lengths]
    assert len(rollout.episode_returns) >= 4
    # the step after an episode's end is the environment's reset: not valid
    ended = rollout.terminated | rollout.truncated
    assert not rollout.valid[1:][ended[:-1]].any()
    assert rollout.rewards[rollout.valid].min() == 1.0
