"""``ringtrain bench``: all-reduce time, algbw and busbw per size, in the style of nccl-tests,
side by side with torch.distributed's Gloo and with MPI (when torch and mpi4py are installed),
in one run.

    ringtrain bench                                   # loopback, 4 nodes, keyed (encrypted)
    ringtrain bench --insecure                        # loopback without encryption
    ringtrain bench --where lan --rate 1000 --sizes 64M --repeats 5
    ringtrain bench --where lan --rate 1000 --compression int8 --sizes 64M
    ringtrain bench --where lan --rate 1000 --slow-node 3 --slow-rate 100
    ringtrain bench --where lan --rate 1000 --sites 0,1,0,1 --uplink 1000 --probe-links 2M
    ringtrain bench --where lan --rate 1000 --cpu 0.45 --sizes 37K --baselines gloo
    ringtrain bench --quick                           # a check that takes under a minute

Method (see ../shared/research/perf-baselines.md): every run starts N fresh worker processes
(in N network namespaces for ``--where lan``), and for each size times ``iterations``
all-reduces, each after a barrier; an iteration's time is the slowest rank's. A run's time is
the median of its iterations. ringtrain, Gloo and MPI runs alternate (``--repeats`` rounds),
and the table shows the median and the best of the runs' times. MPI runs through ``mpiexec``:
over shared memory on loopback, over TCP on eth0 between the namespaces of the LAN.
algbw = bytes / time; busbw = algbw x 2(N-1)/N. With compression, bytes are the uncompressed
bytes (effective busbw), and the op is a mean, so values reduced in place again and again
stay finite.
Ring order: with ``--probe-links`` the nodes measure their links and order the ring by them
(``Settings.link_probe_bytes``); ringtrain in sorted order then runs as one more baseline.
With ``--sites`` the LAN has a bridge per site, joined by shaped uplinks.
Memory: each worker's peak RSS growth while running a size, beyond its input buffer, over
the buffer's bytes (so a node's total is 1 + that, plus fixed buffers).
CPU: each worker's process CPU time (every thread: the node's engine, ZeroMQ's I/O) while an
iteration ran, the median over iterations, averaged over ranks; printed for ringtrain and
Gloo. With ``--cpu`` every device of the LAN gets that CPU budget (a cgroup quota), as
``bench-scaling`` makes them: on small devices a small all-reduce is bound by its CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..comm.security import JobKey
from ..errors import ConfigError, RingtrainError
from .allreduce_report import Series, report

DEFAULT_SIZES = "4K,64K,1M,16M,64M,256M"
QUICK_SIZES = "4K,1M,16M"
LOOPBACK_ESTIMATE_BPS = 0.5e9  # bytes/s a loopback ring of 4 moves; only to pick iterations
RUN_TIMEOUT = 600.0
STOP_GRACE_S = 5.0  # after a timeout: SIGTERM (mpiexec passes it on to its ranks), then SIGKILL
RINGTRAIN_PORT, GLOO_PORT = 29600, 29700  # inside namespaces every node has its own ports


def parse_size(text: str) -> int:
    """``4K`` → 4096, ``64M`` → 67108864, ``1G``; plain numbers are bytes."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        if text and text[-1] in units:
            value = int(float(text[:-1]) * units[text[-1]])
        else:
            value = int(text)
    except ValueError:
        raise ConfigError(f"size {text!r} is not like 4K, 64M or 1G") from None
    if value < 4 or value % 4:
        raise ConfigError(f"size {text!r} must be a positive multiple of 4 bytes (float32)")
    return value




