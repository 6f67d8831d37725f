"""``ringtrain node --job rl-cartpole``: the built-in reinforcement-learning job.

Every device runs its own CartPole-v1 environments and PPO learner
(:class:`~ringtrain.rl.DistributedPPO`); the ring averages the gradients and keeps the
observation and reward statistics identical. The job stops on every node at the same round,
when the ring's last 100 episodes average at least 475 (CartPole-v1 solved). Nodes may come
and go: a joiner receives the policy, optimizer and normaliser state; Ctrl-C (or SIGTERM)
leaves after the current round. Needs Gymnasium: ``pip install 'ringtrain[rl]'``.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from typing import Literal

from ..config import LaunchOptions, Settings, env
from ..node.launch import join
from ..rl import DistributedPPO, RLConfig, RoundReport, make_vector_env
from ..train.agreement import schema_of

JOBS = ("rl-cartpole",)
EXIT_LEFT = 130
DIRECT_BYTES = 64 * 1024  # the 37 KB gradient goes in one round, not 2(N-1) ring hops
PRINT_EVERY = 1.0  # seconds between progress lines


def settings() -> Settings:
    """The node settings of the RL jobs: ``RINGTRAIN_*``, plus one-round all-reduces up to
    64 KiB (every node of the job uses the same, as members must), and no spinning waits
    unless asked for (``RINGTRAIN_SPIN_SECONDS``): a device's CPU is better spent stepping
    environments than yielding in a wait (bench-rl: a third less time per round on devices
    of 0.45 core)."""
    base = Settings.from_env()
    spin = base.spin_seconds if env("SPIN_SECONDS") is not None else 0.0
    return dataclasses.replace(base, direct_bytes=max(base.direct_bytes, DIRECT_BYTES),
                               spin_seconds=spin)


def run(options: LaunchOptions, mode: Literal["sync", "async"] = "sync") -> int:
    """Run this device's node of the RL job; returns the exit code."""
    config = RLConfig(mode=mode)
    env, spec = make_vector_env(config.env_id, config.envs_per_node)
    print(f"ringtrain node: job {options.job!r} (PPO on {config.env_id}, {config.envs_per_node} "
          f"environments here, {mode}), looking for at least {options.min_nodes} nodes...",
          flush=True)
    started = time.perf_counter()
    with join(options, settings=settings(), schema=schema_of(config.facts())) as node:
        print(f"ringtrain node {node.node_id}: in a ring of {node.world_size} (generation "
              f"{node.generation}) after {time.perf_counter() - started:.1f} s; members: "
              f"{', '.join(node.members)}", flush=True)
        learner = DistributedPPO(node, env, spec.obs_size, spec.actions, config)
        leaving = _leave_on_signal(learner)
        last = learner.run(progress_printer(learner, node.node_id))
        took = time.perf_counter() - started
        if leaving:
            print(f"ringtrain node {node.node_id}: left the ring after round "
                  f"{learner.counters.rounds}", flush=True)
            return EXIT_LEFT
        outcome = "solved" if last is not None and last.solved else "stopped (step budget)"
        print(f"ringtrain node {node.node_id}: {outcome} at round {learner.counters.rounds} "
              f"after {took:.1f} s: mean return {learner.window.mean_return:.1f} over the "
              f"ring's last {config.window} episodes, {learner.counters.env_steps:,} "
              f"environment steps on the ring ({learner.actor.env_steps:,} here), "
              f"re-formations {learner.reforms}", flush=True)
        return 0


def progress_printer(learner: DistributedPPO, label: str):  # noqa: ANN201
    """An ``on_round`` callback: at most one line a second, and the last round's."""
    last_print = 0.0
    started, steps_before = time.perf_counter(), learner.actor.env_steps

    def show(report: RoundReport) -> None:
        nonlocal last_print
        now = time.perf_counter()
        if now - last_print < PRINT_EVERY and not report.solved:
            return
        last_print = now
        rate = (learner.actor.env_steps - steps_before) / max(now - started, 1e-9)
        # one write per line, so the lines of local nodes do not interleave
        sys.stdout.write(
            f"[{label}] round {report.round:4d}  mean return {report.mean_return:6.1f} "
            f"(last {learner.window.size} episodes)  env steps {report.env_steps:,} on "
            f"{report.world_size} node(s)  here {rate:,.0f}/s  staleness {report.staleness}\n")
        sys.stdout.flush()

    return show


def _leave_on_signal(learner: DistributedPPO) -> list[int]:
    """First Ctrl-C / SIGTERM: leave after the current round. Second: stop at once."""
    received: list[int] = []

    def handler(number: int, _frame: object) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(number)
        print("ringtrain node: leaving the ring after this round (again to stop at once)",
              file=sys.stderr, flush=True)
        learner.request_leave()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)
    return received
