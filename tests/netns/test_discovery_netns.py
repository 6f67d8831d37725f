"""Discovery over real multicast across an emulated LAN of network namespaces.

Needs root and iproute2 (skips otherwise); the dig test needs Debian dnsutils. Each
node is a separate process (tests/netns/discovery_node.py) in its own namespace. On
failure every node's stdout and stderr are printed.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ringtrain.lab.netns import EmulatedLan

ROOT = Path(__file__).resolve().parents[2]
NODE_SCRIPT = Path(__file__).with_name("discovery_node.py")
DEADLINE_S = 20.0


class Nodes:
    """Discovery node processes on a LAN, with their JSON reports and stderr."""

    def __init__(self, lan: EmulatedLan) -> None:
        self.lan = lan
        self.procs: dict[int, subprocess.Popen[str]] = {}
        self.launched: dict[int, float] = {}
        self.reports: dict[int, list[dict[str, Any]]] = {}
        self.raw: dict[int, list[str]] = {}
        self.errors: dict[int, list[str]] = {}
        self._threads: list[threading.Thread] = []

    def start(self, i: int, job: str, expect: int, interface: str | None = None) -> None:
        argv = [sys.executable, str(NODE_SCRIPT), "--job", job, "--node-id", f"node{i}",
                "--port", str(7000 + i), "--expect", str(expect), "--timeout", "15"]
        if interface is not None:
            argv += ["--interface", interface]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.reports[i], self.raw[i], self.errors[i] = [], [], []
        self.launched[i] = time.time()
        proc = self.lan.popen(i, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
        self.procs[i] = proc  # type: ignore[assignment]
        for stream, sink in ((proc.stdout, self.raw[i]), (proc.stderr, self.errors[i])):
            thread = threading.Thread(target=self._pump, args=(stream, sink, i), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _pump(self, stream: Any, sink: list[str], i: int) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))
            if sink is self.raw[i]:
                try:
                    self.reports[i].append(json.loads(line))
                except json.JSONDecodeError:
                    pass

    def event(self, i: int, name: str, deadline: float) -> dict[str, Any]:
        """The first report ``name`` of node ``i``; fails at the deadline or on an error."""
        while True:
            for report in list(self.reports[i]):
                if report["event"] == name:
                    return report
                if report["event"] == "error":
                    raise AssertionError(f"node {i}: {report['message']}")
            if self.procs[i].poll() is not None and not any(
                    r["event"] == name for r in self.reports[i]):
                time.sleep(0.1)  # let the pump drain
                if not any(r["event"] == name for r in self.reports[i]):
                    raise AssertionError(f"node {i} exited {self.procs[i].returncode} "
                                         f"before {name!r}")
            if time.time() > deadline:
                raise AssertionError(f"node {i}: no {name!r} report within the deadline")
            time.sleep(0.01)

    def send(self, i: int, line: str) -> None:
        """Writes one line to node ``i``'s stdin."""
        stdin = self.procs[i].stdin
        assert stdin is not None
        stdin.write(line + "\n")
        stdin.flush()

    def stop(self, timeout: float = 10.0) -> None:
        for proc in self.procs.values():
            if proc.stdin and not proc.stdin.closed:
                proc.stdin.close()
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for thread in self._threads:
            thread.join(2)

    def dump(self) -> None:
        for i in sorted(self.procs):
            print(f"--- node {i} ({self.lan.namespace(i)} {self.lan.address(i)}) "
                  f"exit {self.procs[i].poll()}")
            print("stdout:\n  " + "\n  ".join(self.raw[i]))
            print("stderr:\n  " + "\n  ".join(self.errors[i]))


@pytest.fixture
def run_nodes() -> Iterator[Any]:
    """Yields a function making (lan, nodes); tears both down, dumping output on failure."""
    made: list[tuple[EmulatedLan, Nodes]] = []

    def make(n: int) -> tuple[EmulatedLan, Nodes]:
        lan = EmulatedLan(n)
        made.append((lan, Nodes(lan)))
        return made[-1]

    failed = True
    try:
        yield make
        failed = False
    finally:
        for lan, nodes in made:
            nodes.stop()
            if failed:
                nodes.dump()
            lan.close()


