"""Hostile input against a training ring, over real sockets on 127.0.0.1.

A 3-node ring all-reduces known arrays in a loop (every result checked exactly) while this
process attacks node-00's listening port: strangers without the key, an intruder that learned
the CURVE server key but not the job secret (it squats a member's routing id and forges its
messages), garbage, HTTP, a truncated ZMTP greeting, 500 idle connections, oversized frames.
The ring must keep going and stay exact, the intruder must receive nothing, node-00's memory
must stay bounded and its log must hold a line or two per offender, not one per message.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from ringtrain.comm.door import ask_once
from ringtrain.comm.security import JobKey
from ringtrain.comm.wire import (
    HEADER,
    PROTOCOL_VERSION,
    Header,
    MessageKind,
    encode_control,
    job_id,
)
from ringtrain.comm.zap import MAX_CONNECTIONS_PER_ADDRESS
from ringtrain.config import Settings
from ringtrain.errors import MembershipError, SecurityError
from ringtrain.node.node import Node
from ringtrain.testing import LocalCluster, free_ports, run_local

ELEMENTS = 1 << 17  # float64: 1 MiB per all-reduce
WORKLOAD_SETTINGS = Settings(handshake_timeout=2.0)
ZMTP_GREETING = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") \
    + b"\0" + b"\0" * 31


# the ring ----------------------------------------------------------------------------------------

def _ring_worker(node: Node, directory: str, max_seconds: float) -> dict:
    """All-reduce known arrays until some member sees the stop file (the flag travels in the
    all-reduce, so every member stops after the same round); check every result exactly."""
    folder = Path(directory)
    handler = logging.FileHandler(folder / f"{node.node_id}.log")
    handler.setLevel(logging.WARNING)
    logging.getLogger("ringtrain").addHandler(handler)
    size = node.world_size
    base = np.arange(ELEMENTS, dtype=np.float64)
    mismatches = rounds = 0
    deadline = time.monotonic() + max_seconds
    while True:
        stop = float((folder / "stop").exists() or time.monotonic() > deadline)
        reduced = node.all_reduce(np.append(base * (node.rank + 1) + rounds, stop))
        expected = base * (size * (size + 1) // 2) + size * rounds
        mismatches += int(not np.array_equal(reduced[:-1], expected))
        rounds += 1
        if rounds == 3:  # formed and warm: tell the attacker where we are
            info = {"pid": os.getpid(), "endpoint": node.endpoint,
                    "server_key": node._transport.public_key.decode()}
            (folder / f"{node.node_id}.tmp").write_text(json.dumps(info))
            os.replace(folder / f"{node.node_id}.tmp", folder / f"{node.node_id}.json")
        if rounds % 5 == 0:
            (folder / f"{node.node_id}.rounds").write_text(str(rounds))
        if reduced[-1] > 0:
            break
    handler.close()
    return {"rounds": rounds, "mismatches": mismatches, "dropped": dict(node.state()["dropped"])}


def _wait_for(predicate, what: str, timeout: float = 30.0, state=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                         + (f"; state: {state()}" if state else ""))


class Ring:
    """The running 3-node ring and what it told us."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.cluster = LocalCluster(_ring_worker, 3, args=(str(folder), 70.0), timeout=85.0,
                                    settings=WORKLOAD_SETTINGS).start()
        infos = _wait_for(lambda: self._infos(), "the ring to form", 40.0)
        self.pid = infos[0]["pid"]
        self.endpoints = [i["endpoint"] for i in infos]
        self.server_key = infos[0]["server_key"].encode()  # node-00's device key
        self.key = self.cluster.key
        host, port = self.endpoints[0].split("://")[1].rsplit(":", 1)
        self.address = (host, int(port))

    def _infos(self):
        paths = [self.folder / f"node-0{i}.json" for i in range(3)]
        if not all(p.exists() for p in paths):
            return None
        return [json.loads(p.read_text()) for p in paths]

    def rounds(self) -> int:
        """Rounds completed, by the slowest member."""
        counts = []
        for i in range(3):
            path = self.folder / f"node-0{i}.rounds"
            counts.append(int(path.read_text() or 0) if path.exists() else 0)
        return min(counts)

    def assert_progress(self, what: str, more: int = 5) -> None:
        """The ring completes ``more`` rounds (it is not stalled by what we are doing)."""
        start = self.rounds()
        _wait_for(lambda: self.rounds() >= start + more,
                  f"the ring to keep training during {what}", 20.0)

    def memory_kb(self) -> dict[str, int]:
        """Node-00's resident set now and at its peak, in KiB."""
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0])
        return fields

    def log_lines(self) -> list[str]:
        path = self.folder / "node-00.log"
        return path.read_text().splitlines() if path.exists() else []

    def stop(self) -> list[dict]:
        (self.folder / "stop").write_text("")
        return self.cluster.results()


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    running = Ring(tmp_path_factory.mktemp("ring"))
    yield running
    running.cluster.stop()


