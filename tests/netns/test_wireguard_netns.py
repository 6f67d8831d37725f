"""The WireGuard recipe of deploy/wireguard/README.md, run: two devices in two places joined by a
WireGuard tunnel, ringtrain over the tunnel with ``--peer`` (no multicast crosses it).

Each device is a network namespace; their "internet" is a link that carries only WireGuard's
UDP (an nftables rule drops every other packet on it), so the ring can only run through the
tunnel. Uses the kernel's WireGuard where it has one, else wireguard-go (userspace), with
wireguard-tools' ``wg`` to configure it. Needs root, iproute2, nftables and wireguard-tools
plus a WireGuard (Debian wireguard-go); skips otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ringtrain.comm.security import JobKey, write_key_file
from ringtrain.lab.netns import EmulatedLan

if shutil.which("wg") is None or shutil.which("nft") is None:
    pytest.skip("needs wireguard-tools (wg) and nftables", allow_module_level=True)

WG_PORT, RING_PORT = 51820, 7511
OVERLAY = ["10.99.0.1", "10.99.0.2"]

NODE = """
import json, sys, numpy as np
from ringtrain.node.node import Node
rank, listen, peer = int(sys.argv[1]), sys.argv[2], sys.argv[3]
with Node([peer], listen=listen, job="wg", node_id=f"site-{rank}") as node:
    total = node.all_reduce(np.arange(1000, dtype=np.float64) * (rank + 1))
    print(json.dumps({"rank": node.rank, "members": list(node.members),
                      "sum": float(total.sum())}))
"""


def _sh(argv: list[str], stdin: str | None = None) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=20,
                          check=False)
    if done.returncode != 0:
        raise AssertionError(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")
    return done.stdout


def _kernel_wireguard() -> bool:
    probe = subprocess.run(["ip", "link", "add", "rtwgprobe", "type", "wireguard"],
                           capture_output=True, check=False)
    if probe.returncode == 0:
        subprocess.run(["ip", "link", "del", "rtwgprobe"], capture_output=True, check=False)
    return probe.returncode == 0


def test_two_places_joined_by_wireguard_train_with_peer(tmp_path: Path) -> None:
    kernel = _kernel_wireguard()
    if not kernel and shutil.which("wireguard-go") is None:
        pytest.skip("no WireGuard: the kernel has no wireguard module and wireguard-go "
                    "(Debian package) is not installed")
    with EmulatedLan(2) as lan:
        # names unique on this host: wireguard-go's control sockets share /var/run/wireguard
        names = [f"wg{lan.prefix[2:]}{i}" for i in range(2)]
        keys = []
        for i in range(2):
            private = _sh(["wg", "genkey"]).strip()
            keys.append((private, _sh(["wg", "pubkey"], stdin=private + "\n").strip()))
            key_file = tmp_path / f"wg{i}.key"
            key_file.write_text(private + "\n")
            key_file.chmod(0o600)
        try:
            for i in range(2):
                ns, wg, other = lan.namespace(i), names[i], 1 - i
                if kernel:
                    _sh(["ip", "-n", ns, "link", "add", wg, "type", "wireguard"])
                else:
                    _sh(["ip", "netns", "exec", ns, "wireguard-go", wg])
                _sh(["ip", "netns", "exec", ns, "wg", "set", wg, "listen-port", str(WG_PORT),
                     "private-key", str(tmp_path / f"wg{i}.key"), "peer", keys[other][1],
                     "allowed-ips", f"{OVERLAY[other]}/32", "endpoint",
                     f"{lan.address(other)}:{WG_PORT}", "persistent-keepalive", "25"])
                _sh(["ip", "-n", ns, "addr", "add", f"{OVERLAY[i]}/24", "dev", wg])
                _sh(["ip", "-n", ns, "link", "set", wg, "up"])
                # the underlay carries WireGuard only: anything else on eth0 is dropped
                _sh(["ip", "netns", "exec", ns, "nft", "-f", "-"], stdin=(
                    "table inet wgonly {\n"
                    " chain output { type filter hook output priority 0;\n"
                    f'  oifname "eth0" udp dport {WG_PORT} accept\n'
                    '  oifname "eth0" drop\n }\n'
                    " chain input { type filter hook input priority 0;\n"
                    f'  iifname "eth0" udp dport {WG_PORT} accept\n'
                    '  iifname "eth0" drop\n }\n}\n'))
            job_key = tmp_path / "job.key"
            write_key_file(job_key, JobKey.generate())
            env = {**os.environ, "RINGTRAIN_KEY_FILE": str(job_key)}
            nodes = [lan.popen(i, [sys.executable, "-c", NODE, str(i),
                                   f"{OVERLAY[i]}:{RING_PORT}", f"{OVERLAY[1 - i]}:{RING_PORT}"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for i in range(2)]
            reports = []
            for i, process in enumerate(nodes):
                try:
                    out, err = process.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    for p in nodes:
                        p.kill()
                    states = [p.communicate()[1][-2000:] for p in nodes]
                    pytest.fail(f"no ring over WireGuard within 60 s: {states}")
                assert process.returncode == 0, f"site {i}: {err[-3000:]}"
                reports.append(json.loads(out.strip().splitlines()[-1]))
            expected = float((3 * np.arange(1000)).sum())
            assert [r["sum"] for r in reports] == [expected, expected]
            assert all(r["members"] == ["site-0", "site-1"] for r in reports)
            transfer = _sh(["ip", "netns", "exec", lan.namespace(0), "wg", "show", names[0],
                            "transfer"]).split()
            assert int(transfer[1]) > 0 and int(transfer[2]) > 0  # bytes in, out: the tunnel
        finally:
            for i in range(2):  # wireguard-go exits once its interface is gone
                subprocess.run(["ip", "-n", lan.namespace(i), "link", "del", names[i]],
                               capture_output=True, check=False)
