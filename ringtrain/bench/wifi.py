"""Time to accuracy on slow links: ``ringtrain bench-wifi``.

    sudo ringtrain bench-wifi                     # 1000, 100, 20 Mbit/s; even and one slow
    sudo ringtrain bench-wifi --rates 100 --runs even --png wifi.png

Linux and root only; torch (``pip install /opt/wheels/torch-2.13.0+cpu-*.whl``) for the
reference and matplotlib for ``--png``. For every link rate and run, a fresh emulated LAN
(:mod:`ringtrain.lab.netns`) of 4 devices, each a network namespace whose link is shaped to
the rate and a CPU budget of ``--cpu`` cores (as ``bench-scaling`` makes them); in the
``slow`` run the last device gets half that budget. The default budget, 0.3 core, leaves the
host room: 4 devices of 0.45 core take 90 % of a 2-core host, and the kernel's link shaping
and this process then take from the devices what the weak-scaling ratio counts. On it, every
method trains the same MLP (64-2048-1024-10, 2.24 M parameters, a 9 MB gradient) on the
digits that ship with ringtrain, from the same initial parameters, in the same data order,
``--batch`` samples per device per step, Adam inner/step optimizer (a constant learning
rate, or with ``--lr-schedule cosine`` one that decays to 0 over the run), for ``--epochs``
epochs or until ``--time-limit``:

* ``ddp``: torch DistributedDataParallel over Gloo, synchronous (the reference);
* ``sync``: ringtrain's synchronous step (one encrypted all-reduce of the gradient per step);
* ``int8``: the same, gradient in 8 bits with error feedback;
* ``powersgd``: the same, gradient matrices as rank-4 PowerSGD factors;
* ``diloco``: rounds of ``--inner-steps`` steps, pseudo-gradient in 4 bits, outer SGD
  (``--outer-lr``, Nesterov ``--outer-momentum``; by default lr 1 without momentum, the
  members' mean, which reached the target sooner than lr 0.4 with momentum 0.9 on these
  short rounds), the round's all-reduce overlapping the next round's steps;
* ``streaming`` (not in the default list): ``diloco`` with the parameters synced in
  ``--fragments`` fragments, one every ``--inner-steps / --fragments`` steps (Streaming
  DiLoCo);
* ``async``: rounds that close every ``--round-seconds`` of stepping (the first
  ``--warmup-rounds`` shorter), each device contributing the steps it made (4-bit
  pseudo-gradient, overlapped).

Rank 0 evaluates the shared model on the held-out test set after every step (every applied
round), with the clock stopped. "to target" is the first time it reaches ``--target``; "vs
DDP" is DDP's time to target over the method's, measured in the same run (a ">" when DDP did
not reach it within the time limit: then the ratio is a lower bound). "final" is the test
accuracy at the end of the epochs (missing when the time limit cut the run: synchronous
methods compute the same steps at every rate, so their final accuracy is that of the fastest
rate). "samples/s" counts every device's training samples per second of the run; "scaling"
is that over 4 x a single device's (one device of the same budget training alone, no
communication, measured just before each rate's methods: ``--alone-runs`` runs, the median):
weak-scaling efficiency. "ring CPU" is the devices' mean share of their CPU time spent off
the training thread (the node's engine, ZeroMQ's I/O: encryption, codecs, the protocol):
it comes out of the same budget as training, so it is most of what scaling loses.
"""

from __future__ import annotations

import argparse
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

from ..comm.security import JobKey, write_key_file
from ..errors import ConfigError, RingtrainError
from .wifi_worker import DONE, POINT

PORT = 7177
DEVICES = 4
DEFAULT_METHODS = ("ddp", "sync", "int8", "powersgd", "diloco", "async")
METHODS = (*DEFAULT_METHODS, "streaming")
RUNS = ("even", "slow")
_THREADS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# the ring's default progress floor (2 s) is shorter than the 8 MiB a send queue holds takes
# at 20 Mbit/s (3.4 s): the start-up broadcast of parameters and Adam state (27 MB) then
# reads as a stalled member. On slow links a member may wait longer for the next segment.
SLOW_LINK_SETTINGS = {"RINGTRAIN_PROGRESS_FLOOR": "10", "RINGTRAIN_PROGRESS_TIMEOUT": "30"}

