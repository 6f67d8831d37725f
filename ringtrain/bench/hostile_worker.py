"""The training script each node runs under ``ringtrain node`` in ``bench-hostile``.

    ringtrain node ringtrain/bench/hostile_worker.py OUT.jsonl SECONDS

Trains the demo classifier with whoever joins, for SECONDS after the ring formed, and writes
one JSON line per step: monotonic time, step, world size, this process's open descriptors and
the node's connection budgets; and every half second one with the descriptors alone (so a
stall shows too). Then leaves the ring.
"""

from __future__ import annotations

import json
import sys
import threading
import time

from ringtrain.cli.demo import demo_model
from ringtrain.comm.zap import open_fds
from ringtrain.node.launch import join
from ringtrain.train import Trainer, schema_of, training_facts

BATCH = 64


def main() -> int:
    out, seconds = sys.argv[1], float(sys.argv[2])
    train, _test, model, optimizer = demo_model(seed=0)
    schema = schema_of(training_facts(model, train.x, train.y, batch_size=BATCH, seed=0,
                                      global_batch_size=BATCH))
    with join(schema=schema) as node, open(out, "w") as log:
        trainer = Trainer(node, model, optimizer, train.x, train.y, batch_size=BATCH,
                          global_batch_size=BATCH)
        stop = time.monotonic() + seconds
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
            if now > stop:
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
