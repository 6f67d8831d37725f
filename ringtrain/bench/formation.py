"""``ringtrain bench-formation``: how long zero-config ring formation takes on an emulated LAN.

    sudo ringtrain bench-formation --nodes 4 8 --repeats 5

Linux and root only (network namespaces, see ``ringtrain.lab.netns``). For each ring size N and
each repetition, on a fresh job name: N-1 real ``ringtrain node`` processes (the built-in
job, no addresses, a job key, mDNS only) start in their own namespaces and wait, then the
last one starts. Measured from the moment the last process is launched to the moment the
last node prints that it is in the ring of N, split into the last node's start-up (its
interpreter, imports, model and data, up to its "looking for" line) and the formation
after that (announce, discover, handshakes, the ``Settings.settle`` window, agreement).

The N-1 nodes start first so that the figure is what a user sees when the last device
comes up, and not N interpreters competing for this machine's few cores at once.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..comm.security import JobKey, write_key_file
from ..config import Settings
from ..errors import ConfigError
from ..lab.netns import EmulatedLan

GOAL_S = 2.0
_RING_RE = re.compile(r"ringtrain node (\S+): in a ring of (\d+) \(generation (\d+)\)")
_LOOKING = "looking for at least"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the subcommand."""
    parser.add_argument("--nodes", type=int, nargs="+", default=[4, 8],
                        help="ring sizes to measure (default 4 8)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="formations per ring size (default 5)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds one formation may take before it counts as failed "
                             "(default 60)")


@dataclass
class _Node:
    """One `ringtrain node` process and the times its lines arrived."""

    popen: subprocess.Popen[str]
    launched: float
    lines: list[tuple[float, str]] = field(default_factory=list)

    def first(self, predicate: object) -> float | None:
        for t, line in list(self.lines):
            if predicate(line):  # type: ignore[operator]
                return t
        return None


@dataclass(frozen=True)
class Formation:
    """One measured formation, in seconds after the last node's launch."""

    start_up: float  # the last node's launch to its "looking for" line
    formed: float  # the last node's launch to the last "in a ring of N" line


def run(args: argparse.Namespace) -> int:
    """Measure each ring size ``--repeats`` times; print median, min and max."""
    if args.repeats < 1 or any(n < 2 for n in args.nodes) or not args.timeout > 0:
        raise ConfigError("need --repeats >= 1, every --nodes >= 2 and --timeout > 0")
    settle = Settings().settle
    print(f"ring formation on an emulated LAN (one network namespace per node, real "
          f"multicast); settle window {settle} s; goal under {GOAL_S:.0f} s", flush=True)
    failed = 0
    summary = []
    with tempfile.TemporaryDirectory(prefix="ringtrain-bench-") as tmp:
        key_file = write_key_file(Path(tmp) / "job.key", JobKey.generate())
        for n in args.nodes:
            with EmulatedLan(n) as lan:
                results = []
                for repeat in range(args.repeats):
                    try:
                        result = measure(lan, key_file, Path(tmp), args.timeout)
                    except RuntimeError as exc:
                        failed += 1
                        print(f"  {n} nodes, run {repeat + 1}: FAILED: {exc}", flush=True)
                        continue
                    results.append(result)
                    print(f"  {n} nodes, run {repeat + 1}: ring formed {result.formed:.2f} s "
                          f"after the last node's launch (its start-up {result.start_up:.2f} s "
                          f"+ formation {result.formed - result.start_up:.2f} s)", flush=True)
            if results:
                summary.append(_summary_line(n, results))
    print("summary:\n  " + "\n  ".join(summary or ["no formation succeeded"]))
    return 1 if failed else 0


def _summary_line(n: int, results: list[Formation]) -> str:
    formed = [r.formed for r in results]
    after = [r.formed - r.start_up for r in results]
    median = statistics.median(formed)
    return (f"{n} nodes: launch of the last node to a formed ring median {median:.2f} s "
            f"(min {min(formed):.2f}, max {max(formed):.2f}, {len(results)} runs); of which "
            f"formation after its start-up median {statistics.median(after):.2f} s; goal "
            f"{GOAL_S:.0f} s {'met' if median < GOAL_S else 'NOT met'}")


def measure(lan: EmulatedLan, key_file: Path, tmp: Path, timeout: float) -> Formation:
    """One formation of ``lan.n`` nodes on a fresh job; every process is stopped after.

    Raises:
        RuntimeError: it did not form one ring of all nodes within ``timeout`` (the message
            carries every node's last lines).
    """
    job = "bench-" + uuid.uuid4().hex[:8]
    nodes: list[_Node] = []
    try:
        for i in range(lan.n - 1):
            nodes.append(_start(lan, i, job, key_file, tmp))
        deadline = time.monotonic() + timeout
        _wait(nodes, lambda line: _LOOKING in line, deadline, "start")
        last = _start(lan, lan.n - 1, job, key_file, tmp)
        nodes.append(last)
        rings = _wait(nodes, lambda line: _RING_RE.search(line) is not None, deadline,
                      "join the ring")
        seen = {(m[2], m[3]) for node in nodes for _, line in node.lines
                if (m := _RING_RE.search(line))}
        if seen != {(str(lan.n), seen and next(iter(seen))[1])}:
            raise RuntimeError(f"not one ring of {lan.n}: {sorted(seen)}; "
                               f"{_tails(nodes)}")
        started = last.first(lambda line: _LOOKING in line)
        assert started is not None  # _wait saw its ring line, which comes after it
        return Formation(started - last.launched, max(rings) - last.launched)
    finally:
        for node in nodes:
            if node.popen.poll() is None:
                node.popen.kill()
        for node in nodes:
            node.popen.wait(5)


def _start(lan: EmulatedLan, i: int, job: str, key_file: Path, tmp: Path) -> _Node:
    argv = [sys.executable, "-m", "ringtrain", "node", "--job", job, "--node-id", f"n{i}",
            "--key-file", str(key_file), "--min-nodes", str(lan.n), "--epochs", "1000000",
            "--checkpoint-dir", str(tmp / f"{job}-n{i}")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    launched = time.monotonic()
    popen = lan.popen(i, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                      stderr=subprocess.STDOUT, text=True, env=env)
    node = _Node(popen, launched)  # type: ignore[arg-type]
    threading.Thread(target=_pump, args=(node,), daemon=True).start()
    return node


def _pump(node: _Node) -> None:
    for line in node.popen.stdout:  # type: ignore[union-attr]
        node.lines.append((time.monotonic(), line.rstrip("\n")))


def _wait(nodes: list[_Node], predicate: object, deadline: float, what: str) -> list[float]:
    """When each node first printed a line matching ``predicate``; bounded by ``deadline``."""
    while True:
        times = [node.first(predicate) for node in nodes]
        if all(t is not None for t in times):
            return times  # type: ignore[return-value]
        dead = [i for i, node in enumerate(nodes) if node.popen.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"node(s) {dead} exited" if dead else "timed out"
            raise RuntimeError(f"{why} before every node could {what}; {_tails(nodes)}")
        time.sleep(0.005)


def _tails(nodes: list[_Node]) -> str:
    return "; ".join(f"n{i}: {' | '.join(line for _, line in node.lines[-3:]) or '-'}"
                     for i, node in enumerate(nodes))