METHOD = (__doc__ or "").partition("\n\n")[2].partition("\n\n")[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``ringtrain bench-wifi``; ``--help`` also explains the method."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = METHOD
    parser.add_argument("--rates", default="1000,100,20",
                        help="link rates in Mbit/s, comma-separated (default 1000,100,20)")
    parser.add_argument("--runs", default="even,slow",
                        help="even: 4 equal devices; slow: the last at half the CPU "
                             "(default even,slow)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated among {','.join(METHODS)} (default "
                             f"{','.join(DEFAULT_METHODS)})")
    parser.add_argument("--cpu", type=float, default=0.3,
                        help="CPU budget of every device, in cores (default 0.3)")
    parser.add_argument("--hidden", default="2048,1024",
                        help="hidden layer widths (default 2048,1024: 2.24 M parameters)")
    parser.add_argument("--batch", type=int, default=64,
                        help="samples per device per step (default 64)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (1e-3)")
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                        help="every method's (inner) learning rate over the run: constant "
                             "(default) or cosine decay to 0")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per run (default 8)")
    parser.add_argument("--seed", type=int, default=0,
                        help="data order of every method (default 0); the final accuracy of "
                             "one method moves by ~1.7 points from one data order to another")
    parser.add_argument("--round-epochs", type=int, default=None,
                        help="epochs for diloco, streaming and async (default: --epochs); "
                             "rounds send "
                             "little, so more epochs cost them compute time only")
    parser.add_argument("--target", type=float, default=0.95,
                        help="test accuracy to reach (default 0.95)")
    parser.add_argument("--inner-steps", type=int, default=10,
                        help="diloco, streaming: steps per round (default 10)")
    parser.add_argument("--fragments", type=int, default=2,
                        help="streaming: fragments synced in turn (default 2)")
    parser.add_argument("--outer-lr", type=float, default=1.0,
                        help="diloco, async: outer learning rate (default 1: with momentum "
                             "0, the new model is the members' weighted mean)")
    parser.add_argument("--outer-momentum", type=float, default=0.0,
                        help="diloco, async: the outer optimizer's Nesterov momentum "
                             "(default 0; DiLoCo's paper uses 0.9 with lr 0.7 for rounds of "
                             "hundreds of steps)")
    parser.add_argument("--round-seconds", type=float, default=4.0,
                        help="async: seconds of stepping per round (default 4)")
    parser.add_argument("--warmup-rounds", type=int, default=1,
                        help="async: the first N rounds shorter, round-seconds / 2^N doubling "
                             "up to round-seconds (default 1: a first round of 2 s)")
    parser.add_argument("--alone-runs", type=int, default=1,
                        help="runs of the single device the scaling divides by, before each "
                             "rate's methods (default 1)")
    parser.add_argument("--time-limit", type=float, default=100.0,
                        help="seconds of training after which a run is stopped (default 100)")
    parser.add_argument("--png", default=None,
                        help="write accuracy against time per method to this PNG "
                             "(needs matplotlib)")
    parser.add_argument("--json", default=None, help="write every curve to this JSON file")


def parse_list(text: str, kind: type, what: str) -> list[Any]:
    """``"1000,100"`` -> ``[1000.0, 100.0]``.

    Raises:
        ConfigError: an empty list or an item that does not parse.
    """
    try:
        items = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ConfigError(f"{what} must be a comma-separated list, got {text!r}") from exc
    if not items:
        raise ConfigError(f"{what} is empty")
    return items


@dataclass
class Curve:
    """One method's run: rank 0's (seconds, accuracy, samples) points and the outcome."""

    method: str
    rate: float
    run: str
    points: list[tuple[float, float, int]] = field(default_factory=list)
    finished: bool = False
    samples: int = 0  # every device's training samples (finished runs)
    seconds: float = 0.0  # the run's length on rank 0's clock (finished runs)
    ring_cpu: float | None = None  # devices' mean CPU share off the main thread (ringtrain)
    single: float | None = None  # samples/s of one device alone, measured before this run
    failed: str = ""  # why the run failed (empty: it did not)

    def time_to(self, target: float) -> float | None:
        """Seconds until the test accuracy first reached ``target`` (None: never)."""
        return next((t for t, accuracy, _ in self.points if accuracy >= target), None)

    @property
    def final(self) -> float | None:
        """Test accuracy at the end of the epochs (None: the time limit cut the run)."""
        return self.points[-1][1] if self.finished and self.points else None

    @property
    def throughput(self) -> float | None:
        """Every device's samples per second (None: unfinished run)."""
        return self.samples / self.seconds if self.finished and self.seconds > 0 else None


def ratio_text(reference: Curve | None, curve: Curve, target: float, limit: float) -> str:
    """DDP's time to target over ``curve``'s: ``12.3x``, ``>12.3x`` (DDP never got there in
    ``limit`` seconds: a lower bound) or ``-``."""
    mine = curve.time_to(target)
    if reference is None or mine is None or mine <= 0:
        return "-"
    theirs = reference.time_to(target)
    if theirs is None:
        return f">{limit / mine:.1f}x"
    return f"{theirs / mine:.1f}x"