def test_four_nodes_find_each_other_over_multicast(run_nodes: Any) -> None:
    job = "job-" + uuid.uuid4().hex[:6]
    lan, nodes = run_nodes(6)
    # Node 0: a second, useless interface and no interface chosen (advertises both).
    # Node 1: the same, but pinned to eth0 (advertises only the LAN address).
    lan.add_dummy_interface(0, "10.99.0.1/24")
    lan.add_dummy_interface(1, "10.98.0.1/24")
    try:
        for i in range(4):
            nodes.start(i, job, expect=4, interface="eth0" if i == 1 else None)
        nodes.start(4, job + "-other", expect=1)  # another job on the same LAN
        deadline = time.time() + DEADLINE_S
        found = {i: nodes.event(i, "found", deadline) for i in range(4)}
        nodes.event(4, "found", deadline)

        for i, report in found.items():
            by_id = {a["node_id"]: a for a in report["adverts"]}
            assert sorted(by_id) == [f"node{j}" for j in range(4)], f"node {i} saw {by_id}"
            for j in range(4):
                assert lan.address(j) in by_id[f"node{j}"]["addresses"], (i, j, by_id)
                assert by_id[f"node{j}"]["port"] == 7000 + j
            # Both of node 0's addresses; for its peers the one on the LAN first.
            assert set(by_id["node0"]["addresses"]) == {lan.address(0), "10.99.0.1"}
            if i != 0:
                assert by_id["node0"]["addresses"][0] == lan.address(0)
            assert by_id["node1"]["addresses"] == [lan.address(1)]
        announced = nodes.event(1, "announced", deadline)
        assert announced["interfaces"] == [lan.address(1)]

        # dig, a stock DNS client, asks node 0 directly (unicast to port 5353).
        if shutil.which("dig") is not None:
            answer = lan.run(5, ["dig", "-p", "5353", f"@{lan.address(0)}",
                                 "_ringtrain._tcp.local", "PTR", "+time=2", "+tries=3"],
                             timeout=15)
            print(answer.stdout)
            assert f"{job}-node0._ringtrain._tcp.local." in answer.stdout, answer.stdout

        # Ask for the final views while all five are still announced (a node that
        # already left would have withdrawn its advert), then stop them all.
        for i in range(4):
            nodes.send(i, "final 5")
        finals = {i: nodes.event(i, "final", time.time() + 10) for i in range(4)}
        nodes.stop()
        for i, final in finals.items():
            assert "node4" in [a["node_id"] for a in final["everyone"]], \
                f"node {i} never saw the other job's advert on the wire: {final['everyone']}"
            assert "node4" not in [a["node_id"] for a in final["adverts"]]
            nodes.event(i, "closed", time.time() + 5)

        last_start = max(nodes.launched[i] for i in range(4))
        latency = max(found[i]["t"] for i in range(4)) - last_start
        startup = [found[i]["started"] - nodes.launched[i] for i in range(4)]
        print(f"\n4-node discovery: all found {latency * 1000:.0f} ms after the last launch "
              f"(interpreter start + imports {min(startup) * 1000:.0f}-"
              f"{max(startup) * 1000:.0f} ms of it)")
    finally:
        nodes.stop()


@pytest.mark.skipif(shutil.which("dig") is None,
                    reason="dig missing: install Debian dnsutils")
def test_dig_sees_advert(run_nodes: Any) -> None:
    job = "job-" + uuid.uuid4().hex[:6]
    lan, nodes = run_nodes(2)
    nodes.start(0, job, expect=1)
    nodes.event(0, "found", time.time() + DEADLINE_S)
    answer = lan.run(1, ["dig", "-p", "5353", f"@{lan.address(0)}", "_ringtrain._tcp.local",
                         "PTR", "+time=2", "+tries=3"], timeout=15)
    assert answer.returncode == 0, answer.stderr
    assert f"{job}-node0._ringtrain._tcp.local." in answer.stdout, answer.stdout
    srv = lan.run(1, ["dig", "-p", "5353", f"@{lan.address(0)}",
                      f"{job}-node0._ringtrain._tcp.local", "SRV", "+short", "+time=2",
                      "+tries=3"], timeout=15)
    assert "7000" in srv.stdout, srv.stdout


def test_discovery_latency_four_nodes(run_nodes: Any) -> None:
    """Prints, does not assert: how long a 4-node LAN takes until every node sees all 4."""
    latencies = []
    for _ in range(3):
        job = "lat-" + uuid.uuid4().hex[:6]
        lan, nodes = run_nodes(4)
        for i in range(4):
            nodes.start(i, job, expect=4)
        deadline = time.time() + DEADLINE_S
        found = [nodes.event(i, "found", deadline) for i in range(4)]
        announced = [nodes.event(i, "announced", deadline) for i in range(4)]
        last_launch = max(nodes.launched.values())
        last_announce = max(a["t"] for a in announced)
        done = max(f["t"] for f in found)
        latencies.append((done - last_launch, done - last_announce))
        nodes.stop()
    after_launch = sorted(a for a, _ in latencies)
    after_announce = sorted(b for _, b in latencies)
    print(f"\n4 nodes, all see all: after last launch median "
          f"{statistics.median(after_launch) * 1000:.0f} ms "
          f"({', '.join(f'{x * 1000:.0f}' for x in after_launch)}); after last announce "
          f"median {statistics.median(after_announce) * 1000:.0f} ms")
