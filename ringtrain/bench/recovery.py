"""Recovery time after a SIGKILL, on loopback: ``ringtrain bench-recovery``.

    ringtrain bench-recovery --nodes 4 8 --repeats 3

N local node processes train the digits MLP with a fixed global batch. At step ``--kill-step``
one member (the lowest rank, a middle one and the highest in turn) SIGKILLs itself in the
middle of the gradient all-reduce, after receiving ``--fraction`` of its segments (0.25: in
the reduce-scatter, 0.75: in the all-gather), and writes the time first. Every survivor
records, from its log and its steps:

* detect: kill -> the survivor's step fails (PeerFailedError: transport heartbeats, the
  progress deadline, or another member's ABORT);
* reform: -> the survivors installed a generation without the victim;
* redo: -> the survivor has synchronised state and completed the step again.

The recovery of a run is the slowest survivor's kill -> completed step. Prints every run,
then per size the median and max, with the split of the median run. Timing uses the
default :class:`~ringtrain.config.Settings` unless ``--heartbeat-timeout`` /
``--progress-floor`` say otherwise. Loopback with many processes on few cores is CPU-bound:
read these as the protocol's reaction times, not a LAN's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ..config import Settings
from ..node.node import Node
from ..ring import runner
from ..testing import LocalCluster, node_id
from ..train.datasets import load_digits
from ..train.nn import Dense, ReLU, Sequential
from ..train.optim import SGD
from ..train.trainer import Trainer

BATCH = 16  # samples per member per step; the global batch is fixed at BATCH * nodes


class _Times(logging.Handler):
    """Records when this node's trainer saw a step fail and the ring re-form."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.failed: float | None = None
        self.reformed: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if self.failed is None and "failed" in text and "re-forming" in text:
            self.failed = record.created
        elif self.failed is not None and self.reformed is None and "re-formed" in text:
            self.reformed = record.created


def _arm_suicide(fraction: float, stamp: Path) -> dict:
    """In the victim only: SIGKILL this process once it has received ``fraction`` of the
    segments of the next all_reduce after arming (the time written first)."""
    original = runner.RingRunner.take_segment
    armed = {"on": False, "count": 0}

    def accept(self, collective, view, sequence, message, expected, *rest):  # type: ignore[no-untyped-def]
        original(self, collective, view, sequence, message, expected, *rest)
        if armed["on"] and collective.name == "all_reduce":
            armed["count"] += 1
            if armed["count"] >= max(1, int(fraction * len(collective.plan.receives))):
                phase = "reduce-scatter" if expected.reduce else "all-gather"
                stamp.write_text(json.dumps({"time": time.time(), "phase": phase}))
                os.kill(os.getpid(), signal.SIGKILL)

    runner.RingRunner.take_segment = accept  # type: ignore[method-assign]
    return armed


def _work(node: Node, victim: str, kill_step: int, steps: int, fraction: float,
          stamp: str) -> dict:
    times = _Times()
    logging.getLogger("ringtrain").addHandler(logging.NullHandler())  # the table is the output
    logger = logging.getLogger("ringtrain.train")
    logger.addHandler(times)
    logger.setLevel(logging.INFO)
    armed = _arm_suicide(fraction, Path(stamp)) if node.node_id == victim else None
    digits = load_digits()
    model = Sequential(Dense(64, 32), ReLU(), Dense(32, 10), seed=0, dtype=np.float32)
    trainer = Trainer(node, model, SGD(model.params, lr=0.1, momentum=0.9), digits.x, digits.y,
                      batch_size=BATCH, global_batch_size=BATCH * node.world_size,
                      adaptive=False)
    completed: dict[int, float] = {}
    while trainer.step_count < steps:
        if armed is not None and trainer.step_count == kill_step - 1:
            armed["on"] = True
        report = trainer.step()
        completed[report.step] = time.time()
    return {"failed": times.failed, "reformed": times.reformed, "completed": completed,
            "world_size": node.world_size}


