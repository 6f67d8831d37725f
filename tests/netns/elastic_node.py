"""One training node for the elastic netns tests: trains the digits MLP with a fixed global
batch on a static ring, and reports through files in ``--out``.

Run inside a namespace with RINGTRAIN_KEY_FILE set:
python tests/netns/elastic_node.py --node-id N --listen ADDR:PORT --peers A:P B:P ... --out DIR

Files (written atomically): ``<id>.json`` after every step (step, generation, members, time),
``<id>.result.json`` at the end (every step's content hash, every view installed, final state)
with ``<id>.npy`` (the parameters), or ``<id>.hang`` (node state and stacks) if it is still
running at ``--deadline`` or when ``<out>/report-now`` appears. Training stops at ``--steps``
or at the step written to ``<out>/target``, whichever the file says once it exists.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from ringtrain.config import Settings
from ringtrain.node.node import Node
from ringtrain.train.datasets import load_digits
from ringtrain.train.nn import Dense, Sequential, Tanh
from ringtrain.train.optim import SGD
from ringtrain.train.trainer import Trainer

BATCH, GLOBAL_BATCH = 16, 64


def write_json(path: Path, value: object) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value))
    os.replace(temporary, path)


def target(out: Path, default: int) -> int:
    try:
        return int((out / "target").read_text())
    except (OSError, ValueError):
        return default


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--peers", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--job", default="elastic-netns")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pace", type=float, default=0.0, help="seconds of sleep per step")
    parser.add_argument("--deadline", type=float, default=60.0, help="seconds from start")
    parser.add_argument("--heartbeat-timeout", type=float, default=1.0,
                        help="seconds of silence before a peer is suspected")
    parser.add_argument("--progress-floor", type=float, default=Settings().progress_floor,
                        help="seconds a collective waits for a peer's data, at least")
    args = parser.parse_args()
    out = Path(args.out)
    me = args.node_id
    node_ref: list[Node] = []
    deadline = time.time() + args.deadline

    def watchdog() -> None:
        while time.time() < deadline and not (out / "report-now").exists():
            time.sleep(0.1)
        with open(out / f"{me}.hang", "w") as report:
            state = node_ref[0].state() if node_ref else "node not constructed"
            report.write(f"node {me} did not finish in time; state: {state}\n")
            report.flush()
            faulthandler.dump_traceback(report, all_threads=True)
        os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    settings = Settings.from_env(heartbeat_timeout=args.heartbeat_timeout,
                                 progress_floor=args.progress_floor, reform_timeout=20.0)
    views: list[tuple[float, int, list[str]]] = []
    with Node(args.peers, listen=args.listen, job=args.job, node_id=me,
              settings=settings) as node:
        node_ref.append(node)
        node.on_view_change(lambda v: views.append((time.time(), v.generation, list(v.members))))
        views.append((time.time(), node.generation, list(node.members)))
        digits = load_digits()
        model = Sequential(Dense(64, 16), Tanh(), Dense(16, 10), seed=1, dtype=np.float64)
        trainer = Trainer(node, model, SGD(model.params, lr=0.1, momentum=0.9), digits.x,
                          digits.y, batch_size=BATCH, global_batch_size=GLOBAL_BATCH,
                          adaptive=False, rejoin_timeout=args.deadline)
        # "generation:step" -> content hash of the model after that step in that generation
        hashes = {f"{node.generation}:{trainer.step_count}": trainer.version.content_hash}
        while trainer.step_count < target(out, args.steps):
            trainer.step()
            hashes[f"{node.generation}:{trainer.step_count}"] = trainer.version.content_hash
            write_json(out / f"{me}.json", {"step": trainer.step_count,
                                             "generation": node.generation,
                                             "members": list(node.members), "time": time.time()})
            time.sleep(args.pace)
        np.save(out / f"{me}.npy", model.params)
        write_json(out / f"{me}.result.json", {
            "node": me, "step": trainer.step_count, "hash": trainer.version.content_hash,
            "position": [trainer.position.epoch, trainer.position.position],
            "generation": node.generation, "members": list(node.members),
            "reforms": trainer.reforms, "hashes": hashes, "views": views,
            "dropped": node.state()["dropped"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