def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the subcommand."""
    parser.add_argument("-n", "--nodes", type=int, default=4, help="nodes (default 4)")
    parser.add_argument("--sizes", default=None,
                        help=f"comma-separated buffer sizes (default {DEFAULT_SIZES}; "
                             f"--quick: {QUICK_SIZES})")
    parser.add_argument("--where", choices=("loopback", "lan"), default="loopback",
                        help="local processes on 127.0.0.1, or an emulated LAN of network "
                             "namespaces (Linux, root)")
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="--where lan: link rate in Mbit/s (default 1000)")
    parser.add_argument("--slow-node", type=int, default=None,
                        help="--where lan: shape this node's link to --slow-rate")
    parser.add_argument("--slow-rate", type=float, default=100.0,
                        help="Mbit/s of the slow node's link (default 100)")
    parser.add_argument("--sites", default=None,
                        help="--where lan: site of each node, e.g. 0,1,0,1: a bridge per "
                             "site, joined by uplinks of --uplink Mbit/s")
    parser.add_argument("--uplink", type=float, default=None,
                        help="--sites: Mbit/s of each site's uplink (default: --rate)")
    parser.add_argument("--cpu", type=float, default=None,
                        help="--where lan: CPU budget of every device, in cores (default none)")
    parser.add_argument("--probe-links", default=None,
                        help="bytes each node streams to each other to order the ring by "
                             "measured rates (e.g. 8M; default: sorted order); ringtrain "
                             "in sorted order then runs as a baseline too")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs of each backend, interleaved (default 5 on lan, 3 on "
                             "loopback, 1 with --quick)")
    parser.add_argument("--target-s", type=float, default=None,
                        help="seconds of timed iterations per size and run (default 1, "
                             "--quick 0.2)")
    parser.add_argument("--insecure", action="store_true",
                        help="loopback only: no job key, no encryption (shows its cost)")
    parser.add_argument("--compression", default="none",
                        help="none, fp16, int8, topk or topk:RATIO (effective busbw)")
    parser.add_argument("--baselines", default="gloo,mpi",
                        help="comma-separated: gloo, mpi, or none (default gloo,mpi)")
    parser.add_argument("--quick", action="store_true",
                        help="a run of under a minute: few sizes, one repeat, short timing")
    parser.add_argument("--json", default=None, help="also write every measurement here")


# timing, shared by every backend ----------------------------------------------------------------

def measure(op: Callable[[], Any], barrier: Callable[[], Any], warmup: int, iterations: int
            ) -> dict:
    """Run ``op`` ``warmup`` times untimed, then ``iterations`` times, each after a barrier;
    also the peak RSS growth while doing so (bytes)."""
    for _ in range(warmup):
        barrier()
        op()
    times, cpu = [], []
    for _ in range(iterations):
        barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        op()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"times": times, "cpu": cpu}


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark of this process; returns the current RSS (bytes)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _rss("VmRSS")


def _rss(field_name: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def iterations_for(size: int, world_size: int, bytes_per_s: float, target_s: float) -> int:
    """Timed iterations of one size: about ``target_s`` seconds, between 3 and 50."""
    estimate = 2 * (world_size - 1) / world_size * size / bytes_per_s + 1e-3
    return int(min(50, max(3, target_s / estimate)))


# workers ---------------------------------------------------------------------------------------

def _ringtrain_worker(config: dict) -> dict:
    from ..config import Settings
    from ..node.node import Node

    key = None if config["insecure"] else JobKey.from_hex(os.environ["RINGTRAIN_BENCH_KEY"])
    addresses = config["addresses"]
    rank = config["rank"]
    with Node(addresses, listen=addresses[rank], job="bench", node_id=f"bench-{rank:02d}",
              key=key, insecure=config["insecure"],
              settings=Settings.from_env(collective_timeout=300.0,
                                         link_probe_bytes=config["probe_bytes"])) as node:
        out = {}
        for size in config["sizes"]:
            data = np.random.default_rng(rank).standard_normal(size // 4).astype(np.float32)
            base = _reset_peak_rss()
            compression = None if config["compression"] == "none" else config["compression"]

            def op(data: np.ndarray = data, compression: str | None = compression) -> None:
                # in place, as Gloo's and MPI's all-reduces are (growing sums overflow to
                # inf in the end, at the same speed); a codec needs finite values, which a
                # mean keeps
                node.all_reduce(data, op="sum" if compression is None else "mean",
                                compression=compression, out=data)

            result = measure(op, node.barrier, config["warmup"],
                             config["iterations"][str(size)])
            result["peak_rss_growth"] = _rss("VmHWM") - base
            out[size] = result
            del data
        node.barrier()
        out["ring"] = " -> ".join(node.members)
        return out


def _measure_with_rss(op: Callable, barrier: Callable, warmup: int, iters: int) -> dict:
    base = _reset_peak_rss()
    result = measure(op, barrier, warmup, iters)
    result["peak_rss_growth"] = _rss("VmHWM") - base
    return result


def _gloo_worker(config: dict) -> dict:
    from .baselines import gloo_worker

    iterations = config["iterations"]
    return gloo_worker(config["rank"], len(config["addresses"]), config["master"],
                       config["sizes"], lambda size: iterations[str(size)], config["warmup"],
                       _measure_with_rss)


def _mpi_worker(config: dict) -> dict | None:
    from .mpi_baseline import mpi_worker

    iterations = config["iterations"]
    return mpi_worker(config["sizes"], lambda size: iterations[str(size)], config["warmup"],
                      _measure_with_rss)


def worker_main(argv: list[str]) -> int:
    """``python -m ringtrain.bench.allreduce worker CONFIG_JSON``: one rank of one run; prints JSON
    (under MPI only rank 0 prints, for every rank)."""
    config = json.loads(argv[0])
    if config["backend"] == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", config["interface"])
        out = _gloo_worker(config)
    elif config["backend"] == "mpi":
        out = _mpi_worker(config)
    else:
        out = _ringtrain_worker(config)
    if out is not None:
        print("RESULT " + json.dumps({str(k): v for k, v in out.items()}), flush=True)
    return 0


# the parent ------------------------------------------------------------------------------------

class Launcher:
    """Starts the N workers of one run, on loopback or in the namespaces of an emulated LAN."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.n = args.nodes
        self.lan = None
        if args.where == "lan":
            from ..lab.netns import EmulatedLan

            self.lan = EmulatedLan(self.n, rate_mbit=args.rate, sites=args.site_list,
                                   uplink_mbit=args.uplink or args.rate, cpu_cores=args.cpu)
            if args.slow_node is not None:
                self.lan.set_rate(args.slow_node, args.slow_rate)
        self.key = JobKey.generate()
        self.round = 0
        self.rings: set[str] = set()  # the ring orders ringtrain ran in
        self.mpi_agent: str | None = None  # the script mpiexec starts daemons with on a LAN

    def hosts(self) -> list[str]:
        if self.lan is None:
            return ["127.0.0.1"] * self.n
        return [self.lan.address(i) for i in range(self.n)]

    def ports(self, base: int) -> list[int]:
        self.round += 1
        if self.lan is None:
            from ..testing import free_ports

            return free_ports(self.n)
        # fresh ports every run: the last run's connections may linger in TIME_WAIT
        return [base + self.round] * self.n

    def _start(self, rank: int, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        """Start ``argv`` on node ``rank`` (in its namespace on the LAN)."""
        if self.lan is None:
            return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env)
        return self.lan.popen(rank, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)

    def _mpiexec(self, argv: list[str]) -> list[str]:
        """``argv`` as N MPI ranks: local, or one per namespace (mpiexec in node 0's)."""
        from .mpi_baseline import mpiexec_command, with_host_name, write_agent

        if self.lan is None:
            return mpiexec_command(argv, self.n)
        namespaces = [self.lan.namespace(i) for i in range(self.n)]
        if self.mpi_agent is None:
            self.mpi_agent = write_agent(tempfile.mkdtemp(prefix="ringtrain-mpi-"), namespaces)
        return with_host_name(namespaces[0],
                              mpiexec_command(argv, self.n, namespaces, self.mpi_agent))

    def run(self, backend: str, sizes: list[int], iterations: dict[str, int]) -> list[dict]:
        """One run of ``backend``; each rank's measurements (under MPI, one entry already
        reduced over the ranks: slowest time per iteration, largest memory)."""
        hosts = self.hosts()
        ports = self.ports(GLOO_PORT if backend == "gloo" else RINGTRAIN_PORT)
        common = {"backend": backend, "sizes": sizes, "iterations": iterations,
                  "probe_bytes": self.args.probe_bytes if backend == "ringtrain" else 0,
                  "warmup": 2, "insecure": self.args.insecure,
                  "compression": self.args.compression,
                  "addresses": [f"{h}:{p}" for h, p in zip(hosts, ports, strict=False)],
                  "master": f"{hosts[0]}:{ports[0]}",
                  "interface": "lo" if self.lan is None else "eth0"}
        env = {**os.environ, "RINGTRAIN_BENCH_KEY": self.key.hex(), "OMP_NUM_THREADS": "1"}
        worker = [sys.executable, "-m", "ringtrain.bench.allreduce", "worker"]
        if backend == "mpi":
            from .mpi_baseline import run_as_root_env

            argv = self._mpiexec([*worker, json.dumps({**common, "rank": None})])
            processes = [self._start(0, argv, {**env, **run_as_root_env()})]
        else:
            processes = [self._start(rank, [*worker, json.dumps({**common, "rank": rank})], env)
                         for rank in range(self.n)]
        results, problems = [], []
        deadline = time.monotonic() + RUN_TIMEOUT
        for rank, process in enumerate(processes):
            try:
                stdout, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _stop(processes)
                problems.append(f"{backend} rank {rank}: no result in {RUN_TIMEOUT:.0f} s")
                continue
            lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
            if process.returncode != 0 or not lines:
                problems.append(f"{backend} rank {rank} failed ({process.returncode}): "
                                f"{stderr.strip()[-2000:]}")
                continue
            result = json.loads(lines[-1][7:])
            ring = result.pop("ring", "")
            if backend == "ringtrain":
                self.rings.add(ring)
            results.append({int(k): v for k, v in result.items()})
        if problems:
            raise RingtrainError("benchmark run failed:\n" + "\n".join(problems))
        return results

    def close(self) -> None:
        if self.lan is not None:
            self.lan.close()
        if self.mpi_agent is not None:
            shutil.rmtree(os.path.dirname(self.mpi_agent), ignore_errors=True)


