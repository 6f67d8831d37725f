"""Distributed reinforcement learning: PPO on CartPole-v1, every node with its own environments.

On this machine, as 4 local node processes (needs Gymnasium: pip install 'ringtrain[rl]'):

    python examples/distributed_rl.py
    python examples/distributed_rl.py --nodes 2 --mode async

Across devices, run the built-in job on each device instead (same key file everywhere):

    ringtrain node --job rl-cartpole --key-file job.key            # --mode async to not wait

Each node steps 16 CartPole environments of its own (its own seeds) and prints one line a
second: the mean return over the ring's last 100 episodes (the same number on every node:
the episode statistics are combined exactly every round), the ring's environment steps and
this node's speed. Every round the ring averages the policy and value gradients, weighted by
the samples each node collected, and merges the observation and reward normalisers'
statistics (parallel variance, bit-identical everywhere). The ring stops on every node at the
same round, once the mean return reaches 475 (CartPole-v1 solved); the summary shows whether
every node ended with the same policy.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time

from ringtrain.node.node import Node
from ringtrain.rl import DistributedPPO, RLConfig, RoundReport, make_vector_env
from ringtrain.testing import run_local


def train(node: Node, mode: str, seed: int) -> dict:
    """One node's part: its environments, the shared learner, a progress line a second."""
    config = RLConfig(mode=mode, seed=seed)  # type: ignore[arg-type]
    env, spec = make_vector_env(config.env_id, config.envs_per_node)
    learner = DistributedPPO(node, env, spec.obs_size, spec.actions, config)
    started, last_line = time.perf_counter(), 0.0

    def progress(report: RoundReport) -> None:
        nonlocal last_line
        now = time.perf_counter()
        if now - last_line >= 1.0 or report.solved:
            last_line = now
            sys.stdout.write(  # one write per line: the nodes' lines do not interleave
                f"[node {node.rank}] round {report.round:3d}  mean return "
                f"{report.mean_return:6.1f}  ring env steps {report.env_steps:,}  here "
                f"{learner.actor.env_steps / (now - started):,.0f} steps/s  staleness "
                f"{report.staleness}\n")
            sys.stdout.flush()

    last = learner.run(progress)
    params = learner.model.policy.params.tobytes() + learner.model.value.params.tobytes()
    return {"solved": bool(last and last.solved), "seconds": time.perf_counter() - started,
            "rounds": learner.counters.rounds, "env_steps": learner.counters.env_steps,
            "mean_return": learner.window.mean_return,
            "policy": hashlib.sha256(params).hexdigest()[:16]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--nodes", type=int, default=4, help="local node processes (4)")
    parser.add_argument("--mode", choices=("sync", "async"), default="sync")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = run_local(train, args.nodes, args=(args.mode, args.seed), timeout=600)
    first = results[0]
    same = len({r["policy"] for r in results}) == 1
    print(f"{'solved' if first['solved'] else 'not solved'} by {args.nodes} nodes ({args.mode})"
          f" in {max(r['seconds'] for r in results):.1f} s, {first['rounds']} rounds, "
          f"{first['env_steps']:,} environment steps: mean return {first['mean_return']:.1f} "
          f"over the last 100 episodes; every node holds the same policy: {same} "
          f"({first['policy']})")
    return 0 if first["solved"] and same else 1


if __name__ == "__main__":
    sys.exit(main())
