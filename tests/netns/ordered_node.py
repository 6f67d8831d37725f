"""One node of ``test_ring_order_netns.py``: forms a ring that orders itself by measured links,
runs collectives whose results the test can check, then (all but the leaver) re-forms after
one node leaves and does it again. Prints one JSON line per phase."""

from __future__ import annotations

import argparse
import json
import os
import threading

import numpy as np

from ringtrain.comm.security import key_from_environment
from ringtrain.config import Settings
from ringtrain.errors import PeerFailedError
from ringtrain.node.node import Node


def contribution(index: int, size: int) -> np.ndarray:
    """Node ``index``'s input: small integers, so float sums are exact in any order."""
    return np.random.default_rng(index).integers(-8, 9, size=size).astype(np.float32)


def phase(node: Node, index: int) -> dict:
    size = 3 * 1024 * 1024 + 5  # a few segments per chunk
    total = node.all_reduce(contribution(index, size))
    state = node.state()
    return {"members": list(node.members), "rank": node.rank,
            "links": state["link_rates_mbit"], "slow": state["slow_links"],
            "compressed": node.all_reduce(contribution(index, size),
                                          compression="int8")[:: 4099].tolist(),
            "sum": total[:: 4099].tolist(),
            "gathered": node.all_gather(np.array([index])).ravel().tolist(),
            "broadcast": int(node.broadcast(np.array([index]), root=0)[0]),
            "scattered": node.reduce_scatter(contribution(index, 1001)).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--peers", nargs="+", required=True)
    parser.add_argument("--leaver", type=int, required=True)
    parser.add_argument("--probe-bytes", type=int, required=True)
    parser.add_argument("--deadline", type=float, required=True)
    args = parser.parse_args()
    settings = Settings.from_env(link_probe_bytes=args.probe_bytes, collective_timeout=60.0)
    with Node(args.peers, listen=args.peers[args.index], job="ordered",
              node_id=f"node-{args.index:02d}", key=key_from_environment(),
              settings=settings, min_size=2) as node:

        def hung() -> None:  # a bound on the whole run: report where this node is stuck
            print(json.dumps({"hung": repr(node.state())}), flush=True)
            os._exit(3)

        watchdog = threading.Timer(args.deadline, hung)
        watchdog.daemon = True
        watchdog.start()
        print(json.dumps(phase(node, args.index)), flush=True)
        node.barrier(timeout=60.0)
        if args.index == args.leaver:
            node.leave()
            return
        # the leave re-forms the ring; on a busy machine a member may also be suspected
        # (and re-admitted) meanwhile: like any user of the API, re-form and redo the phase
        for attempt in range(3):
            try:
                node.barrier(timeout=60.0)
                report = phase(node, args.index)
                break
            except PeerFailedError:
                if attempt == 2:
                    raise
                node.reform(timeout=60.0)
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
