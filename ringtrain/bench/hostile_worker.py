"""The training script each node runs under ``ringtrain node`` in ``bench-hostile``.

    ringtrain node ringtrain/bench/hostile_worker.py OUT.jsonl

Trains the demo classifier with whoever joins and writes one JSON line per step: monotonic
time, step, world size, this process's open descriptors and the node's connection budgets;
and every half second one with the descriptors alone (so a stall shows too). Leaves the ring
at the step the bench writes into the file ``stop`` beside OUT.jsonl: every node at the same
step, so none is left alone below ``--min-nodes``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from ringtrain.cli.demo import demo_model
from ringtrain.comm.zap import open_fds
from ringtrain.node.launch import join
from ringtrain.train import Trainer

BATCH = 64


def main() -> int:
    out = sys.argv[1]
    stop_file = Path(out).with_name("stop")
    train, _test, model, optimizer = demo_model(seed=0)
    # the ring formed under `ringtrain node`; the Trainer checks the members train alike
    with join() as node, open(out, "w") as log:
        trainer = Trainer(node, model, optimizer, train.x, train.y, batch_size=BATCH,
                          global_batch_size=BATCH)
        last_budget = 0.0

        def on_step(report) -> None:
            nonlocal last_budget
            now = time.monotonic()
            row = {"t": now, "step": report.step, "world": node.world_size, "fds": open_fds()}
            if now - last_budget > 1.0:
                last_budget = now
                state = node.state()
                row["budget"] = state["connections"]
                row["candidates"] = state["candidates"]
            log.write(json.dumps(row) + "\n")
            log.flush()
            if stop_file.exists() and report.step >= int(stop_file.read_text() or 10**9):
                trainer.request_leave()

        done = threading.Event()

        def sample_fds() -> None:  # also while training stalls
            while not done.wait(0.5):
                log.write(json.dumps({"t": time.monotonic(), "fds": open_fds()}) + "\n")
                log.flush()

        sampler = threading.Thread(target=sample_fds, daemon=True)
        sampler.start()
        try:
            trainer.fit(10**6, on_step=on_step)
        finally:
            done.set()
            sampler.join(2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