def _one_run(nodes: int, victim_index: int, args: argparse.Namespace,
             settings: Settings) -> dict:
    with tempfile.TemporaryDirectory(prefix="ringtrain-recovery-") as directory:
        stamp = Path(directory) / "killed"
        victim = node_id(victim_index)
        cluster = LocalCluster(_work, nodes, args=(victim, args.kill_step, args.steps,
                                                   args.fraction, str(stamp)),
                               timeout=args.timeout, job=f"recovery-{nodes}",
                               settings=settings)
        results = cluster.start().results(allow_failed=[victim_index])
        killed = json.loads(stamp.read_text())
    survivors = [r for i, r in enumerate(results) if i != victim_index]
    rows = []
    for r in survivors:
        done = min(t for t in r["completed"].values() if t > killed["time"])
        rows.append({"total": done - killed["time"],
                     "detect": (r["failed"] or done) - killed["time"],
                     "reform": (r["reformed"] or done) - (r["failed"] or done),
                     "redo": done - (r["reformed"] or done)})
    slowest = max(rows, key=lambda row: row["total"])
    return {"nodes": nodes, "victim": victim, "phase": killed["phase"], **slowest,
            "world_after": survivors[0]["world_size"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of ``ringtrain bench-recovery``."""
    parser.add_argument("--nodes", type=int, nargs="+", default=[4, 8],
                        help="ring sizes to measure (default: 4 8)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="kills per size; the victim cycles lowest, middle, highest rank")
    parser.add_argument("--fraction", type=float, default=0.25,
                        help="the victim dies after this fraction of its all-reduce receives "
                             "(0.25: reduce-scatter, 0.75: all-gather)")
    parser.add_argument("--kill-step", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps each run trains")
    parser.add_argument("--heartbeat-timeout", type=float, default=None,
                        help="seconds of silence before a peer is suspected (default: the "
                             "Settings default)")
    parser.add_argument("--progress-floor", type=float, default=None,
                        help="floor of the adaptive progress deadline, seconds")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="deadline of each run, seconds")


def run(args: argparse.Namespace) -> int:
    """Measure and print; returns the exit code."""
    overrides = {name: value for name, value in (
        ("heartbeat_timeout", args.heartbeat_timeout),
        ("progress_floor", args.progress_floor)) if value is not None}
    # the ring path, whose segments the victim counts (the small gradient would otherwise
    # take the one-round direct all-reduce, and the victim would never die)
    settings = Settings.from_env(direct_bytes=0, **overrides)
    if not 1 <= args.kill_step < args.steps or not 0 < args.fraction < 1:
        print("bench-recovery: need 1 <= --kill-step < --steps and 0 < --fraction < 1")
        return 2
    print(f"recovery after SIGKILL on loopback: heartbeat_timeout "
          f"{settings.heartbeat_timeout:g} s, progress_floor {settings.progress_floor:g} s, "
          f"kill at step {args.kill_step}, {args.fraction:g} of the all-reduce received")
    print(f"{'nodes':>5} {'victim':>8} {'phase':>15} {'detect':>7} {'reform':>7} {'redo':>6} "
          f"{'total':>7}")
    for nodes in args.nodes:
        if nodes < 3:
            print(f"bench-recovery: {nodes} nodes: need at least 3 (a majority must survive)")
            return 2
        runs = []
        for repeat in range(args.repeats):
            victim_index = [0, nodes // 2, nodes - 1][repeat % 3]
            outcome = _one_run(nodes, victim_index, args, settings)
            runs.append(outcome)
            print(f"{nodes:>5} {outcome['victim']:>8} {outcome['phase']:>15} "
                  f"{outcome['detect']:>6.2f}s {outcome['reform']:>6.2f}s "
                  f"{outcome['redo']:>5.2f}s {outcome['total']:>6.2f}s", flush=True)
        totals = sorted(r["total"] for r in runs)
        median_run = min(runs, key=lambda r: abs(r["total"] - statistics.median(totals)))
        print(f"{nodes} nodes: recovery median {statistics.median(totals):.2f} s, max "
              f"{totals[-1]:.2f} s over {len(runs)} kills (median run: detect "
              f"{median_run['detect']:.2f} s, reform {median_run['reform']:.2f} s, redo "
              f"{median_run['redo']:.2f} s)", flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m ringtrain.bench.recovery")
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
