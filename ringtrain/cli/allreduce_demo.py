"""``ringtrain allreduce-demo``: N local node processes all-reduce arrays, checked against numpy."""

from __future__ import annotations

import argparse
import time

import numpy as np

from ..node.node import Node
from ..testing import run_local


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the subcommand."""
    parser.add_argument("--nodes", type=int, default=4, help="local node processes (default 4)")
    parser.add_argument("--elements", type=int, default=4_000_000,
                        help="float32 elements per all-reduce (default 4,000,000 = 16 MB)")
    parser.add_argument("--rounds", type=int, default=5, help="all-reduces to time (default 5)")


def _node_work(node: Node, elements: int, rounds: int) -> dict:
    data = np.random.default_rng(node.rank).standard_normal(elements).astype(np.float32)
    node.barrier()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        result = node.all_reduce(data)
        times.append(time.perf_counter() - start)
    return {"rank": node.rank, "checksum": float(result.astype(np.float64).sum()),
            "first": result[:3].tolist(), "best_s": min(times), "sent": node.bytes_sent}


def run(args: argparse.Namespace) -> int:
    """Start the nodes, all-reduce, compare with numpy, print a summary."""
    reports = run_local(_node_work, args.nodes, args=(args.elements, args.rounds), timeout=120)
    expected = sum(np.random.default_rng(r).standard_normal(args.elements).astype(np.float32)
                   for r in range(args.nodes))
    agree = len({r["checksum"] for r in reports}) == 1
    close = np.allclose(reports[0]["first"], expected[:3], rtol=1e-5, atol=1e-5)
    best = min(r["best_s"] for r in reports)
    nbytes = args.elements * 4
    busbw = nbytes / best * 2 * (args.nodes - 1) / args.nodes / 1e9
    for r in reports:
        print(f"node rank {r['rank']}: best {r['best_s'] * 1e3:.1f} ms, "
              f"sent {r['sent'] / 1e6:.1f} MB")
    print(f"{args.nodes} nodes all-reduced {nbytes / 1e6:.1f} MB: best {best * 1e3:.1f} ms, "
          f"busbw {busbw:.2f} GB/s; results identical on every node: {agree}; "
          f"equal to numpy: {close}")
    return 0 if agree and close else 1
