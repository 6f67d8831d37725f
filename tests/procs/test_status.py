"""``ringtrain status`` reads a 4-node ring of real ``ringtrain node`` processes, and names a
SIGSTOPped node as the one holding the collective up.

The ring needs all 4 nodes (``--min-nodes 4``), so it cannot go on without the stopped
one: the others give up on the collective it holds up and wait for it. Heartbeats get 10 s
(``--heartbeat-timeout``) so that a loaded test machine does not suspect a node that is
merely slow before the SIGSTOP; the stop is then found by the progress deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ringtrain.comm.security import JobKey, write_key_file
from ringtrain.testing import free_ports

DEADLINE_S = 120.0  # generous: this machine can be very loaded; a hang still fails


def status(key_file: Path, run_dir: Path, timeout: float = 2.0, *extra: str
           ) -> tuple[int, dict]:
    done = subprocess.run([sys.executable, "-m", "ringtrain", "status", "--key-file",
                           str(key_file), "--run-dir", str(run_dir), "--timeout", str(timeout),
                           "--json", *extra], capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"status printed no JSON: {done.stdout!r} {done.stderr!r}"
    return done.returncode, json.loads(lines[-1])


def test_status_of_a_four_node_ring_names_the_stopped_node(tmp_path: Path) -> None:
    key_file = write_key_file(tmp_path / "job.key", JobKey.generate())
    ports = free_ports(4)
    run_dir = tmp_path / "run"
    names = [f"n{i}" for i in range(4)]
    logs = [(tmp_path / f"{name}.log").open("w") for name in names]
    processes = [subprocess.Popen(
        [sys.executable, "-m", "ringtrain", "node", "--key-file", str(key_file),
         "--no-discovery", "--node-id", names[i], "--port", str(ports[i]),
         *[a for j in range(4) if j != i for a in ("--peer", f"127.0.0.1:{ports[j]}")],
         "--min-nodes", "4", "--epochs", "100000", "--run-dir", str(run_dir),
         "--status-port", "0", "--heartbeat-timeout", "10"],
        stdout=logs[i], stderr=subprocess.STDOUT) for i in range(4)]
    report: dict = {}
    stopped = 2
    try:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:  # every node answers, and training has begun
            code, report = status(key_file, run_dir)
            nodes = report["nodes"]
            if code == 0 and len(nodes) == 4 and all(
                    (s.get("step") or 0) > 0 for s in nodes.values()):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the ring did not train within {DEADLINE_S} s: {report}")
        assert sorted(report["nodes"]) == names
        for node in report["nodes"].values():
            assert node["answering"] and node["view"]["generation"] >= 1
            assert node["collective"]["name"] and node["links"] is not None, node

        os.kill(processes[stopped].pid, signal.SIGSTOP)
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:  # the others get stuck waiting on it
            code, report = status(key_file, run_dir)
            if report.get("holdup"):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"no node named as holding the ring up: {report}")
        assert code == 1  # a node did not answer
        assert report["nodes"][names[stopped]]["answering"] is False
        assert report["holdup"]["node"] == names[stopped], report["holdup"]
        assert "does not answer" in report["holdup"]["reason"], report["holdup"]
        sentence = report["holdup"]["sentence"]
        assert sentence.startswith(f"node {names[stopped]} held up ")
        for name in names:
            if name != names[stopped]:
                assert report["nodes"][name]["answering"], report["nodes"][name]
        # the plain view marks it too
        done = subprocess.run([sys.executable, "-m", "ringtrain", "status", "--key-file",
                               str(key_file), "--run-dir", str(run_dir), "--timeout", "2"],
                              capture_output=True, text=True, timeout=120)
        row = next(line for line in done.stdout.splitlines() if line.startswith("n2 "))
        assert "NOT ANSWERING" in row and "holding the collective up" in row, done.stdout
        assert f"node {names[stopped]} held up" in done.stdout
        # a stranger without the key learns nothing
        stranger = write_key_file(tmp_path / "other.key", JobKey.generate())
        code, strange = status(stranger, run_dir, 1.0)
        assert code == 1 and not any(s["answering"] for s in strange["nodes"].values())
        # SIGUSR1 dumps a node's flight recorder, which names the blamed node too: the stopped
        # node's successor's (it waits on the stopped node itself; a node further on, which
        # waits on a live member, blames the member silent the longest: the stopped one too)
        waiter = names[(stopped + 1) % 4]
        os.kill(processes[(stopped + 1) % 4].pid, signal.SIGUSR1)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not list((tmp_path / "run" / waiter).glob(
                "flight-*.json")):
            time.sleep(0.2)
        dump = json.loads(next((tmp_path / "run" / waiter).glob("flight-*.json")).read_text())
        assert dump["reason"] == "SIGUSR1"
        assert dump["collectives"][-1]["suspect"] == names[stopped]
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            process.wait(10)
        for log in logs:
            log.close()
