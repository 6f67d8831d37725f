"""``ringtrain bench-cost-model``: all-reduce time for N = 2, 4, 8, 16 devices on an emulated
LAN, beside the ring's cost model with its two constants measured on the same links.

    sudo ringtrain bench-cost-model                       # N = 2,4,8,16
    sudo ringtrain bench-cost-model --nodes 2,4 --sizes 1M --repeats 1     # a quick look

The model: a ring all-reduce of S bytes over N members takes 2(N-1) steps, each moving a chunk
of S/N bytes over every link at once, so

    T(N, S) = 2(N-1) (alpha + S / (N B))

where alpha is the time one step costs beyond its bytes (latency, per-message work) and B the
rate one link carries. Both are measured between two devices of the same emulated LAN, with
the same CPU budget, software and encryption as the ring, and without the all-reduce itself:

* alpha: two members all-reduce 8 bytes round their ring of two (2 steps of 4 bytes; the
  one-round path for small sizes off), 200 times; alpha is half the median time. That is the
  cost of one ring step as the ring pays it, the engine forwarding as data arrives; an
  application's ping-pong of messages costs more per message (a hand-off to the caller and
  back each way: 2-3x here), so it would overstate alpha.
* B: member 0 broadcasts S bytes to member 1, which answers with 4 bytes; B = S / (T - 2 alpha),
  median of 5, with S the largest size measured.

Every device is a network namespace on one bridge, with a CPU budget (a cgroup quota, pinned
to a core; see :mod:`ringtrain.lab.cpu_budget`), by default 0.95 of the machine's cores over N
(16 devices fit two cores at 0.12 each), and its link shaped both ways to ``--rate``, by
default 100 Mbit/s or, for small budgets, what the budget can fill (:data:`RATE_PER_CORE_MBIT`):
24 Mbit/s at 0.12 core, as a small board on a slow link. The all-reduce
runs are those of ``ringtrain bench`` (in place, float32 sum, encrypted), ``--repeats`` fresh
runs per N, each the median of its iterations; the table shows the median and the best run,
the model, measured / model, and the share of CPU periods in which the devices used up their
budget during the runs (near 100%: the devices, not the links, set the pace). Linux and root
only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from ..comm.security import JobKey
from ..errors import ConfigError, RingtrainError
from ..lab import cpu_budget
from ..lab.netns import EmulatedLan
from .allreduce import iterations_for, parse_size
from .allreduce_report import format_size

PORT = 29800
RUN_TIMEOUT_S = 600.0
PING_ROUNDS, STREAM_ROUNDS = 200, 5
RATE_PER_CORE_MBIT = 200.0
"""Link rate a device's CPU budget can fill with room to spare: one ringtrain device sends and
receives, encrypts, decrypts and reduces about 400 Mbit/s each way per core here (a 0.12-core
device on a 100 Mbit/s link was throttled in half of its CPU periods and ran at 1/3 of the
link)."""
MAX_RATE_MBIT = 100.0
WITHIN = 0.20  # the bar: measured within 20% of the model
# A device of 0.12 core on a host that other work keeps busy can be held off the CPU for
# seconds; it is slow, not dead: failure detection waits longer here than by default.
PATIENCE = {"RINGTRAIN_PROGRESS_FLOOR": "15", "RINGTRAIN_PROGRESS_TIMEOUT": "30",
            "RINGTRAIN_HEARTBEAT_TIMEOUT": "15"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the subcommand."""
    parser.add_argument("--nodes", default="2,4,8,16",
                        help="comma-separated ring sizes (default 2,4,8,16)")
    parser.add_argument("--rate", type=float, default=None,
                        help="link rate in Mbit/s, both ways (default: 100, or less where a "
                             "device's budget could not fill it: "
                             f"{RATE_PER_CORE_MBIT:g} Mbit/s per core)")
    parser.add_argument("--cpu-cores", type=float, default=None,
                        help="CPU budget of every device in cores (default: the machine's "
                             "cores x 0.95 / N, at most 0.95: N devices fit its cores)")
    parser.add_argument("--sizes", default="64K,1M,8M",
                        help="comma-separated all-reduce sizes (default 64K,1M,8M; above "
                             "Settings.direct_bytes, so every size runs the ring)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="all-reduce runs per ring size (default 3)")
    parser.add_argument("--target-s", type=float, default=1.0,
                        help="seconds of timed iterations per size and run (default 1)")
    parser.add_argument("--json", default=None, help="also write every measurement here")


def budget(n: int, cores: float | None) -> float:
    """The CPU budget of each of ``n`` devices: ``cores``, or a share of this machine."""
    if cores is not None:
        return cores
    return round(min(0.95, 0.95 * len(os.sched_getaffinity(0)) / n), 2)


def link_rate(cores: float, rate: float | None) -> float:
    """The link rate of a device with ``cores``: ``rate``, or what the budget can fill."""
    return rate if rate is not None else min(MAX_RATE_MBIT, round(RATE_PER_CORE_MBIT * cores))


def model_time(n: int, size: int, alpha: float, bandwidth: float) -> float:
    """The ring's cost model: 2(N-1)(alpha + S/(N B)) seconds."""
    return 2 * (n - 1) * (alpha + size / (n * bandwidth))


# workers (one per namespace) -------------------------------------------------------------------

def _link_worker(config: dict) -> dict | None:
    """Members 0 and 1 measure alpha and B between them (printed by member 0)."""
    from ..config import Settings
    from ..node.node import Node

    rank, addresses = config["rank"], config["addresses"]
    key = JobKey.from_hex(os.environ["RINGTRAIN_BENCH_KEY"])
    step = np.zeros(2, dtype=np.float32)  # a chunk of 4 bytes per member
    tiny = np.zeros(1, dtype=np.float32)
    big = np.ones(config["size"] // 4, dtype=np.float32)
    # direct_bytes=0: even 8 bytes go round the ring, in its 2(N-1) = 2 steps
    with Node(addresses, listen=addresses[rank], job="link", node_id=f"link-{rank}", key=key,
              settings=Settings.from_env(direct_bytes=0)) as node:
        for _ in range(20):  # warm up connections and code paths
            node.all_reduce(step, out=step)
        node.barrier()
        rounds = []
        for _ in range(PING_ROUNDS):
            started = time.perf_counter()
            node.all_reduce(step, out=step)
            rounds.append(time.perf_counter() - started)
        alpha = statistics.median(rounds) / 2
        node.broadcast(big, 0)  # warm-up of the large path
        node.broadcast(tiny, 1)
        streams = []
        for _ in range(STREAM_ROUNDS):
            node.barrier()
            started = time.perf_counter()
            node.broadcast(big, 0)
            node.broadcast(tiny, 1)
            streams.append(time.perf_counter() - started)
        node.barrier()
    if rank != 0:
        return None
    stream = statistics.median(streams)
    return {"alpha": alpha, "bandwidth": config["size"] / max(stream - 2 * alpha, 1e-9),
            "stream_s": stream, "rounds": len(rounds)}


def worker_main(argv: list[str]) -> int:
    """``python -m ringtrain.bench.cost_model link CONFIG_JSON``: one member of the link
    measurement; member 0 prints ``RESULT {json}``."""
    out = _link_worker(json.loads(argv[0]))
    if out is not None:
        print("RESULT " + json.dumps(out), flush=True)
    return 0


# the parent ------------------------------------------------------------------------------------

def _collect(processes: list[subprocess.Popen], what: str) -> list[dict]:
    """Wait for every worker (bounded); their RESULT lines, or an error naming who failed."""
    results, problems = [], []
    deadline = time.monotonic() + RUN_TIMEOUT_S
    for rank, process in enumerate(processes):
        try:
            stdout, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            problems.append(f"{what} rank {rank}: no result in {RUN_TIMEOUT_S:.0f} s")
            continue
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        if process.returncode != 0:
            problems.append(f"{what} rank {rank} failed ({process.returncode}): "
                            f"{stderr.strip()[-2000:]}")
        elif lines:
            results.append(json.loads(lines[-1][7:]))
    if problems:
        raise RingtrainError("benchmark run failed:\n" + "\n".join(problems))
    return results


def _measure_link(lan: EmulatedLan, key: JobKey, size: int, port: int) -> dict:
    addresses = [f"{lan.address(i)}:{port}" for i in range(2)]
    env = {**os.environ, **PATIENCE, "RINGTRAIN_BENCH_KEY": key.hex(), "OMP_NUM_THREADS": "1"}
    processes = [lan.popen(rank, [sys.executable, "-m", "ringtrain.bench.cost_model", "link",
                                  json.dumps({"rank": rank, "addresses": addresses,
                                              "size": size})],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for rank in range(2)]
    (result,) = _collect(processes, "link")
    return result


def _all_reduce_run(lan: EmulatedLan, key: JobKey, sizes: list[int],
                    iterations: dict[str, int], port: int) -> dict[int, float]:
    """One run of ``ringtrain bench``'s worker on every device: per size, the median over
    iterations of the slowest member's time."""
    n = lan.n
    addresses = [f"{lan.address(i)}:{port}" for i in range(n)]
    env = {**os.environ, **PATIENCE, "RINGTRAIN_BENCH_KEY": key.hex(), "OMP_NUM_THREADS": "1"}
    common = {"backend": "ringtrain", "sizes": sizes, "iterations": iterations,
              "probe_bytes": 0, "warmup": 2, "insecure": False, "compression": "none",
              "addresses": addresses}
    processes = [lan.popen(rank, [sys.executable, "-m", "ringtrain.bench.allreduce", "worker",
                                  json.dumps({**common, "rank": rank})],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for rank in range(n)]
    per_rank = _collect(processes, "all-reduce")
    return {size: float(np.median(np.max([r[str(size)]["times"] for r in per_rank], axis=0)))
            for size in sizes}


def _throttling(lan: EmulatedLan) -> list[tuple[int, int]]:
    """Per device: CFS periods so far, and how many of them its budget ran out in."""
    _, mount = cpu_budget.hierarchy()
    counts = []
    for i in range(lan.n):
        stat = dict(line.split() for line in
                    (mount / lan.namespace(i) / "cpu.stat").read_text().splitlines())
        counts.append((int(stat.get("nr_periods", 0)), int(stat.get("nr_throttled", 0))))
    return counts


def run(args: argparse.Namespace) -> int:
    """Measure every ring size; print the table."""
    try:
        ring_sizes = [int(n) for n in args.nodes.split(",")]
    except ValueError:
        raise ConfigError(f"--nodes must be comma-separated integers, got {args.nodes!r}") \
            from None
    if any(n < 2 for n in ring_sizes) or args.repeats < 1 or not args.target_s > 0:
        raise ConfigError("need every --nodes >= 2, --repeats >= 1 and --target-s > 0")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    key = JobKey.generate()
    rows, port = [], PORT
    started = time.monotonic()
    for n in ring_sizes:
        cores = budget(n, args.cpu_cores)
        rate = link_rate(cores, args.rate)
        rate_bps = rate * 1e6 / 8
        with EmulatedLan(n, rate_mbit=rate, cpu_cores=cores) as lan:
            port += 1
            link = _measure_link(lan, key, max(sizes), port)
            iterations = {str(s): iterations_for(s, n, rate_bps, args.target_s) for s in sizes}
            runs: dict[int, list[float]] = {s: [] for s in sizes}
            before = _throttling(lan)
            for _ in range(args.repeats):
                port += 1  # fresh ports: the last run's connections may linger
                for size, seconds in _all_reduce_run(lan, key, sizes, iterations, port).items():
                    runs[size].append(seconds)
            after = _throttling(lan)
        periods = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
        throttled = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
        rows.append({"n": n, "cores": cores, "rate": rate, "throttled": throttled / max(periods, 1),
                     "alpha": link["alpha"], "bandwidth": link["bandwidth"],
                     "runs": {str(s): runs[s] for s in sizes}})
        print(f"N={n} done ({time.monotonic() - started:.0f} s): alpha "
              f"{link['alpha'] * 1e3:.3f} ms, B {link['bandwidth'] * 8 / 1e6:.1f} Mbit/s",
              file=sys.stderr, flush=True)
    print(report(args, sizes, rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "module"},
                       "sizes": sizes, "rows": rows}, f, indent=1)
    return 0


def report(args: argparse.Namespace, sizes: list[int], rows: list[dict]) -> str:
    """The table: per N and size, measured (median, best), the model, and their ratio."""
    cores = "" if args.cpu_cores is None else f" --cpu-cores {args.cpu_cores:g}"
    rate = "" if args.rate is None else f" --rate {args.rate:g}"
    lines = [f"`ringtrain bench-cost-model --nodes {args.nodes}{rate}{cores} "
             f"--sizes {args.sizes} --repeats {args.repeats}`",
             "", "Emulated LAN, a CPU budget and a link rate per device, "
             "CURVE-encrypted, float32 sum; model 2(N-1)(alpha + S/(N B)) with alpha and B "
             "measured between two devices of the same LAN before the runs.", "",
             "| N | cores each | link Mbit/s | alpha ms | B Mbit/s | size | measured ms (median) "
             "| best | model ms | measured / model | CPU-throttled periods |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    outside = []
    for row in rows:
        n, alpha, bandwidth = row["n"], row["alpha"], row["bandwidth"]
        for size in sizes:
            times = row["runs"][str(size)]
            measured, best = statistics.median(times), min(times)
            model = model_time(n, size, alpha, bandwidth)
            ratio = measured / model
            if abs(ratio - 1) > WITHIN:
                outside.append(f"N={n} {format_size(size)}")
            lines.append(f"| {n} | {row['cores']:g} | {row['rate']:g} | {alpha * 1e3:.3f} | "
                         f"{bandwidth * 8 / 1e6:.1f} | {format_size(size)} | "
                         f"{measured * 1e3:.1f} | {best * 1e3:.1f} | {model * 1e3:.1f} | "
                         f"{ratio:.2f} | {row['throttled']:.0%} |")
    lines.append("")
    lines.append(f"Within {WITHIN:.0%} of the model: "
                 + ("every row." if not outside else f"all but {', '.join(outside)}."))
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "link":
        sys.exit(worker_main(sys.argv[2:]))
    from ..cli.main import main

    sys.exit(main(["bench-cost-model", *sys.argv[1:]]))
