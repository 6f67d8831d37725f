"""`ringtrain node` on every host of an emulated LAN: zero-config ring formation end to end.

Real ``python -m ringtrain node`` processes (the built-in job), one per network namespace on
one bridge, started with no addresses at all: only the job name, a job key file and mDNS
over real multicast. One LAN and one set of nodes serve the whole module, in this order:

    ns 0-3  n0..n3  the first ring; n0 and n1 also carry a docker-like second interface,
                    172.17.0.1/16 on both (the same address on two hosts, leading nowhere)
    ns 4    n4      started 10 s after the others: must be admitted as a fifth member
    ns 5    other0  the same key, another job: must never be admitted
    ns 6    -       observer: dig (a stock mDNS client), `ringtrain peers`, and forged adverts

Needs root and iproute2 (skips otherwise); the dig case needs Debian dnsutils. On failure
every process's output is printed. Nothing here asserts speed: deadlines only catch hangs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import ringtrain
from ringtrain.comm.security import JobKey
from ringtrain.lab.netns import EmulatedLan

ROOT = Path(__file__).resolve().parents[2]
SPOOF_SCRIPT = Path(__file__).with_name("spoof_advert.py")
PORT = 7077  # the default of `ringtrain node`: every namespace has its own
FIRST = [0, 1, 2, 3]
JOINER, OTHER, OBSERVER = 4, 5, 6
DOCKER_LIKE = "172.17.0.1/16"  # on n0 and n1 both, like docker0 on two hosts
JOIN_DELAY_S = 10.0
HANG_S = 30.0  # bound on any one wait: only there to catch hangs

RING_RE = re.compile(r"ringtrain node (\S+): in a ring of (\d+) \(generation (\d+)\) after "
                     r"\S+ s; members: (.*)$")
EPOCH_RE = re.compile(r"^\[(\S+) \d+/(\d+)\] epoch\s+(\d+)/\d+\s+(loss \S+\s+test loss \S+\s+"
                      r"test accuracy \S+)")
FINAL_RE = re.compile(r"ringtrain node (\S+): (left the ring|done) at step (\d+), model "
                      r"generation (\d+) step (\d+) hash (\w+), .* re-formations (\d+)")


@dataclass
class Ring:
    """One "in a ring of N (generation G) ... members: ..." line."""

    node: str
    size: int
    generation: int
    members: tuple[str, ...]


@dataclass
class Process:
    """A process in a namespace, its output lines with arrival times."""

    name: str
    namespace: int
    popen: subprocess.Popen[str]
    out: list[tuple[float, str]] = field(default_factory=list)
    err: list[tuple[float, str]] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)


class Cluster:
    """The module's LAN, its processes, and waits on their output."""

    def __init__(self, lan: EmulatedLan, tmp: Path) -> None:
        self.lan = lan
        self.tmp = tmp
        self.job = "ring-" + uuid.uuid4().hex[:6]
        self.key_file = tmp / "job.key"
        ringtrain.write_key_file(self.key_file, JobKey.generate())
        self.procs: dict[str, Process] = {}
        self.t0 = time.monotonic()

    # processes ------------------------------------------------------------------------------

    def start(self, name: str, i: int, argv: list[str], stdin: bool = False) -> Process:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        popen = self.lan.popen(i, argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
        proc = Process(name, i, popen)  # type: ignore[arg-type]
        for stream, sink in ((popen.stdout, proc.out), (popen.stderr, proc.err)):
            thread = threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
            thread.start()
            proc.threads.append(thread)
        self.procs[name] = proc
        return proc

    @staticmethod
    def _pump(stream: object, sink: list[tuple[float, str]]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            sink.append((time.monotonic(), line.rstrip("\n")))

    def start_node(self, name: str, i: int, job: str | None = None,
                   min_nodes: int = 4) -> Process:
        """`ringtrain node` with no address: job, key, id, and a training that outlasts us."""
        return self.start(name, i, [
            sys.executable, "-m", "ringtrain", "-v", "node", "--job", job or self.job,
            "--node-id", name, "--key-file", str(self.key_file), "--min-nodes", str(min_nodes),
            "--epochs", "100000", "--checkpoint-dir", str(self.tmp / f"checkpoints-{name}")])

    def lines(self, name: str, since: float = 0.0) -> list[str]:
        return [line for t, line in self.procs[name].out if t >= since]

    def wait_for(self, name: str, pattern: re.Pattern[str], since: float = 0.0,
                 timeout: float = HANG_S, count: int = 1) -> list[re.Match[str]]:
        """The first ``count`` stdout lines of ``name`` matching, arrived after ``since``."""
        proc = self.procs[name]
        deadline = time.monotonic() + timeout
        while True:
            found = [m for line in self.lines(name, since) if (m := pattern.search(line))]
            if len(found) >= count:
                return found[:count]
            if proc.popen.poll() is not None:
                time.sleep(0.2)  # let the pump drain
                found = [m for line in self.lines(name, since) if (m := pattern.search(line))]
                if len(found) >= count:
                    return found[:count]
                raise AssertionError(f"{name} exited {proc.popen.returncode} before printing "
                                     f"{count} line(s) like {pattern.pattern!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}: no {count} line(s) like {pattern.pattern!r} "
                                     f"within {timeout:.0f} s")
            time.sleep(0.05)

    def rings(self, name: str) -> list[Ring]:
        return [Ring(m[1], int(m[2]), int(m[3]), tuple(m[4].split(", ")))
                for line in self.lines(name) if (m := RING_RE.search(line))]

    def stop(self, names: list[str], grace: float = 10.0) -> None:
        """SIGTERM (a graceful leave), then a second SIGTERM (stop at once), then SIGKILL."""
        procs = [self.procs[n] for n in names if self.procs[n].popen.poll() is None]
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            alive = [p for p in procs if p.popen.poll() is None]
            if not alive:
                break
            for proc in alive:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.send_signal(sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and any(p.popen.poll() is None for p in alive):
                time.sleep(0.05)
        for proc in procs:
            if proc.popen.stdin is not None and not proc.popen.stdin.closed:
                proc.popen.stdin.close()
            for thread in proc.threads:
                thread.join(2)

    def dump(self) -> None:
        for proc in self.procs.values():
            print(f"--- {proc.name} in {self.lan.namespace(proc.namespace)} "
                  f"({self.lan.address(proc.namespace)}), exit {proc.popen.poll()}")
            for label, lines in (("stdout", proc.out), ("stderr", proc.err)):
                print(f"{label}:")
                for t, line in lines:
                    print(f"  {t - self.t0:7.2f} {line}")

    @contextlib.contextmanager
    def explained(self) -> Iterator[None]:
        """On failure, print every process's output before the assertion."""
        try:
            yield
        except BaseException:
            self.dump()
            raise


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """n0..n3 and other0 started at once, with no addresses; torn down whatever happens."""
    lan = EmulatedLan(7)
    try:
        made = Cluster(lan, tmp_path_factory.mktemp("ring"))
        for i in (0, 1):
            lan.add_dummy_interface(i, DOCKER_LIKE)
        made.t0 = time.monotonic()
        for i in FIRST:
            made.start_node(f"n{i}", i)
        made.start_node("other0", OTHER, job=made.job + "-other", min_nodes=2)
        yield made
        made.stop(list(made.procs))
    finally:
        lan.close()


def first_ring(cluster: Cluster) -> list[Ring]:
    for i in FIRST:
        cluster.wait_for(f"n{i}", RING_RE)
    return [cluster.rings(f"n{i}")[0] for i in FIRST]


def test_four_nodes_with_no_addresses_form_one_ring(cluster: Cluster) -> None:
    with cluster.explained():
        rings = first_ring(cluster)
        assert [r.node for r in rings] == ["n0", "n1", "n2", "n3"]
        assert {(r.size, r.generation, r.members) for r in rings} == \
            {(4, rings[0].generation, ("n0", "n1", "n2", "n3"))}, rings
        for i in FIRST:  # and it trains: every node reports epochs of a ring of 4
            epoch = cluster.wait_for(f"n{i}", EPOCH_RE)[0]
            assert epoch[2] == "4", epoch.string


def test_hosts_with_a_second_useless_interface_are_in_the_ring(cluster: Cluster) -> None:
    """n0 and n1 both advertise 172.17.0.1 too (dialling it reaches oneself); the ring still
    formed with them, so their peers kept the addresses that answered the handshake."""
    with cluster.explained():
        rings = first_ring(cluster)
        assert all({"n0", "n1"} <= set(r.members) for r in rings), rings
        for i in (0, 1):
            shown = cluster.lan.run(i, ["ip", "-4", "-o", "addr"]).stdout
            assert "172.17.0.1/16" in shown and cluster.lan.address(i) in shown, shown


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig missing: install Debian dnsutils")
def test_a_stock_mdns_client_sees_a_running_node(cluster: Cluster) -> None:
    """dig, from another namespace, asks n2 directly (unicast to port 5353)."""
    with cluster.explained():
        generation = first_ring(cluster)[0].generation
        address = cluster.lan.address(2)
        instance = f"{cluster.job}-n2._ringtrain._tcp.local"

        def dig(name: str, kind: str, short: bool = True) -> str:
            done = cluster.lan.run(OBSERVER, ["dig", "-p", "5353", f"@{address}", name, kind,
                                              "+time=2", "+tries=3", *(["+short"] * short)],
                                   timeout=20)
            assert done.returncode == 0, done.stdout + done.stderr
            return done.stdout

        ptr = dig("_ringtrain._tcp.local", "PTR", short=False)
        assert f"{instance}." in ptr, ptr
        srv = dig(instance, "SRV").split()
        assert srv[2:] == [str(PORT), f"{cluster.job}-n2.local."], srv
        txt = dig(instance, "TXT")
        for entry in (f"job={cluster.job}", "id=n2", "proto=1", f"gen={generation}",
                      "state=training"):
            assert f'"{entry}"' in txt, txt
        assert dig(f"{cluster.job}-n2.local", "A").split() == [address]


def test_peers_lists_the_running_nodes(cluster: Cluster) -> None:
    with cluster.explained():
        generation = first_ring(cluster)[0].generation
        done = cluster.lan.run(OBSERVER, [
            sys.executable, "-m", "ringtrain", "peers", "--interface",
            cluster.lan.address(OBSERVER), "--job", cluster.job, "--wait", "2"], timeout=20)
        assert done.returncode == 0, done.stdout + done.stderr
        print(done.stdout)
        rows = {}
        for line in done.stdout.splitlines()[1:]:
            job, node, rest = line.split(None, 2)
            address, gen, state, key = re.fullmatch(r"(.*?)\s+(\d+)\s+(\S+)\s+(\S+)",
                                                    rest).groups()
            rows[node] = (job, address, int(gen), state)
        assert sorted(rows) == ["n0", "n1", "n2", "n3"], done.stdout  # not other0
        for i in FIRST:
            job, address, gen, state = rows[f"n{i}"]
            assert (job, gen, state) == (cluster.job, generation, "training"), rows
            assert f"{cluster.lan.address(i)}:{PORT}" in address.split(", "), rows
        assert "172.17.0.1:7077" in rows["n0"][1], rows  # both addresses are advertised


def test_spoofed_adverts_do_not_break_the_ring(cluster: Cluster) -> None:
    """Forged adverts of our job with the real key fingerprint: one claims member n1's id at
    an address nobody holds, one claims the future joiner n4's id at a port that accepts
    TCP and never speaks. The ring keeps training as it was (the joiner test then shows the
    forged n4 does not stop the real one)."""
    with cluster.explained():
        rings = first_ring(cluster)
        lan = cluster.lan
        nobody = str(lan.network.network_address + 250)
        spoofer = cluster.start("spoofer", OBSERVER, [
            sys.executable, str(SPOOF_SCRIPT), "--interface", lan.address(OBSERVER),
            "--job", cluster.job, "--key-file", str(cluster.key_file),
            "--advert", f"n1={nobody}:{PORT}",
            "--advert", f"n4={lan.address(OBSERVER)}:{PORT}", "--silent-port", str(PORT)],
            stdin=True)
        announced = json.loads(cluster.wait_for("spoofer", re.compile(r"^\{.*\}$"))[0][0])
        assert len(announced["names"]) == 2, announced
        since = time.monotonic()
        # The forgery is on the wire: a browser in another namespace sees the forged n4.
        done = lan.run(OTHER, [sys.executable, "-m", "ringtrain", "peers", "--job",
                               cluster.job, "--wait", "2"], timeout=20)
        assert re.search(rf"^{cluster.job}\s+n4\s+{re.escape(lan.address(OBSERVER))}:{PORT}",
                         done.stdout, re.M), done.stdout
        # Meanwhile, and for a few epochs more, the ring goes on unchanged.
        for i in FIRST:
            epochs = cluster.wait_for(f"n{i}", EPOCH_RE, since=since, count=3)
            assert {m[2] for m in epochs} == {"4"}, [m.string for m in epochs]
            assert cluster.rings(f"n{i}") == [rings[i]]
            warnings = [line for t, line in cluster.procs[f"n{i}"].err if t >= since]
            assert not [w for w in warnings if "suspect" in w or "failed" in w], warnings
        assert spoofer.popen.poll() is None


def test_a_node_started_later_is_admitted_and_another_job_never(cluster: Cluster) -> None:
    with cluster.explained():
        rings = first_ring(cluster)
        generation = rings[0].generation
        time.sleep(max(0.0, cluster.t0 + JOIN_DELAY_S - time.monotonic()))
        started = time.monotonic()
        cluster.start_node("n4", JOINER)
        joined = cluster.wait_for("n4", RING_RE)[0]
        everyone = ("n0", "n1", "n2", "n3", "n4")
        assert (int(joined[2]), tuple(joined[4].split(", "))) == (5, everyone), joined.string
        new_generation = int(joined[3])
        assert new_generation > generation
        # The others carried on into the ring of 5: their epochs now say /5, and at some
        # epoch all five print the same loss, test loss and test accuracy (computed from each
        # node's own copy of the model).
        by_epoch: dict[str, dict[str, str]] = {}
        deadline = time.monotonic() + HANG_S
        while True:
            for i in range(5):
                for line in cluster.lines(f"n{i}", started):
                    if (m := EPOCH_RE.search(line)) and m[2] == "5":
                        by_epoch.setdefault(m[3], {})[f"n{i}"] = m[4]
            common = [e for e, seen in by_epoch.items() if len(seen) == 5]
            if len(common) >= 2:
                break
            assert time.monotonic() < deadline, f"no two epochs printed by all five: {by_epoch}"
            time.sleep(0.1)
        for epoch in common:
            assert len(set(by_epoch[epoch].values())) == 1, (epoch, by_epoch[epoch])
        # The other job's node was never admitted: still waiting, in no member list.
        other = cluster.procs["other0"]
        assert other.popen.poll() is None and not cluster.rings("other0")
        assert any("looking for" in line for line in cluster.lines("other0"))
        for i in range(5):
            assert all("other0" not in r.members for r in cluster.rings(f"n{i}"))

        # Everyone leaves at once (SIGTERM). Members that stop at the same generation and
        # step hold the same model, hash for hash; the first four re-formed at least once.
        cluster.stop([f"n{i}" for i in range(5)])
        finals = {}
        for i in range(5):
            found = [m for line in cluster.lines(f"n{i}") if (m := FINAL_RE.search(line))]
            if found:
                finals[f"n{i}"] = found[-1]
        print("final lines:\n  " + "\n  ".join(m.string for m in finals.values()))
        # Whoever leaves first, the rest either leave after the same step or re-form and
        # leave together after the next one, so some group of two or more shares a step.
        hashes: dict[tuple[str, str], dict[str, str]] = {}
        for name, m in finals.items():
            hashes.setdefault((m[4], m[5]), {})[name] = m[6]
            assert cluster.procs[name].popen.returncode == 130, name  # it left the ring
            if name != "n4":
                assert int(m[7]) >= 1, m.string
        assert all(len(set(h.values())) == 1 for h in hashes.values()), hashes
        assert max(map(len, hashes.values()), default=0) >= 2, hashes
        assert cluster.procs["other0"].popen.poll() is None
