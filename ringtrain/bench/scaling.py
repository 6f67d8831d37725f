"""Weak-scaling efficiency of data-parallel training on an emulated LAN: ``bench-scaling``.

    sudo ringtrain bench-scaling                      # N = 1, 2, 4; 1 Gbit/s; 0.45 core each

Linux and root only. For each N, a fresh emulated LAN (:mod:`ringtrain.lab.netns`) of N devices:
one network namespace per device, its link shaped to ``--rate`` with tbf, and a CPU budget of
``--cpu`` cores (a cgroup quota, device i pinned to core i mod cores, two devices of 0.45
on a core at most; :mod:`ringtrain.lab.cpu_budget`; also for N = 1). Each device runs
one process of real data-parallel training: a :class:`~ringtrain.Node` with static peers
and a job key (encrypted links), a :class:`~ringtrain.train.Trainer` (even batches) on a wide
numpy MLP and synthetic data, BLAS pinned to one thread. Weak scaling: every device takes
``--batch`` samples per step whatever N is. After ``--warmup`` steps and a barrier, each
device times ``--steps`` steps. Every N runs ``--repeats`` times, the sizes interleaved (1, 2,
4, 1, 2, 4, ...) so that noise on a shared machine hits all alike; each row is the run of
median throughput. ``--compression`` passes the Trainer's ``compression=`` (lossy, with error
feedback; off by default): fewer bytes on the links for the same step.

* throughput(N) = N x batch x steps / the slowest device's time, in samples per second;
* efficiency(N) = throughput(N) / (N x throughput(1)), 1.0 being perfect scaling.

Where a step goes, per device and averaged over devices: compute (forward and backward,
during which the Trainer already sends the gradient of the last layers: see ``bucket_bytes``
in :mod:`ringtrain.train.trainer`), the gradient all-reduce the step still waits for after backward
(the first rows of the first layer's weight, and any bucket not done yet), and the rest
(batch slicing, optimizer). After the timed steps the devices time the whole gradient's
all-reduce alone, each after a barrier: the all-reduce of the step beyond that is time spent
waiting for the slowest device to arrive (0 when buckets sent during backward leave less
than that).
"CPU cores" is the process's CPU time (every thread: ZeroMQ, encryption, reduction) over the
wall time, outside and inside the all-reduce; at the budget means CPU-bound there. "eth0 MB"
is what each device's link really carried per step (its interface counter, TCP/IP and
encryption included), beside the 2(N-1)/N x gradient a ring all-reduce must send.

Default sizes: a 512-1024-1024-10 MLP has 1.59 M parameters, a 6.3 MB gradient. A ring
all-reduce sends 2(N-1)/N of it per link: 76 ms for N = 4 at 1 Gbit/s. An MLP does about
6 x parameters flops per sample (here a little less: backward skips the first layer's input
gradient), so the compute-to-communication ratio is set by the batch: one core of the
project machine does ~85 GFLOP/s in float32 matmuls, 0.45 core ~38, and a batch of 3072
samples then takes ~0.7 s, 9-10x that all-reduce, as a compute-heavy job would.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..comm.security import JobKey, read_key_file, write_key_file
from ..errors import ConfigError, RingtrainError
from ..lab.netns import EmulatedLan
from ..node.node import Node
from ..train.nn import Dense, ReLU, Sequential
from ..train.optim import SGD
from ..train.trainer import Trainer

PORT = 7077
CLASSES = 10
STARVED = 0.9  # a device computing on less than this fraction of its budget was starved
REPORT_MARGIN_S = 5.0  # a stuck worker reports this long before the parent's deadline
START_GRACE_S = 5.0  # past the deadline, a worker still starting up may yet report
WIRE_COUNTER = Path("/sys/class/net/eth0/statistics/tx_bytes")  # in the device's namespace
_RESULT = "RESULT "
_STUCK = "device did not finish in time"
_THREADS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

METHOD = (__doc__ or "").partition("\n\n")[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``ringtrain bench-scaling``; ``--help`` also explains the method."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = METHOD
    parser.add_argument("--nodes", default="1,2,4",
                        help="ring sizes, comma-separated, 1 included (default 1,2,4)")
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="link rate of every device, Mbit/s (default 1000)")
    parser.add_argument("--cpu", type=float, default=0.45,
                        help="CPU budget of every device, in cores (default 0.45: four "
                             "devices fit in two cores)")
    parser.add_argument("--inputs", type=int, default=512, help="input features (default 512)")
    parser.add_argument("--hidden", type=int, default=1024,
                        help="width of each hidden layer (default 1024)")
    parser.add_argument("--layers", type=int, default=2,
                        help="hidden layers (default 2)")
    parser.add_argument("--batch", type=int, default=3072,
                        help="samples per device per step (default 3072)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps first (default 2)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--reduce-repeats", type=int, default=5,
                        help="all-reduces timed alone after the steps (default 5)")
    parser.add_argument("--compression", default=None,
                        help="compress the gradient all-reduce (Trainer compression=: int8, "
                             "fp16, topk[:RATIO]); default none")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of every N, interleaved; each row is the median run "
                             "(default 3)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds one ring size may take, start-up included (default 300)")


# pure logic -----------------------------------------------------------------------------------

def parse_nodes(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``: distinct sizes in [1, 200], 1 included, sorted.

    Raises:
        ConfigError: anything else; the message says what.
    """
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError as exc:
        raise ConfigError(f"--nodes must be comma-separated integers like 1,2,4, got "
                          f"{text!r}") from exc
    if len(set(sizes)) != len(sizes) or not all(1 <= n <= 200 for n in sizes):
        raise ConfigError(f"--nodes must be distinct sizes in [1, 200], got {text!r}")
    if 1 not in sizes:
        raise ConfigError(f"--nodes must include 1: efficiency is relative to one device, "
                          f"got {text!r}")
    return sorted(sizes)


