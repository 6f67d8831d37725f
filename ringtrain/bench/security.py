"""``ringtrain bench-security``: what encryption costs, measured.

    ringtrain bench-security                      # N = 2 and 4, 4 KiB / 1 MiB / 16 MiB
    ringtrain bench-security --nodes 3 --sizes 65536 --repeats 20
    ringtrain bench-security --emulated-rate 1000 # the same behind a 1 Gbit/s bottleneck (root)

Each node process times ``all_reduce`` of float32 arrays twice: over its keyed node (CURVE:
authenticated and encrypted, the default) and over a second node of the same processes started
with ``insecure=True`` (clear text, allowed because everything is on loopback). The table shows
the median time of each and their ratio, CURVE over clear text.

``--emulated-rate`` reruns the benchmark inside a fresh network namespace (``ringtrain.lab.netns``)
whose loopback is shaped to that many Mbit/s with tbf: the nodes then share one shaped link,
so the rate per ring link is about rate / N, as on a hub. Needs Linux and root.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

from ..config import ENV_PREFIX, Settings
from ..node.node import Node
from ..testing import free_ports, run_local

DEFAULT_SIZES = (4 << 10, 1 << 20, 16 << 20)
DEFAULT_NODES = (2, 4)


def _repeats_for(size: int, repeats: int | None) -> int:
    if repeats is not None:
        return repeats
    return 40 if size <= 64 << 10 else 10 if size <= 4 << 20 else 4


def _time_all_reduce(node: Node, sizes: list[int], repeats: int | None) -> dict[int, float]:
    """Median seconds of one all_reduce per size, on every member at once."""
    medians = {}
    for size in sizes:
        array = np.ones(max(1, size // 4), dtype=np.float32)
        node.all_reduce(array)  # warm-up: connections, buffers
        times = []
        for _ in range(_repeats_for(size, repeats)):
            node.barrier()
            start = time.perf_counter()
            node.all_reduce(array)
            times.append(time.perf_counter() - start)
        # the ring is as slow as its slowest member: take the maximum over members
        medians[size] = float(node.all_reduce(np.array([statistics.median(times)]),
                                              op="max")[0])
    return medians


def _bench_worker(node: Node, sizes: list[int], repeats: int | None) -> dict[str, Any]:
    """Runs in every node process: time the keyed node, then a clear-text twin."""
    curve = _time_all_reduce(node, sizes, repeats)
    port = free_ports(1)[0]
    ports = node.all_gather(np.array([port], dtype=np.int64))[:, 0]
    for name in ("KEY", "KEY_FILE"):  # the twin must not pick a key up from the environment
        os.environ.pop(ENV_PREFIX + name, None)
    with Node([f"127.0.0.1:{p}" for p in ports], listen=f"127.0.0.1:{ports[node.rank]}",
              job=f"{node.job}-clear", node_id=node.node_id, settings=node.settings,
              insecure=True) as clear_node:
        clear = _time_all_reduce(clear_node, sizes, repeats)
    node.barrier()  # nobody closes its clear-text node while another still uses it
    return {"curve": curve, "clear": clear}


def measure(nodes: list[int], sizes: list[int], repeats: int | None = None,
            timeout: float = 300.0) -> list[dict[str, Any]]:
    """One row per (node count, size): median seconds with CURVE and in clear text.

    Returns:
        dicts with keys ``nodes``, ``bytes``, ``curve_s``, ``clear_s``, ``ratio``.
    """
    rows = []
    # TCP between the nodes: on one host they would pass segments through shared memory,
    # which is neither encrypted nor on the shaped link, and both columns would time memcpy
    settings = dataclasses.replace(Settings.from_env(), shm_lane_bytes=0)
    for n in nodes:
        result = run_local(_bench_worker, n, args=(sizes, repeats), timeout=timeout,
                           job="bench-security", settings=settings)[0]
        for size in sizes:
            curve, clear = result["curve"][size], result["clear"][size]
            rows.append({"nodes": n, "bytes": size, "curve_s": curve, "clear_s": clear,
                         "ratio": curve / clear if clear > 0 else float("inf")})
    return rows


def format_rows(rows: list[dict[str, Any]], title: str) -> str:
    """The table printed by the command."""
    lines = [title, f"{'N':>3} {'size':>9} {'clear text':>12} {'CURVE':>12} {'CURVE/clear':>12}"
                    f" {'CURVE MB/s':>11}"]
    for row in rows:
        # bytes a member sends in a ring all-reduce: 2 (N-1)/N of the buffer
        moved = 2 * (row["nodes"] - 1) / row["nodes"] * row["bytes"]
        lines.append(f"{row['nodes']:>3} {_size(row['bytes']):>9} "
                     f"{row['clear_s'] * 1e3:>9.2f} ms {row['curve_s'] * 1e3:>9.2f} ms "
                     f"{row['ratio']:>11.2f}x {moved / row['curve_s'] / 1e6:>11.1f}")
    return "\n".join(lines)


def _size(nbytes: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ringtrain bench-security``."""
    parser.add_argument("--nodes", type=int, nargs="+", default=list(DEFAULT_NODES),
                        help="ring sizes to measure (default: 2 4)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES),
                        help="array sizes in bytes (default: 4 KiB, 1 MiB, 16 MiB)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed all-reduces per size (default: 40 / 10 / 4 by size)")
    parser.add_argument("--emulated-rate", type=float, default=None, metavar="MBIT",
                        help="run inside a network namespace whose loopback is shaped to MBIT "
                             "Mbit/s (Linux, root)")


def run(args: argparse.Namespace) -> int:
    """Measure and print the table."""
    if min(args.nodes) < 1 or min(args.sizes) < 4:
        print("ringtrain: --nodes must be >= 1 and --sizes >= 4 bytes", file=sys.stderr)
        return 2
    if args.emulated_rate is not None:
        return _run_emulated(args)
    rows = measure(args.nodes, args.sizes, args.repeats)
    print(format_rows(rows, "all_reduce on loopback, median per call (max over members)"))
    return 0


def _run_emulated(args: argparse.Namespace) -> int:
    """Rerun this command, without ``--emulated-rate``, in a namespace with shaped loopback."""
    from ..lab.netns import EmulatedLan  # only here: it needs root and iproute2

    with EmulatedLan(1) as lan:
        shaped = lan.run(0, ["tc", "qdisc", "replace", "dev", "lo", "root", "tbf", "rate",
                             f"{args.emulated_rate}mbit", "burst", "1mb", "latency", "100ms"])
        if shaped.returncode != 0:
            print(f"ringtrain: cannot shape loopback: {shaped.stderr.strip()}", file=sys.stderr)
            return 1
        argv = [sys.executable, "-m", "ringtrain", "bench-security",
                "--nodes", *map(str, args.nodes), "--sizes", *map(str, args.sizes)]
        if args.repeats is not None:
            argv += ["--repeats", str(args.repeats)]
        print(f"inside namespace {lan.namespace(0)}, loopback shaped to "
              f"{args.emulated_rate:g} Mbit/s (shared by all nodes):", flush=True)
        done = subprocess.run(lan.command(0, argv), check=False, timeout=1800)
        return done.returncode
