"""Peers from DNS (``--peers-dns``), against a real authoritative DNS server (dnsmasq) in a
network namespace, serving the records a Kubernetes headless Service would: one A record per
pod under the Service's name, and SRV records ``_ringtrain._tcp.<service>`` naming each pod.

Pods come and go as in a StatefulSet: the server's hosts file changes and dnsmasq reloads it
(SIGHUP), with a 1 s TTL; the nodes look the name up again every second. The nodes resolve
through the namespace's /etc/resolv.conf with a search list, as a pod does, so they are given
the short Service name. Needs root, iproute2 and dnsmasq (Debian dnsmasq-base); skips otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ringtrain.comm.security import JobKey, write_key_file
from ringtrain.lab.netns import EmulatedLan

pytest.importorskip("dns.resolver", reason="dnspython (the dns extra) is not installed")
if shutil.which("dnsmasq") is None:
    pytest.skip("dnsmasq not found: install the Debian package dnsmasq-base",
                allow_module_level=True)

NODE = Path(__file__).with_name("dns_node.py")
PORT = 7411
ZONE = "dnsns.svc.cluster.local"
SERVICE = f"ringtrain.{ZONE}"
DEADLINE = 90.0  # each node's own bound; the test's waits are shorter


class Cluster:
    """Pods (node processes in namespaces 0..n-2) and the DNS server (the last namespace)."""

    def __init__(self, lan: EmulatedLan, out: Path):
        self.lan, self.out = lan, out
        self.server = lan.n - 1
        self.hosts = out / "hosts"
        self.pods: dict[int, subprocess.Popen] = {}
        write_key_file(out / "job.key", JobKey.generate())
        for i in range(lan.n - 1):  # every pod resolves through the server, like a pod's
            Path(f"/etc/netns/{lan.namespace(i)}/resolv.conf").write_text(
                f"nameserver {lan.address(self.server)}\nsearch {ZONE} svc.cluster.local "
                f"cluster.local\noptions ndots:5 timeout:1\n")
        self.publish([])
        srv = [f"--srv-host=_ringtrain._tcp.{SERVICE},pod-{i}.{SERVICE},{PORT}"
               for i in range(lan.n - 1)]
        self.dnsmasq = lan.popen(self.server, [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", f"--addn-hosts={self.hosts}", "--local-ttl=1", "--bind-interfaces",
            f"--listen-address={lan.address(self.server)}", "--port=53", "--pid-file=",
            "--user=root", "--log-facility=-", *srv], stdout=subprocess.DEVNULL,
            stderr=open(out / "dnsmasq.log", "w"))
        self.wait("dnsmasq serving", lambda: "read " in (out / "dnsmasq.log").read_text(), 10.0)

    def publish(self, pods: list[int]) -> None:
        """The Service's records list these pods (A for the Service, one name per pod)."""
        lines = [f"{self.lan.address(i)} {SERVICE} pod-{i}.{SERVICE}" for i in pods]
        self.hosts.write_text("\n".join(lines) + "\n")
        if hasattr(self, "dnsmasq"):  # it handles SIGHUP once serving (see __init__)
            self.dnsmasq.send_signal(signal.SIGHUP)  # dnsmasq re-reads its hosts files

    def start(self, i: int) -> None:
        env = {**os.environ, "RINGTRAIN_KEY_FILE": str(self.out / "job.key")}
        self.pods[i] = self.lan.popen(i, [
            sys.executable, str(NODE), "--node-id", f"pod-{i}", "--port", str(PORT),
            "--name", "ringtrain", "--out", str(self.out), "--deadline", str(DEADLINE)],
            env=env, stdout=subprocess.DEVNULL, stderr=open(self.out / f"pod-{i}.stderr", "w"))

    def kill(self, i: int) -> None:
        self.pods.pop(i).kill()

    def report(self, i: int) -> dict:
        try:
            return json.loads((self.out / f"pod-{i}.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait(self, what: str, done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done():
                return
            running = [(f"pod-{j}", p) for j, p in self.pods.items()]
            for i, process in [*running, ("dnsmasq", self.dnsmasq)]:
                if process.poll() is not None:
                    pytest.fail(f"{i} exited {process.returncode} while waiting for {what}:"
                                f"\n{self.diagnosis()}")
            time.sleep(0.1)
        pytest.fail(f"not within {timeout} s: {what}\n{self.diagnosis()}")

    def ring_of(self, pods: list[int]) -> Callable[[], bool]:
        """Every pod in ``pods`` reports a step in one view whose members are exactly them."""
        wanted = sorted(f"pod-{i}" for i in pods)

        def done() -> bool:
            reports = [self.report(i) for i in pods]
            return all(sorted(r.get("members", [])) == wanted for r in reports) and len(
                {r["generation"] for r in reports}) == 1
        return done

    def diagnosis(self) -> str:
        lines = [f"hosts: {self.hosts.read_text()!r}",
                 f"dnsmasq: {(self.out / 'dnsmasq.log').read_text()[-2000:]}"]
        for i in range(self.lan.n - 1):
            lines.append(f"pod-{i}: {self.report(i)}")
            for suffix in (".hang", ".stderr"):
                path = self.out / f"pod-{i}{suffix}"
                if path.exists():
                    lines.append(f"  {suffix}: {path.read_text()[-3000:]}")
        return "\n".join(lines)

    def close(self) -> None:
        (self.out / "stop").write_text("")
        for process in self.pods.values():
            try:
                process.wait(5.0)
            except subprocess.TimeoutExpired:
                process.kill()


def test_pods_found_in_dns_form_a_ring_and_are_replaced(tmp_path: Path) -> None:
    with EmulatedLan(4) as lan:
        cluster = Cluster(lan, tmp_path)
        try:
            # SRV records (target and port per pod) resolve too, through the search list
            cluster.publish([0, 1, 2])
            probe = ("from ringtrain.discovery.dns import lookup, _resolver; "
                     "print(' '.join(lookup('_ringtrain._tcp.ringtrain', 1, "
                     "_resolver(2.0)).endpoints))")
            answer = lan.run(0, [sys.executable, "-c", probe])
            assert answer.stdout.split() == sorted(f"{lan.address(i)}:{PORT}" for i in range(3)), \
                answer.stderr
            # two pods start, each listed in the Service: a ring of two
            cluster.publish([0, 1])
            cluster.start(0)
            cluster.start(1)
            cluster.wait("pods 0 and 1 in a ring", cluster.ring_of([0, 1]), 30.0)
            # pod 1 goes (killed, removed from the Service) and a replacement comes on a new
            # address: pod 0 sees the name list it instead, and the two form the ring
            cluster.kill(1)
            cluster.publish([0, 2])
            cluster.start(2)
            gone = f"{lan.address(1)}:{PORT}"
            cluster.wait("pod 1 gone from DNS and the ring, replacement pod 2 admitted",
                         lambda: cluster.ring_of([0, 2])()
                         and gone not in cluster.report(0)["dns"], 30.0)
        finally:
            cluster.close()