def median_run(rows: list[Row]) -> Row:
    """The run of median throughput (the lower middle one of an even count)."""
    if not rows:
        raise ConfigError("no runs to take the median of")
    return sorted(rows, key=lambda row: row.throughput)[(len(rows) - 1) // 2]


def efficiency(throughput: float, nodes: int, single: float) -> float:
    """Weak-scaling efficiency: ``throughput / (nodes x single)``."""
    return throughput / (nodes * single)


@dataclass(frozen=True)
class Row:
    """One ring size's measurement; times are seconds per step."""

    nodes: int
    step: float  # the slowest device's time over the timed steps, per step
    throughput: float  # samples per second, whole ring
    compute: float  # forward and backward, mean over devices
    reduce: float  # the gradient all-reduce as called in the step, mean over devices
    reduce_alone: float  # the same all-reduce after a barrier: median of the slowest device
    reduce_cpu: float  # cores used during the all-reduce in the step, mean over devices
    compute_cpu: float  # cores used outside the all-reduce, mean over devices
    wire: float  # bytes each device's eth0 sent per step, mean over devices
    gradient: int  # bytes of one gradient all-reduce

    @property
    def other(self) -> float:
        """The rest of a step: batch slicing, optimizer update, what the slowest adds."""
        return self.step - self.compute - self.reduce

    @property
    def waiting(self) -> float:
        """All-reduce time in the step beyond the all-reduce alone: waiting for others."""
        return max(0.0, self.reduce - self.reduce_alone)


def summarize(nodes: int, batch: int, steps: int, results: list[dict[str, Any]]) -> Row:
    """Combine the devices' reports (see :func:`_train`) into one :class:`Row`."""
    if len(results) != nodes or steps < 1:
        raise ConfigError(f"need {nodes} device reports and steps >= 1, got {len(results)} "
                          f"and {steps}")
    wall = max(r["wall"] for r in results)
    alone = [max(times) for times in zip(*(r["reduce_alone"] for r in results), strict=True)]
    mean = statistics.fmean
    return Row(nodes=nodes, step=wall / steps, throughput=nodes * batch * steps / wall,
               wire=mean(r["wire_bytes"] for r in results) / steps,
               gradient=results[0]["gradient_bytes"],
               compute=mean(r["compute"] for r in results) / steps,
               reduce=mean(r["reduce_wall"] for r in results) / steps,
               reduce_alone=statistics.median(alone) if alone else 0.0,
               reduce_cpu=mean(r["reduce_cpu"] / r["reduce_wall"] if r["reduce_wall"] else 0.0
                               for r in results),
               compute_cpu=mean((r["cpu"] - r["reduce_cpu"]) / (r["wall"] - r["reduce_wall"])
                                for r in results))


def ring_bytes(size: int, nodes: int) -> float:
    """Bytes each member of a ring all-reduce sends: 2(N-1)/N of the array."""
    return 2 * (nodes - 1) / nodes * size


def table(rows: list[Row]) -> str:
    """The result table, Markdown; efficiency relative to the row with one node."""
    single = next(row.throughput for row in rows if row.nodes == 1)
    lines = ["| N | step ms | samples/s | efficiency | compute ms | all-reduce ms (share) | "
             "all-reduce alone ms | waiting ms | other ms | CPU cores: compute / all-reduce | "
             "eth0 MB (ideal) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row.nodes} | {row.step * 1e3:.0f} | {row.throughput:.0f} | "
            f"{efficiency(row.throughput, row.nodes, single):.3f} | {row.compute * 1e3:.0f} | "
            f"{row.reduce * 1e3:.1f} ({row.reduce / row.step:.1%}) | "
            f"{row.reduce_alone * 1e3:.1f} | {row.waiting * 1e3:.1f} | "
            f"{row.other * 1e3:.1f} | {row.compute_cpu:.2f} / {row.reduce_cpu:.2f} | "
            f"{row.wire / 1e6:.2f} ({ring_bytes(row.gradient, row.nodes) / 1e6:.2f}) |")
    return "\n".join(lines)


# one device -----------------------------------------------------------------------------------

class _TimedNode(Node):
    """A Node that adds up the wall and CPU time of its all_reduce calls."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reduce_wall = 0.0
        self.reduce_cpu = 0.0

    def all_reduce(self, *args: Any, **kwargs: Any) -> np.ndarray:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return super().all_reduce(*args, **kwargs)
        finally:
            self.reduce_wall += time.perf_counter() - wall
            self.reduce_cpu += time.process_time() - cpu


def model_of(config: dict[str, Any]) -> Sequential:
    """The benchmark's MLP: inputs -> hidden x layers (ReLU) -> 10 classes."""
    widths = [config["inputs"], *[config["hidden"]] * config["layers"], CLASSES]
    layers: list[Any] = []
    for i in range(len(widths) - 1):
        layers += [Dense(widths[i], widths[i + 1]), ReLU()]
    return Sequential(*layers[:-1], seed=0, dtype=np.float32)


def _wire_bytes() -> int:
    """Bytes this namespace's eth0 has sent (0 outside an emulated LAN node)."""
    try:
        return int(WIRE_COUNTER.read_text())
    except OSError:
        return 0


def _train(config: dict[str, Any], node_ref: list[Node]) -> dict[str, Any]:
    """Train on this device and time it; every member returns the same kind of report."""
    rank, addresses, batch = config["rank"], config["addresses"], config["batch"]
    model = model_of(config)
    rng = np.random.default_rng(0)  # the same synthetic data on every device
    samples = batch * len(addresses)  # one epoch per step: every step is full
    x = rng.standard_normal((samples, config["inputs"]), dtype=np.float32)
    y = rng.integers(0, CLASSES, samples)
    node = _TimedNode(addresses, listen=addresses[rank], job="scaling", node_id=f"device-{rank}",
                      key=read_key_file(config["key_file"]))
    with node:
        node_ref.append(node)
        trainer = Trainer(node, model, SGD(model.params, lr=0.01), x, y, batch_size=batch,
                          adaptive=False, compression=config["compression"])
        for _ in range(config["warmup"]):
            trainer.step()
        node.barrier()
        node.reduce_wall = node.reduce_cpu = 0.0
        compute = 0.0
        wire, wall, cpu = _wire_bytes(), time.perf_counter(), time.process_time()
        for _ in range(config["steps"]):
            compute += trainer.step().compute_seconds
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        report = {"wall": wall, "cpu": cpu, "compute": compute,
                  "reduce_wall": node.reduce_wall, "reduce_cpu": node.reduce_cpu,
                  "wire_bytes": _wire_bytes() - wire,
                  "gradient_bytes": model.params.nbytes}
        gradient = rng.standard_normal(model.num_params, dtype=np.float32)
        alone = []
        for _ in range(config["reduce_repeats"]):
            node.barrier()
            started = time.perf_counter()
            node.all_reduce(gradient, compression=config["compression"])
            alone.append(time.perf_counter() - started)
        node.barrier()
    return {**report, "reduce_alone": alone}


def _watchdog(deadline: float, node_ref: list[Node]) -> None:
    """At ``deadline`` (time.time()), print this device's node state and stacks, then exit 3."""
    time.sleep(max(0.0, deadline - time.time()))
    state = node_ref[0].state() if node_ref else "node not constructed"
    print(f"{_STUCK}; node state: {state}", flush=True)
    faulthandler.dump_traceback(sys.stdout, all_threads=True)
    sys.stdout.flush()
    os._exit(3)


def worker_main(argv: list[str]) -> int:
    """``python -m ringtrain.bench.scaling worker CONFIG_JSON``: one device; prints its report
    as a ``RESULT`` JSON line."""
    config = json.loads(argv[0])
    node_ref: list[Node] = []
    threading.Thread(target=_watchdog, args=(config["deadline"], node_ref),
                     daemon=True).start()
    print(_RESULT + json.dumps(_train(config, node_ref)), flush=True)
    return 0


# the parent -----------------------------------------------------------------------------------

@dataclass
class _Device:
    """One worker process and the lines it printed (stdout and stderr)."""

    rank: int
    popen: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    pump: threading.Thread | None = None

    def result(self) -> dict[str, Any] | None:
        found = [line for line in self.lines if line.startswith(_RESULT)]
        return json.loads(found[-1][len(_RESULT):]) if found else None

    def tail(self, count: int = 40) -> str:
        """The last ``count`` lines, or all of the watchdog's report (state and stacks)."""
        starts = [i for i, line in enumerate(self.lines) if line.startswith(_STUCK)]
        shown = self.lines[starts[-1]:] if starts else self.lines[-count:]
        return "\n    ".join(shown) or "(no output)"


def _pump(device: _Device) -> None:
    for line in device.popen.stdout:  # type: ignore[union-attr]
        device.lines.append(line.rstrip("\n"))


def measure(nodes: int, args: argparse.Namespace, key_file: Path) -> list[dict[str, Any]]:
    """One ring size on a fresh emulated LAN; every device's report, in rank order.

    Raises:
        RingtrainError: a device failed or did not finish within ``args.timeout``; the
            message carries the output of every device that failed or hung.
    """
    deadline = time.time() + args.timeout
    with EmulatedLan(nodes, rate_mbit=args.rate, cpu_cores=args.cpu) as lan:
        config = {"addresses": [f"{lan.address(i)}:{PORT}" for i in range(nodes)],
                  "key_file": str(key_file), "deadline": deadline - REPORT_MARGIN_S,
                  **{name: getattr(args, name) for name in (
                      "inputs", "hidden", "layers", "batch", "warmup", "steps",
                      "reduce_repeats", "compression")}}
        env = {**os.environ, **_THREADS, "PYTHONUNBUFFERED": "1"}
        devices = []
        for rank in range(nodes):
            argv = [sys.executable, "-m", "ringtrain.bench.scaling", "worker",
                    json.dumps({**config, "rank": rank})]
            popen = lan.popen(rank, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env)
            device = _Device(rank, popen)  # type: ignore[arg-type]
            device.pump = threading.Thread(target=_pump, args=(device,), daemon=True)
            device.pump.start()
            devices.append(device)
        _wait(devices, deadline)
        return [device.result() for device in devices]  # type: ignore[misc]


def _wait(devices: list[_Device], deadline: float) -> None:
    """Until every device exited with a report; raise naming the failed or stuck ones."""
    while any(device.popen.poll() is None for device in devices):
        failed = [d for d in devices if d.popen.poll() not in (None, 0)]
        if failed or time.time() > deadline + START_GRACE_S:
            break
        time.sleep(0.05)
    stuck = False
    for device in devices:  # collect the last lines (a stuck device has reported by now)
        if device.popen.poll() is None:
            stuck = True
            device.popen.kill()
        device.popen.wait(5)
        assert device.pump is not None
        device.pump.join(5)
    bad = [d for d in devices if d.popen.returncode != 0 or d.result() is None]
    if bad:
        why = "timed out" if stuck else "failed"
        raise RingtrainError(
            f"scaling run on {len(devices)} device(s) {why}:\n" + "\n".join(
                f"  device {d.rank} (exit {d.popen.returncode}):\n    {d.tail()}" for d in bad))


def run(args: argparse.Namespace) -> int:
    """Measure every ring size, print the table; returns the exit code."""
    sizes = parse_nodes(args.nodes)
    for name in ("inputs", "hidden", "layers", "batch", "steps", "reduce_repeats", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or not args.timeout > 0:
        raise ConfigError("need --warmup >= 0 and --timeout > 0")
    cores = len(os.sched_getaffinity(0))
    per_core = math.ceil(max(sizes) / cores)
    if not 0 < args.cpu or per_core * args.cpu > 1:
        raise ConfigError(f"{max(sizes)} devices of --cpu {args.cpu:g} core on this machine's "
                          f"{cores} cores put {per_core} x {args.cpu:g} > 1 core on a core: "
                          f"the devices would slow each other down")
    model = model_of(vars(args))
    gradient = model.params.nbytes
    print(f"weak scaling on an emulated LAN: every device {args.cpu:g} core (cgroup CPU quota), "
          f"1 BLAS thread, link {args.rate:g} Mbit/s; model "
          f"{'-'.join(str(w) for w in [args.inputs, *[args.hidden] * args.layers, CLASSES])} "
          f"MLP, {model.num_params / 1e6:.2f} M parameters, gradient all-reduce "
          f"{gradient / 1e6:.2f} MB{f' ({args.compression})' if args.compression else ''}; "
          f"{args.batch} samples per device per step; "
          f"{args.warmup} warm-up + {args.steps} timed steps; {args.repeats} runs of each N, "
          f"interleaved", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # clean up the LAN on `kill` too
    runs: dict[int, list[Row]] = {nodes: [] for nodes in sizes}
    with tempfile.TemporaryDirectory(prefix="ringtrain-scaling-") as tmp:
        key_file = write_key_file(Path(tmp) / "job.key", JobKey.generate())
        for repeat in range(args.repeats):
            for nodes in sizes:
                row = summarize(nodes, args.batch, args.steps, measure(nodes, args, key_file))
                runs[nodes].append(row)
                print(f"  run {repeat + 1}, {nodes} device(s): {row.step * 1e3:.0f} ms per "
                      f"step, {row.throughput:.0f} samples/s", flush=True)
    rows = [median_run(runs[nodes]) for nodes in sizes]
    print(table(rows))
    print(f"each row: the run of median samples/s out of {args.repeats}.")
    print(f"efficiency = samples/s(N) / (N x samples/s(1)); gradient {gradient:,} bytes per "
          f"all-reduce{f', compressed {args.compression}' if args.compression else ''}; "
          f"share = all-reduce / step; waiting = all-reduce in the step - all-reduce alone; "
          f"CPU cores = CPU time / wall time (budget {args.cpu:g}); eth0 ideal = 2(N-1)/N x "
          f"the uncompressed gradient.")
    starved = [row.nodes for row in rows if row.compute_cpu < STARVED * args.cpu]
    if starved:
        print(f"warning: with N = {starved} the devices computed on less CPU than their "
              f"budget: the machine was busy with other work, so those rows understate "
              f"throughput. Measure again on an idle machine.")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "worker":
        sys.exit(worker_main(sys.argv[2:]))
    from ..cli.main import main

    sys.exit(main(["bench-scaling", *sys.argv[1:]]))