# attackers ---------------------------------------------------------------------------------------

def _raw(address, payload: bytes = b"", timeout: float = 2.0) -> socket.socket:
    sock = socket.create_connection(address, timeout=timeout)
    try:
        sock.sendall(payload)
    except OSError:
        pass  # closed on us mid-way: that is the point
    return sock


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the other side closes (or resets) the connection within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def _dealer(context: zmq.Context, endpoint: str, server_key: bytes | None,
            routing_id: bytes | None = None, tagged: str | None = None,
            introduce: JobKey | None = None) -> zmq.Socket:
    """A raw DEALER; ``tagged`` names a node id to present with this socket's own key as the
    tag, exactly as a ringtrain node would; ``introduce``: first ask the node's door with
    this job key, as a job key holder would (the key check then lets its key through)."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    public, secret = zmq.curve_keypair()
    if introduce is not None:
        assert ask_once(endpoint, introduce, public, 5.0).key == server_key.decode()
    if tagged is not None:
        routing_id = tagged.encode() + b"\0" + public
    if routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    if server_key is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = (server_key, public,
                                                                           secret)
    sock.connect(endpoint)
    return sock


def _send_all(sockets_and_claims, rounds: int) -> int:
    sent = 0
    for _ in range(rounds):
        for sock, claimed in sockets_and_claims:
            for frames in _forged_messages(claimed):
                try:
                    sock.send_multipart(frames, zmq.NOBLOCK)
                    sent += 1
                except zmq.Again:
                    pass
    return sent


def _forged_messages(claimed: str, job: str = "local") -> list[list[bytes]]:
    """What an intruder says while posing as member ``claimed``: a HELLO with a made-up proof,
    heartbeats, a proposal, data for the running collective, an abort, and garbage."""
    jid = job_id(job)

    def control(kind, body):
        payload = encode_control(body)
        return [Header(kind=kind, job=jid, generation=1, sequence=0,
                       nbytes=len(payload)).pack(), payload]

    data = np.full(1024, 1e6, dtype=np.float64).tobytes()
    return [
        control(MessageKind.HELLO, {"id": claimed, "job": job, "protocol": PROTOCOL_VERSION,
                                    "endpoint": "tcp://127.0.0.1:9", "key": "x" * 40,
                                    "proof": "00" * 32, "schema": "", "incarnation": 1,
                                    "host": ""}),
        control(MessageKind.HEARTBEAT, {"generation": 1, "sequence": 0, "members": [claimed]}),
        control(MessageKind.PROPOSE, {"generation": 99, "members": [[claimed, ""]]}),
        control(MessageKind.ABORT, {"message": "forged", "peer": claimed}),
        [Header(kind=MessageKind.DATA, job=jid, generation=1, sequence=0, sender=1, dtype=3,
                nbytes=len(data)).pack(), data],
        [b"garbage" * 11],
        [secrets.token_bytes(72), b""],
    ]


def _silent(sockets: list[zmq.Socket], seconds: float) -> int:
    """Bytes received on ``sockets`` over ``seconds`` (the intruder must get none)."""
    poller = zmq.Poller()
    for sock in sockets:
        poller.register(sock, zmq.POLLIN)
    received = 0
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        for sock, _ in poller.poll(int(remaining * 1000)):
            received += sum(len(f) for f in sock.recv_multipart())
    return received


def _stranger(endpoints: list[str], key: JobKey | None, results: dict, name: str) -> None:
    """A node of its own (own random key, or none at all) that tries to join the ring."""
    settings = Settings(form_timeout=2.5, handshake_timeout=1.0)
    try:
        with Node(endpoints, listen="127.0.0.1:0", job="local", node_id=f"stranger-{name}",
                  world_size=4, settings=settings, key=key, insecure=key is None):
            results[name] = "joined"
    except (MembershipError, SecurityError) as exc:
        # either way it is refused: no ring formed in time, or every peer's key door
        # refused its key and it gave up naming the keys
        results[name] = f"refused: {exc}"


# the test ----------------------------------------------------------------------------------------

def test_strangers_intruders_and_garbage_never_disturb_a_training_ring(ring):
    before = ring.memory_kb()
    ring.assert_progress("warm-up")
    context = zmq.Context()
    endpoint = ring.endpoints[0]
    try:
        # nodes without the job key: their own random key, or none (insecure)
        outcomes: dict[str, str] = {}
        strangers = [threading.Thread(target=_stranger, args=(ring.endpoints, key, outcomes, n))
                     for n, key in (("keyed", JobKey.generate()), ("insecure", None))]
        for thread in strangers:
            thread.start()
        ring.assert_progress("strangers dialling every member")
        for thread in strangers:
            thread.join(15)
        assert outcomes.keys() == {"keyed", "insecure"}
        assert all(o.startswith("refused") for o in outcomes.values()), outcomes

        # a client with the wrong server key, one without CURVE, and one that read the
        # node's device key (an advert carries it) but holds no job key, so was never
        # introduced at the door: handshakes fail
        outsiders = [_dealer(context, endpoint, zmq.curve_keypair()[0], b"node-01"),
                     _dealer(context, endpoint, None, b"node-01"),
                     _dealer(context, endpoint, ring.server_key, b"node-01")]
        _send_all([(sock, "node-01") for sock in outsiders], 3)

        # an intruder introduced at the door (a key holder's keys): it squats node-01's
        # routing id (bare, and tagged with a key it does not hold), poses as node-01 and
        # node-02 under its own key with made-up proofs, and keeps at it
        intruders = [_dealer(context, endpoint, ring.server_key, b"node-01", introduce=ring.key),
                     _dealer(context, endpoint, ring.server_key, b"node-01\0" + b"k" * 40,
                             introduce=ring.key),
                     _dealer(context, endpoint, ring.server_key, tagged="node-01",
                             introduce=ring.key),
                     _dealer(context, endpoint, ring.server_key, tagged="node-02",
                             introduce=ring.key)]
        claims = ("node-01", "node-01", "node-01", "node-02")
        sent = _send_all(list(zip(intruders, claims, strict=True)), 100)
        ring.assert_progress("forged messages from an intruder holding the server key")
        # an oversized frame: the connection is reset (MAXMSGSIZE), the ring goes on
        intruders[0].send_multipart([b"\0" * (8 << 20)])
        ring.assert_progress("an 8 MiB frame")
        assert _silent(outsiders + intruders, 1.0) == 0, "an intruder received bytes"

        # more CURVE connections from one address than the cap allows
        crowd = [_dealer(context, endpoint, ring.server_key, introduce=ring.key)
                 for _ in range(MAX_CONNECTIONS_PER_ADDRESS + 16)]
        ring.assert_progress(f"{len(crowd)} authenticated connections from one address")
        assert _silent(crowd, 0.5) == 0
        for sock in crowd:
            sock.close(linger=0)

        # raw TCP: garbage, HTTP, a truncated and a complete-but-wrong ZMTP greeting
        raws = [_raw(ring.address, secrets.token_bytes(65536)) for _ in range(10)]
        raws.append(_raw(ring.address, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
        raws.append(_raw(ring.address, b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"
                         + b"x" * 65536))
        truncated = _raw(ring.address, ZMTP_GREETING[:10])
        null_greeting = _raw(ring.address, ZMTP_GREETING
                             + b"\x06" + struct.pack(">Q", 1 << 40))  # NULL, then a 1 TiB frame
        ring.assert_progress("garbage, HTTP and bad greetings")
        for sock in raws:
            assert _closed_by_peer(sock, 5.0), "garbage was not answered by closing"
        # the truncated greeting is cut off by the handshake deadline
        assert _closed_by_peer(truncated, WORKLOAD_SETTINGS.handshake_timeout + 3.0)
        assert _closed_by_peer(null_greeting, WORKLOAD_SETTINGS.handshake_timeout + 3.0)

        # 500 idle connections: training goes on, and every one is closed at the deadline
        idle = [_raw(ring.address) for _ in range(500)]
        ring.assert_progress("500 idle connections")
        start = time.monotonic()
        closed = sum(_closed_by_peer(sock, max(0.1, start + WORKLOAD_SETTINGS.handshake_timeout
                                               + 3.0 - time.monotonic())) for sock in idle)
        assert closed == len(idle), f"only {closed} of 500 idle connections were closed"
        for sock in raws + idle + [truncated, null_greeting]:
            sock.close()
        ring.assert_progress("the aftermath")
        after = ring.memory_kb()
        received = _silent(outsiders + intruders, 0.3)
    finally:
        context.destroy(linger=0)
    results = ring.stop()
    lines = ring.log_lines()
    print(f"node-00 RSS {before['VmRSS']} KiB before, {after['VmRSS']} KiB after, peak "
          f"{after['VmHWM']} KiB; {sent} forged messages sent; {len(lines)} log lines; "
          f"rounds {[r['rounds'] for r in results]}; node-00 dropped {results[0]['dropped']}")
    for line in lines:
        print("  log:", line[:160])

    assert received == 0
    assert [r["mismatches"] for r in results] == [0, 0, 0]
    assert len({r["rounds"] for r in results}) == 1
    # memory: generous, but far below what 500 connections x the queue budget could hold
    assert after["VmRSS"] - before["VmRSS"] < 150_000
    assert after["VmHWM"] - before["VmHWM"] < 250_000
    # the log: a line or two per offending peer, not one per message
    dropped = results[0]["dropped"]
    assert sum(dropped.values()) >= sent // 2, dropped
    assert dropped.get("evicted", 0) > 0, dropped
    assert len(lines) <= 20, "\n".join(lines)
    # the crowd meets a budget, logged once: the cap on CURVE connections per address, or the
    # one on connections still in their handshake (which may act first)
    budgets = [sum(f"{what} new connections from 127.0.0.1" in line for line in lines)
               for what in ("refusing", "shutting")]
    assert 1 <= sum(budgets) and max(budgets) == 1, lines


# join-time refusals, spoofed candidates, NaN ------------------------------------------------

def _single_node(key: JobKey, **options) -> Node:
    return Node([], listen="127.0.0.1:0", job="local", node_id="node-00", key=key,
                world_size=1, **options)


def test_a_peer_speaking_another_protocol_is_refused_naming_both_versions(caplog):
    key = JobKey.generate()
    caplog.set_level(logging.WARNING, logger="ringtrain")
    context = zmq.Context()
    try:
        with _single_node(key) as node:
            server_key = node._transport.public_key
            dealer = _dealer(context, node.endpoint, server_key, tagged="node-09",
                             introduce=key)
            for version in (PROTOCOL_VERSION + 1,) * 30:
                values = list(HEADER.unpack(Header(kind=MessageKind.HELLO, job=job_id("local"),
                                                   generation=0, sequence=0).pack()))
                values[1] = version
                dealer.send_multipart([HEADER.pack(*values), b"{}"])
            # a HELLO with a valid header and proof, claiming another protocol in its body
            public, secret = zmq.curve_keypair()
            honest = context.socket(zmq.DEALER)
            honest.setsockopt(zmq.LINGER, 0)
            honest.setsockopt(zmq.ROUTING_ID, b"node-08\0" + public)
            honest.curve_serverkey = server_key
            honest.curve_publickey, honest.curve_secretkey = public, secret
            assert ask_once(node.endpoint, key, public, 5.0).key == server_key.decode()
            honest.connect(node.endpoint)
            proof = key.derive(f"hello:local:node-08:{public.decode()}:1").hex()
            body = encode_control({"id": "node-08", "job": "local", "protocol": 7,
                                   "endpoint": "tcp://127.0.0.1:9", "key": public.decode(),
                                   "proof": proof, "schema": "", "incarnation": 1, "host": ""})
            honest.send_multipart([Header(kind=MessageKind.HELLO, job=job_id("local"),
                                          generation=0, sequence=0, nbytes=len(body)).pack(),
                                   body])
            _wait_for(lambda: sum("hello.protocol" in r.getMessage() for r in caplog.records),
                      "the HELLO to be refused", 10.0)
            assert _silent([dealer], 0.2) == 0
    finally:
        context.destroy(linger=0)
    messages = [r.getMessage() for r in caplog.records]
    versions = [m for m in messages if "speaks ringtrain protocol" in m]
    assert len(versions) == 1, messages  # 30 messages, one line
    assert f"protocol {PROTOCOL_VERSION + 1}" in versions[0]
    assert f"this node speaks protocol {PROTOCOL_VERSION}" in versions[0]
    assert "'node-09'" in versions[0] and "127.0.0.1" in versions[0]
    refusal = next(m for m in messages if "hello.protocol" in m)
    assert f"expected {PROTOCOL_VERSION}, got 7" in refusal and "node-08" in refusal


def test_the_connection_cap_refuses_strangers_but_never_a_member(caplog):
    """Above the cap, CURVE clients from one address are refused; a client whose key is
    admitted gets through all the same."""
    key = JobKey.generate()
    caplog.set_level(logging.WARNING, logger="ringtrain")
    context = zmq.Context()
    try:
        with _single_node(key) as node:
            transport = node._transport
            server_key = transport.public_key
            crowd = [_dealer(context, node.endpoint, server_key, introduce=key)
                     for _ in range(MAX_CONNECTIONS_PER_ADDRESS + 20)]
            # 20 over the cap: they keep dialling again after each refusal (those shut while
            # 16 were in their handshake are not refusals of the cap), so 20 come in time
            _wait_for(lambda: transport._zap.refused >= 20, "20 refusals", 20.0)
            # a member reconnecting: its key was admitted, so the cap does not apply to it
            public, secret = zmq.curve_keypair()
            member = context.socket(zmq.DEALER)
            member.setsockopt(zmq.LINGER, 0)
            member.setsockopt(zmq.ROUTING_ID, b"node-05\0" + public)
            member.curve_serverkey = server_key
            member.curve_publickey, member.curve_secretkey = public, secret
            transport.admitted["node-05"] = public.decode()
            member.connect(node.endpoint)
            _wait_for(lambda: transport.reply("node-05", [b"ping"]) and member.poll(100),
                      "the admitted member to be reachable", 10.0)
            assert member.recv_multipart() == [b"ping"]
            open_now = transport.open_connections("127.0.0.1")
            for sock in crowd:
                sock.close(linger=0)
            _wait_for(lambda: transport.open_connections("127.0.0.1") <= 2,
                      "closed connections to be counted out", 10.0)
    finally:
        context.destroy(linger=0)
    # refused while more than the cap are open (the crowd arrives at once, so the count falls
    # below the cap before the refusals catch up); the member's connection is among the open
    assert 2 <= open_now <= MAX_CONNECTIONS_PER_ADDRESS + 1
    refusals = [r for r in caplog.records if "refusing new connections" in r.getMessage()]
    assert len(refusals) == 1


def test_spoofed_candidates_change_nothing():
    """What a lying mDNS advert (a wrong address, or another node's name on an address that
    is not that node) could make a node dial: a closed port, a listener that is not
    ringtrain, another job's node (its own key). The ring trains on, exactly, unchanged."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:  # answers every connection with HTTP, then closes it
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    other_key = JobKey.generate()
    try:
        with _single_node(other_key) as other_job:
            lies = [f"127.0.0.1:{free_ports(1)[0]}",
                    f"127.0.0.1:{listener.getsockname()[1]}",
                    other_job.endpoint.removeprefix("tcp://")]
            results = run_local(_spoofed_worker, 3, args=(lies,), timeout=60,
                                settings=Settings(handshake_timeout=1.0))
    finally:
        stop.set()
        thread.join(2)
        listener.close()
    assert [r["mismatches"] for r in results] == [0, 0, 0]
    assert {r["generation"] for r in results} == {1}
    assert {r["members"] for r in results} == {("node-00", "node-01", "node-02")}