def _stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM every process still running, then SIGKILL those left after a grace period."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()


def _mpi_status(lan: bool) -> str:
    """The MPI series' ``skipped`` text: "" when the baseline can run."""
    from .mpi_baseline import unavailable

    reason = unavailable(lan)
    if not reason:
        return ""
    return f"skipped on --where lan: {reason}" if lan else f"skipped: {reason}"


def _record(series: Series, sizes: list[int], per_rank: list[dict]) -> None:
    for size in sizes:
        per_iteration = np.max([r[size]["times"] for r in per_rank], axis=0)
        series.add(size, float(np.median(per_iteration)),
                   max(r[size]["peak_rss_growth"] for r in per_rank))
        if all("cpu" in r[size] for r in per_rank):  # MPI's rank 0 reports times only
            series.cpu.setdefault(size, []).append(
                float(np.mean([np.median(r[size]["cpu"]) for r in per_rank])))


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print the table."""
    if args.nodes < 2:
        raise ConfigError("a benchmark needs at least 2 nodes")
    if args.where == "lan" and args.insecure:
        raise ConfigError("--insecure is for loopback only")
    if args.cpu is not None and not (args.where == "lan" and args.cpu > 0):
        raise ConfigError("--cpu needs --where lan and a budget above 0 cores")
    if args.slow_node is not None and not (args.where == "lan"
                                           and 0 <= args.slow_node < args.nodes):
        raise ConfigError("--slow-node needs --where lan and a node index below --nodes")
    args.site_list = None
    if args.sites is not None:
        try:
            args.site_list = [int(site) for site in args.sites.split(",")]
        except ValueError:
            raise ConfigError(f"--sites must be comma-separated site numbers, got "
                              f"{args.sites!r}") from None
        if args.where != "lan" or len(args.site_list) != args.nodes:
            raise ConfigError("--sites needs --where lan and one site per node")
    args.probe_bytes = parse_size(args.probe_links) if args.probe_links else 0
    from ..ring.compression import get_codec

    get_codec(None if args.compression == "none" else args.compression)  # fail early
    sizes = [parse_size(s) for s in (args.sizes or (QUICK_SIZES if args.quick else
                                                    DEFAULT_SIZES)).split(",")]
    repeats = args.repeats or (1 if args.quick else 5 if args.where == "lan" else 3)
    target_s = args.target_s or (0.2 if args.quick else 1.0)
    baselines = {b.strip() for b in args.baselines.split(",")} - {"none", ""}
    unknown = baselines - {"gloo", "mpi"}
    if unknown:
        raise ConfigError(f"unknown baselines {sorted(unknown)}: use gloo, mpi or none")
    rate_bps = args.rate * 1e6 / 8 if args.where == "lan" else LOOPBACK_ESTIMATE_BPS
    if args.slow_node is not None:
        rate_bps = min(rate_bps, args.slow_rate * 1e6 / 8)
    iterations = {str(s): iterations_for(s, args.nodes, rate_bps, target_s) for s in sizes}

    ours = Series("ringtrain")
    ordered = Series("sorted ring", skipped="" if args.probe_bytes else "not asked for")
    gloo = Series("gloo")
    mpi = Series("mpi", skipped=_mpi_status(args.where == "lan") if "mpi" in baselines
                 else "not asked for")
    if "gloo" in baselines:
        from .baselines import torch_available

        if not torch_available():
            gloo.skipped = "skipped: torch with Gloo is not importable"
    else:
        gloo.skipped = "not asked for"
    started = time.monotonic()
    launcher = Launcher(args)
    try:
        for repeat in range(repeats):
            _record(ours, sizes, launcher.run("ringtrain", sizes, iterations))
            if not ordered.skipped:
                _record(ordered, sizes, launcher.run("ringtrain-sorted", sizes, iterations))
            if not gloo.skipped:
                _record(gloo, sizes, launcher.run("gloo", sizes, iterations))
            if not mpi.skipped:
                _record(mpi, sizes, launcher.run("mpi", sizes, iterations))
            print(f"run {repeat + 1}/{repeats} done ({time.monotonic() - started:.0f} s)",
                  file=sys.stderr, flush=True)
    finally:
        launcher.close()
    print(report(args, sizes, repeats, ours, gloo, mpi, ordered))
    if args.probe_bytes:
        print(f"ringtrain ran in ring order(s): {'; '.join(sorted(launcher.rings - {''}))}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "sizes": sizes, "iterations": iterations,
                       "ringtrain": ours.runs, "gloo": gloo.runs, "mpi": mpi.runs,
                       "memory": ours.memory, "gloo_memory": gloo.memory,
                       "cpu": ours.cpu, "gloo_cpu": gloo.cpu,
                       "mpi_memory": mpi.memory, "sorted_ring": ordered.runs,
                       "gloo_skipped": gloo.skipped,
                       "mpi_skipped": mpi.skipped}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "worker":
        sys.exit(worker_main(sys.argv[2:]))
    from ..cli.main import main

    sys.exit(main(["bench", *sys.argv[1:]]))
