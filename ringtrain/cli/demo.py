"""``ringtrain demo``: several local nodes train one classifier on the bundled 8x8 digits, beside
one node training alone on the same samples.

Each node is its own process on 127.0.0.1 (:func:`ringtrain.testing.run_local`). Every node
prints one line per epoch; the summary compares test accuracy, time and bytes sent with the
node alone, which trains with the whole global batch (the same samples per step, the same
number of steps). The command exits 0 when the nodes reach ``TARGET_ACCURACY`` on the test set.
With ``--compression`` the nodes' gradient all-reduce is compressed (the node alone never is),
and the summary shows what that cost in test accuracy.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np

from ..errors import ConfigError
from ..node.node import Node
from ..ring.compression import get_codec
from ..testing import run_local
from ..train.datasets import Dataset, load_digits
from ..train.nn import Dense, ReLU, Sequential, accuracy, softmax_cross_entropy
from ..train.optim import Adam
from ..train.trainer import StepReport, Trainer

TARGET_ACCURACY = 0.95
TEST_FRACTION = 0.2
BATCH_PER_NODE = 16
LEARNING_RATE = 0.01
HIDDEN = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the subcommand."""
    parser.add_argument("--nodes", type=int, default=4, help="local node processes (default 4)")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the split, the initial model and the data order")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the run of one node alone")
    parser.add_argument("--compression", default=None, metavar="CODEC",
                        help="compress the nodes' gradient all-reduce: fp16, int8, topk or "
                             "topk:RATIO (default: none)")


def demo_model(seed: int, lr: float = LEARNING_RATE
               ) -> tuple[Dataset, Dataset, Sequential, Adam]:
    """The demo's data split, model and optimizer (also ``ringtrain node``'s default job)."""
    train, test = load_digits().split(TEST_FRACTION, seed)
    model = Sequential(Dense(64, HIDDEN), ReLU(), Dense(HIDDEN, 10), seed=seed)
    return train, test, model, Adam(model.params, lr=lr)


def epoch_printer(trainer: Trainer, test: Dataset, epochs: int, label: str
                  ) -> Callable[[StepReport], None]:
    """An ``on_step`` callback printing one line per epoch: loss, test accuracy, speed."""
    node, model = trainer.node, trainer.model
    epoch_started = time.perf_counter()
    samples = steps = 0

    def progress(report: StepReport) -> None:
        nonlocal samples, steps, epoch_started
        samples += len(report.indices)
        steps += 1
        if not report.end_of_epoch:
            return
        now = time.perf_counter()
        logits = model.forward(test.x)
        test_loss, _ = softmax_cross_entropy(logits, test.y)
        name = f"{label} {node.rank}/{node.world_size}" if node.world_size > 1 else label
        # one write per line, so the lines of concurrent nodes do not interleave
        sys.stdout.write(
            f"[{name}] epoch {report.epoch + 1:2d}/{epochs}  loss {report.loss:.3f}  "
            f"test loss {test_loss:.3f}  test accuracy {accuracy(logits, test.y):.3f}  "
            f"{samples / (now - epoch_started):7,.0f} samples/s  "
            f"mean batch {samples / steps:4.1f} of "
            f"{trainer.global_batch_size or trainer.batch_size * node.world_size}\n")
        sys.stdout.flush()
        samples, steps, epoch_started = 0, 0, now

    return progress


def train_node(node: Node, epochs: int, seed: int, batch_size: int, label: str,
               compression: str | None = None) -> dict:
    """Train the demo model on this node, printing a line per epoch; returns its summary."""
    train, test, model, optimizer = demo_model(seed)
    trainer = Trainer(node, model, optimizer, train.x, train.y, batch_size=batch_size,
                      seed=seed, compression=compression)
    started = time.perf_counter()
    trainer.fit(epochs, on_step=epoch_printer(trainer, test, epochs, label))
    seconds = time.perf_counter() - started
    return {"accuracy": accuracy(model.forward(test.x), test.y), "seconds": seconds,
            "bytes": node.bytes_sent, "version": str(trainer.version),
            "params": model.params.copy()}


def run(args: argparse.Namespace) -> int:
    """Train on ``--nodes`` local nodes, then one node alone; print the comparison."""
    if args.nodes < 1 or args.epochs < 1 or args.seed < 0:
        raise ConfigError("--nodes and --epochs must be >= 1 and --seed >= 0")
    codec = get_codec(args.compression)  # a bad name fails here, before any process starts
    compression = None if codec is None else codec.spec()
    global_batch = BATCH_PER_NODE * args.nodes
    print(f"{args.nodes} nodes train a {HIDDEN}-unit MLP on the 8x8 digits "
          f"({1 - TEST_FRACTION:.0%} train, {TEST_FRACTION:.0%} test) for {args.epochs} epochs, "
          f"{BATCH_PER_NODE} samples per node per step"
          + (f", gradients compressed with {compression}" if compression else ""), flush=True)
    started = time.perf_counter()
    nodes = run_local(train_node, args.nodes, args=(args.epochs, args.seed, BATCH_PER_NODE,
                                                    "node", compression), timeout=120, job="demo")
    wall = time.perf_counter() - started
    reached = nodes[0]["accuracy"]
    identical = all(np.array_equal(n["params"], nodes[0]["params"]) for n in nodes)
    with_codec = f" ({compression})" if compression else ""
    lines = [f"{args.nodes} nodes{with_codec}: test accuracy {reached:.3f}, training "
             f"{nodes[0]['seconds']:.1f} s ({wall:.1f} s with start-up); sent per node "
             + ", ".join(f"{n['bytes'] / 1e6:.1f} MB" for n in nodes),
             f"  model {nodes[0]['version']}, identical on every node: "
             f"{'yes' if identical else 'NO'}"]
    if not args.no_baseline:
        print(f"one node alone, global batch {global_batch} (the same samples per step):",
              flush=True)
        started = time.perf_counter()
        alone = run_local(train_node, 1, args=(args.epochs, args.seed, global_batch, "alone"),
                          timeout=120, job="demo-alone")[0]
        wall = time.perf_counter() - started
        gap = float(np.abs(alone["params"] - nodes[0]["params"]).max())
        cause = f"{compression} compression" if compression else "float32 rounding"
        lines.append(f"1 node alone: test accuracy {alone['accuracy']:.3f}, training "
                     f"{alone['seconds']:.1f} s ({wall:.1f} s with start-up); largest parameter "
                     f"difference from the {args.nodes} nodes' model {gap:.1e} ({cause})")
        if compression:
            points = 100 * (reached - alone["accuracy"])
            lines.append(f"accuracy with {compression} {reached:.3f} vs uncompressed "
                         f"{alone['accuracy']:.3f} (the node alone): {points:+.1f} points")
    met = reached >= TARGET_ACCURACY
    lines.append(f"target test accuracy {TARGET_ACCURACY:.2f}: {'met' if met else 'NOT met'}")
    lines.append("this is a correctness demo: a tiny model (4,810 parameters) on local "
                 "processes sharing this machine's cores, so communication outweighs compute "
                 "and the nodes are not faster than one alone; what it shows is that every "
                 "node ends with the same model, as accurate as training alone. For speed-up "
                 "on real devices see `ringtrain bench-scaling` (README, Performance)")
    print("summary:\n  " + "\n  ".join(lines))
    return 0 if met else 1