def table(curves: list[Curve], target: float, limit: float) -> str:
    """The result table, Markdown."""
    lines = ["| run | Mbit/s | method | to target s | vs DDP | final | samples/s | scaling | "
             "ring CPU |", "|---|---|---|---|---|---|---|---|---|"]
    for curve in curves:
        reference = next((c for c in curves if c.method == "ddp" and c.rate == curve.rate
                          and c.run == curve.run), None)
        reached = curve.time_to(target)
        throughput, single = curve.throughput, curve.single
        if curve.failed:
            lines.append(f"| {curve.run} | {curve.rate:g} | {curve.method} | failed: "
                         f"{curve.failed[:60]} | | | | | |")
            continue
        lines.append(
            f"| {curve.run} | {curve.rate:g} | {curve.method} | "
            f"{f'{reached:.1f}' if reached is not None else f'>{limit:.0f}'} | "
            f"{ratio_text(reference, curve, target, limit) if curve.method != 'ddp' else '1'} | "
            f"{f'{curve.final:.3f}' if curve.final is not None else '-'} | "
            f"{f'{throughput:.0f}' if throughput else '-'} | "
            f"{f'{throughput / (DEVICES * single):.2f}' if throughput and single else '-'} | "
            f"{f'{curve.ring_cpu:.0%}' if curve.ring_cpu is not None else '-'} |")
    return "\n".join(lines)


