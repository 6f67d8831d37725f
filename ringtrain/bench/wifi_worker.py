"""One emulated device of ``ringtrain bench-wifi``: trains the benchmark's model with one method
and prints its accuracy curve.

    python -m ringtrain.bench.wifi_worker CONFIG_JSON

Every method trains the same MLP (:func:`model_of`) on the same digits split from the same
initial parameters and data order; rank 0 evaluates the shared model on the test set after
every step (synchronous methods) or every applied round (rounds), and prints ``POINT seconds
accuracy samples`` lines as it goes, so the parent keeps the curve of a run it had to stop.
Evaluation time is taken off the clock: the others wait for rank 0 at the next collective
exactly as long as it evaluated. The ``ddp`` method runs in :mod:`ringtrain.bench.ddp_baseline`.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np

from ..comm.security import read_key_file
from ..node.node import Node
from ..train.datasets import load_digits
from ..train.nn import Dense, ReLU, Sequential, accuracy
from ..train.optim import Adam
from ..train.rounds import DiLoCo
from ..train.schedule import Cosine
from ..train.trainer import StepReport, Trainer

POINT = "POINT "
DONE = "DONE "
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def model_of(hidden: list[int]) -> Sequential:
    """The benchmark's MLP on 8x8 digits: 64 -> hidden... -> 10, ReLU, float32."""
    widths = [64, *hidden, 10]
    layers: list[Any] = []
    for i in range(len(widths) - 1):
        layers += [Dense(widths[i], widths[i + 1]), ReLU()]
    return Sequential(*layers[:-1], seed=0, dtype=np.float32)


def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train x, train y, test x, test y): the digits that ship with ringtrain, split 80/20."""
    train, test = load_digits().split(TEST_FRACTION, seed=SPLIT_SEED)
    return train.x, train.y, test.x, test.y


def rounds_of(config: dict[str, Any]) -> DiLoCo | None:
    """The round settings of a method (None: synchronous)."""
    method = config["method"]
    if method in ("diloco", "streaming"):
        return DiLoCo(inner_steps=config["inner_steps"], outer_lr=config["outer_lr"],
                      momentum=config["outer_momentum"], compression="int4", overlap=True,
                      fragments=config["fragments"] if method == "streaming" else 1)
    if method == "async":
        return DiLoCo(inner_steps=config["inner_steps"], outer_lr=config["outer_lr"],
                      momentum=config["outer_momentum"], compression="int4",
                      round_seconds=config["round_seconds"],
                      warmup_rounds=config["warmup_rounds"])
    return None


def schedule_of(config: dict[str, Any]) -> Cosine | None:
    """Every method's learning-rate schedule (None: constant)."""
    return Cosine() if config["lr_schedule"] == "cosine" else None


COMPRESSION = {"sync": None, "int8": "int8", "powersgd": "powersgd:4"}


class _Clock:
    """Wall time since the start minus the time spent evaluating; and the CPU time this
    process spent meanwhile off the main thread (the node's engine and ZeroMQ's I/O thread:
    what the ring costs the device, out of the same CPU budget as training)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.paused = 0.0
        self.process_cpu, self.main_cpu = time.process_time(), time.thread_time()

    def now(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def ring_cpu_share(self) -> float:
        """CPU time off the main thread over all of this process's, since the start."""
        process = time.process_time() - self.process_cpu
        main = time.thread_time() - self.main_cpu
        return max(0.0, process - main) / process if process > 0 else 0.0


def run(config: dict[str, Any]) -> dict[str, Any]:
    """Train on this device; rank 0 prints the curve. Returns this device's summary."""
    rank, addresses = config["rank"], config["addresses"]
    x, y, test_x, test_y = data()
    model = model_of(config["hidden"])
    evaluator = model_of(config["hidden"])
    node = Node(addresses, listen=addresses[rank], job=f"wifi-{config['method']}",
                node_id=f"device-{rank}", key=read_key_file(config["key_file"]))
    with node:
        trainer = Trainer(node, model, Adam(model.params, lr=config["lr"]), x, y,
                          batch_size=config["batch"], adaptive=False, seed=config["seed"],
                          compression=COMPRESSION.get(config["method"]),
                          rounds=rounds_of(config), lr_schedule=schedule_of(config))
        node.barrier()
        clock = _Clock()
        seen = {"rounds": -1, "samples": 0}

        def evaluate(report: StepReport) -> None:
            seen["samples"] += len(report.indices)
            if rank != 0:
                return
            if trainer.rounds is not None:
                if trainer.rounds.rounds_done == seen["rounds"]:
                    return
                seen["rounds"] = trainer.rounds.rounds_done
            paused = time.perf_counter()
            evaluator.load_params(trainer.shared_params)
            score = accuracy(evaluator.forward(test_x), test_y)
            print(f"{POINT}{clock.now():.4f} {score:.5f} {seen['samples']}", flush=True)
            clock.paused += time.perf_counter() - paused

        trainer.fit(config["epochs"], on_step=evaluate)
        elapsed, ring_cpu = clock.now(), clock.ring_cpu_share()
        if rank == 0:
            evaluator.load_params(trainer.shared_params)
            score = accuracy(evaluator.forward(test_x), test_y)
            print(f"{POINT}{elapsed:.4f} {score:.5f} {seen['samples']}", flush=True)
        node.barrier()
    return {"samples": seen["samples"], "seconds": elapsed, "ring_cpu": ring_cpu}


def main(argv: list[str]) -> int:
    """Entry point of one device process."""
    config = json.loads(argv[0])
    if config["method"] == "ddp":
        from .ddp_baseline import run as run_ddp
        summary = run_ddp(config)
    else:
        summary = run(config)
    print(DONE + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