def _spoofed_worker(node: Node, lies: list[str]) -> dict:
    base = np.arange(1000, dtype=np.float64)
    mismatches = 0
    for step in range(60):
        if step == 5:
            node.add_candidates(lies)  # as discovery would, for adverts of our job
        reduced = node.all_reduce(base * (node.rank + 1) + step)
        mismatches += int(not np.array_equal(reduced, base * 6 + 3 * step))
        time.sleep(0.01)
    return {"mismatches": mismatches, "generation": node.generation, "members": node.members}


def _nan_worker(node: Node, bad_step: int) -> dict:
    from ringtrain.train.datasets import load_digits
    from ringtrain.train.nn import Dense, Sequential, Tanh
    from ringtrain.train.optim import SGD
    from ringtrain.train.trainer import Trainer

    class Poisoned(Trainer):
        def compute_gradients(self, x, y):
            loss = super().compute_gradients(x, y)
            if self.node.rank == 1 and self.step_count + 1 == bad_step:
                self.model.grads[: self.model.grads.size // 2] = math.nan
            return loss

    digits = load_digits()
    model = Sequential(Dense(64, 16), Tanh(), Dense(16, 10), seed=1, dtype=np.float64)
    trainer = Poisoned(node, model, SGD(model.params, lr=0.1), digits.x[:160], digits.y[:160],
                       batch_size=8)
    finite_after_every_step = []

    def check(report) -> None:
        finite_after_every_step.append(bool(np.isfinite(trainer.model.params).all()))

    reports: list = []
    trainer.fit(1, on_step=lambda r: (check(r), reports.append(r)), max_steps=8)
    return {"finite": finite_after_every_step, "applied": [r.applied for r in reports],
            "params": trainer.model.params.copy()}


def test_nan_on_one_node_never_reaches_any_parameters():
    results = run_local(_nan_worker, 3, args=(4,), timeout=60)
    for result in results:
        assert all(result["finite"]), result["finite"]
        assert [i for i, ok in enumerate(result["applied"], 1) if not ok] == [4]
        np.testing.assert_array_equal(result["params"], results[0]["params"])


def test_bench_security_prints_both_timings_and_their_ratio(capsys):
    from ringtrain.cli import main as cli

    assert cli.main(["bench-security", "--nodes", "2", "--sizes", "4096", "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.split()[:3] == ["2", "4", "KiB"])
    clear, curve, ratio = float(row.split()[3]), float(row.split()[5]), row.split()[7]
    assert clear > 0 and curve > 0 and ratio.endswith("x")
