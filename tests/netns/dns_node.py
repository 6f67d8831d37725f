"""One training node whose peers come from DNS, for the netns DNS discovery test.

Run inside a namespace whose /etc/netns/NAME/resolv.conf names the test's DNS server, with
RINGTRAIN_KEY_FILE set: python tests/netns/dns_node.py --node-id N --port P --name DNS_NAME
--out DIR. It trains the digits MLP with a fixed global batch (the Trainer admits joiners and
drops the dead), and after every step writes ``<out>/<id>.json`` (step, generation, members,
the endpoints its DNS lookups list now). It stops when ``<out>/stop`` appears, or at
``--deadline``, where it writes ``<id>.hang`` with its state and stacks and exits 3.
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


def write_json(path: Path, value: object) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value))
    os.replace(temporary, path)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--deadline", type=float, default=90.0)
    args = parser.parse_args()
    out, me = Path(args.out), args.node_id
    node_ref: list[Node] = []

    def watchdog() -> None:
        deadline = time.time() + args.deadline
        while time.time() < deadline and not (out / "stop").exists():
            time.sleep(0.1)
        if (out / "stop").exists():
            return
        with open(out / f"{me}.hang", "w") as report:
            report.write(f"node {me}: state {node_ref[0].state() if node_ref else None}\n")
            report.flush()
            faulthandler.dump_traceback(report, all_threads=True)
        os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    settings = Settings.from_env(reform_timeout=30.0, dns_interval=1.0)
    with Node(listen=f"0.0.0.0:{args.port}", job="dns-netns", node_id=me, min_size=2,
              settings=settings, peers_dns=args.name) as node:
        node_ref.append(node)
        digits = load_digits()
        model = Sequential(Dense(64, 16), Tanh(), Dense(16, 10), seed=1, dtype=np.float64)
        trainer = Trainer(node, model, SGD(model.params, lr=0.1, momentum=0.9), digits.x,
                          digits.y, batch_size=16, global_batch_size=64, adaptive=False,
                          rejoin_timeout=args.deadline)
        while not (out / "stop").exists():
            trainer.step()
            write_json(out / f"{me}.json", {
                "step": trainer.step_count, "generation": node.generation,
                "members": list(node.members), "hash": trainer.version.content_hash,
                "dns": node.state()["peers_dns"]})
            time.sleep(0.02)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
