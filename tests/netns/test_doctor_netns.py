"""``ringtrain doctor`` names why a device cannot see its peer, each cause made for it in an
emulated LAN of network namespaces: another job key, a closed port, multicast dropped by an
nftables rule, and the wrong interface (a container bridge).

Node 0 is the device asking; nodes 1 and 4 run ``ringtrain node`` with the job key, nodes
2 and 3 with another key. Needs root, iproute2 and nftables (skips otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ringtrain.comm.security import JobKey, write_key_file
from ringtrain.lab.netns import EmulatedLan

ROOT = Path(__file__).resolve().parents[2]
JOB = "docjob"
PORT = 7077
CLOSED_PORT = 7999


def doctor(lan: EmulatedLan, key: Path, *extra: str) -> dict:
    done = lan.run(0, [sys.executable, "-m", "ringtrain", "doctor", "--job", JOB,
                       "--key-file", str(key), "--listen", "3", "--timeout", "5", "--json",
                       *extra], timeout=60)
    assert done.stdout.strip(), f"doctor printed nothing: {done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def causes(report: dict) -> dict[str, str]:
    return {f["cause"]: f["sentence"] for f in report["findings"]}


@pytest.mark.timeout(400)  # each doctor run is a few seconds; far more on a loaded machine
@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (Debian nftables)")
def test_doctor_names_each_cause(tmp_path: Path) -> None:
    key = write_key_file(tmp_path / "job.key", JobKey.generate())
    other = write_key_file(tmp_path / "other.key", JobKey.generate())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # each key has two nodes, so that neither side gives up on a wrong key (it would, alone
    # with nodes of another key: issue 14); they wait for a third (--min-nodes 3), so every
    # node keeps advertising, untrained, while the doctor asks
    with EmulatedLan(5) as lan:
        logs = [(tmp_path / f"node{i}.log").open("w") for i in (1, 2, 3, 4)]
        for i, key_file, log in ((1, key, logs[0]), (2, other, logs[1]), (3, other, logs[2]),
                                 (4, key, logs[3])):
            lan.popen(i, [sys.executable, "-m", "ringtrain", "node", "--job", JOB,
                          "--key-file", str(key_file), "--node-id", f"node{i}",
                          "--port", str(PORT), "--interface", "eth0", "--min-nodes", "3",
                          "--run-dir",
                          str(tmp_path / f"run{i}"), "--diagnose-after", "600"],
                      stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        peer = f"{lan.address(1)}:{PORT}"
        try:
            # another key, a closed port, and a peer that is fine
            deadline = time.monotonic() + 40
            while True:
                report = doctor(lan, key, "--interface", "eth0", "--peer",
                                f"{lan.address(1)}:{CLOSED_PORT}")
                found = causes(report)
                if "other-key" in found and "ok" in found or time.monotonic() > deadline:
                    break
                time.sleep(1)
            assert any(f"node{i} " in found.get("other-key", "") for i in (2, 3)), report
            assert JobKey.generate().fingerprint not in found["other-key"]
            assert any(f"node{i} " in found.get("ok", "") for i in (1, 4)), report
            assert f"{lan.address(1)}:{CLOSED_PORT}" in found.get("port-closed", ""), report

            # a handshake with another key
            report = doctor(lan, other, "--interface", "eth0", "--peer", peer)
            found = causes(report)
            assert peer in found.get("handshake-refused", ""), report

            # multicast dropped by an nftables rule on this device
            rules = ("table inet doctortest {\n chain input {\n  type filter hook input "
                     "priority 0;\n  udp dport 5353 drop\n }\n}\n")
            subprocess.run(lan.command(0, ["nft", "-f", "-"]), input=rules, text=True,
                           check=True, timeout=20)
            report = doctor(lan, key, "--interface", "eth0", "--peer", peer)
            found = causes(report)
            assert "udp dport 5353 drop" in found.get("mdns-firewall", ""), report
            assert lan.address(1) in found.get("multicast-dropped", ""), report
            assert "ok" in found, report  # the named peer itself is reachable
            subprocess.run(lan.command(0, ["nft", "delete", "table", "inet", "doctortest"]),
                           check=True, timeout=20)

            # the wrong interface: a container bridge, while the job answers on eth0
            for command in (["ip", "link", "add", "docker0", "type", "bridge"],
                            ["ip", "addr", "add", "172.17.0.1/16", "dev", "docker0"],
                            ["ip", "link", "set", "docker0", "up"]):
                subprocess.run(lan.command(0, command), check=True, timeout=20)
            report = doctor(lan, key, "--interface", "docker0")
            found = causes(report)
            assert "docker0" in found.get("container-bridge", ""), report
            assert "eth0" in found.get("wrong-interface", ""), report
        finally:
            for log in logs:
                log.close()