def plot(curves: list[Curve], target: float, path: str) -> None:
    """Accuracy against wall-clock time, one panel per (run, rate), one line per method.

    Raises:
        ConfigError: matplotlib is not installed.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("--png needs matplotlib: pip install 'ringtrain[plot]'") from exc
    panels = sorted({(c.run, c.rate) for c in curves}, key=lambda p: (p[0], -p[1]))
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for axis, (run, rate) in zip(axes[0], panels, strict=True):
        for curve in curves:
            if (curve.run, curve.rate) == (run, rate) and curve.points:
                axis.plot([max(t, 1e-2) for t, _, _ in curve.points],
                          [a for _, a, _ in curve.points], label=curve.method)
        axis.axhline(target, color="grey", linestyle=":")
        axis.set_xscale("log")
        axis.set_ylim(0.5, 1.0)
        axis.set_title(f"{rate:g} Mbit/s, {run} devices")
        axis.set_xlabel("wall-clock seconds (log)")
        axis.set_ylabel("test accuracy")
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


# running the devices ------------------------------------------------------------------------

def _pump(popen: subprocess.Popen[str], lines: list[str]) -> None:
    for line in popen.stdout:  # type: ignore[union-attr]
        lines.append(line.rstrip("\n"))


def measure(method: str, rate: float, run: str, devices: int, args: argparse.Namespace,
            key_file: Path) -> Curve:
    """One method on a fresh emulated LAN; rank 0's curve, cut at ``--time-limit``.

    Raises:
        RingtrainError: a device failed; the message holds its last lines.
    """
    from ..lab.netns import EmulatedLan  # only here: it needs root and iproute2

    budgets = [args.cpu] * devices
    if run == "slow" and devices > 1:
        budgets[-1] = args.cpu / 2
    curve = Curve(method, rate, run)
    with EmulatedLan(devices, rate_mbit=rate, cpu_cores=budgets) as lan:
        config = {"addresses": [f"{lan.address(i)}:{PORT}" for i in range(devices)],
                  "key_file": str(key_file), "method": method, "timeout": args.time_limit + 60,
                  "hidden": parse_list(args.hidden, int, "--hidden"),
                  **{name: getattr(args, name) for name in (
                      "batch", "lr", "lr_schedule", "seed", "epochs", "inner_steps",
                      "outer_lr", "outer_momentum", "round_seconds", "warmup_rounds",
                      "fragments")}}
        if method in ("diloco", "streaming", "async") and args.round_epochs:
            config["epochs"] = args.round_epochs
        env = {**os.environ, **_THREADS, **SLOW_LINK_SETTINGS, "PYTHONUNBUFFERED": "1",
               "GLOO_SOCKET_IFNAME": "eth0"}
        outputs: list[list[str]] = []
        popens = []
        for rank in range(devices):
            argv = [sys.executable, "-m", "ringtrain.bench.wifi_worker",
                    json.dumps({**config, "rank": rank})]
            popen = lan.popen(rank, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env)
            lines: list[str] = []
            threading.Thread(target=_pump, args=(popen, lines), daemon=True).start()
            popens.append(popen)
            outputs.append(lines)
        started = None
        deadline = time.monotonic() + args.time_limit + 120  # start-up included
        while any(p.poll() is None for p in popens):
            if any(p.poll() not in (None, 0) for p in popens):
                break
            if started is None and any(line.startswith(POINT) for line in outputs[0]):
                started = time.monotonic()  # training began: the limit counts from here
                deadline = started + args.time_limit
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for popen in popens:
            if popen.poll() is None:
                popen.kill()
            popen.wait(10)
        time.sleep(0.2)  # let the pumps read the last lines
        curve.points = [(float(t), float(a), int(n)) for t, a, n in
                        (line[len(POINT):].split() for line in outputs[0]
                         if line.startswith(POINT))]
        done = [line for lines in outputs for line in lines if line.startswith(DONE)]
        first = next((line for line in outputs[0] if line.startswith(DONE)), None)
        failed = [(rank, p.returncode) for rank, p in enumerate(popens)
                  if p.returncode not in (0, -signal.SIGKILL)]
        if failed:
            rank, code = failed[0]
            raise RingtrainError(f"{method} at {rate:g} Mbit/s ({run}): device {rank} exited "
                                 f"with {code}:\n    " + "\n    ".join(outputs[rank][-30:]))
        if len(done) == devices:
            summaries = [json.loads(line[len(DONE):]) for line in done]
            curve.finished = True
            curve.samples = sum(s["samples"] for s in summaries)
            shares = [s["ring_cpu"] for s in summaries if "ring_cpu" in s]
            curve.ring_cpu = statistics.mean(shares) if shares else None
            # rank 0's clock: it alone stops while it evaluates (the others go on, or wait)
            curve.seconds = json.loads(first[len(DONE):])["seconds"] if first else 0.0
    return curve


def run(args: argparse.Namespace) -> int:
    """Run every rate, run and method; print the table (and write the PNG)."""
    rates = parse_list(args.rates, float, "--rates")
    runs = parse_list(args.runs, str, "--runs")
    methods = parse_list(args.methods, str, "--methods")
    for name, allowed, given in (("--runs", RUNS, runs), ("--methods", METHODS, methods)):
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            raise ConfigError(f"{name}: unknown {unknown}; choose among {', '.join(allowed)}")
    if "ddp" in methods:
        from .baselines import torch_available
        if not torch_available():
            raise ConfigError("the ddp reference needs torch with Gloo: pip install "
                              "/opt/wheels/torch-2.13.0+cpu-*.whl (or leave ddp out of "
                              "--methods)")
    print(f"time to {args.target:.0%} test accuracy on an emulated LAN of {DEVICES} devices "
          f"of {args.cpu:g} core; MLP 64-{args.hidden.replace(',', '-')}-10 on digits; "
          f"{args.batch} samples per device per step; {args.lr_schedule} learning rate "
          f"{args.lr:g}; {args.epochs} epochs or "
          f"{args.time_limit:g} s", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # clean up the LAN on `kill` too
    curves: list[Curve] = []
    with tempfile.TemporaryDirectory(prefix="ringtrain-wifi-") as tmp:
        key_file = write_key_file(Path(tmp) / "job.key", JobKey.generate())
        for run_kind in runs:
            for rate in rates:
                single = alone_throughput(args, key_file)
                for method in methods:
                    try:
                        curve = measure(method, rate, run_kind, DEVICES, args, key_file)
                    except RingtrainError as exc:  # one failed run does not end the others
                        print(f"  {run_kind} {rate:g} Mbit/s {method}: FAILED: "
                              f"{str(exc).splitlines()[-1][:300]}", flush=True)
                        curve = Curve(method, rate, run_kind, failed=str(exc).splitlines()[0])
                    curve.single = single
                    curves.append(curve)
                    reached = curve.time_to(args.target)
                    print(f"  {run_kind} {rate:g} Mbit/s {method}: to target "
                          f"{'-' if reached is None else f'{reached:.1f} s'}, last accuracy "
                          f"{curve.points[-1][1] if curve.points else math.nan:.3f}"
                          f"{'' if curve.finished else ' (cut at the time limit)'}",
                          flush=True)
    print(table(curves, args.target, args.time_limit))
    if args.json:
        Path(args.json).write_text(json.dumps([vars(c) for c in curves]))
    if args.png:
        plot(curves, args.target, args.png)
        print(f"wrote {args.png}")
    return 0


def alone_throughput(args: argparse.Namespace, key_file: Path) -> float | None:
    """Samples/s of one device of the budget training alone (no ring): the median of
    ``--alone-runs`` runs, measured before each rate's methods, so that the host's speed of
    the moment divides the scaling (it moved one device by up to ~25 % between runs)."""
    alone = sorted(filter(None, (measure("diloco", 1000.0, "even", 1, args,  # no traffic:
                                         key_file).throughput          # any link rate
                                 for _ in range(max(1, args.alone_runs)))))
    single = statistics.median(alone) if alone else None  # a failed run counts as none
    print(f"  one device alone: {single or 0:.0f} samples/s (median of "
          f"{', '.join(f'{value:.0f}' for value in alone)})", flush=True)
    return single


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    from ..cli.main import main

    sys.exit(main(["bench-wifi", *sys.argv[1:]]))
