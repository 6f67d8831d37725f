"""Who may join, over real sockets on 127.0.0.1: a wrong job key is named within seconds on
both sides; device identity, revocation and a key holder claiming another device's id.

Nodes run in threads of this process (each with its own sockets and engine thread), so the
test can read every node's log and state.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ringtrain.comm.curve import new_curve_keypair
from ringtrain.comm.identity import derived_node_id, ephemeral_device, open_device
from ringtrain.comm.security import JobKey, write_key_file
from ringtrain.config import Settings
from ringtrain.errors import MembershipError, PeerFailedError, SecurityError
from ringtrain.node.node import Node
from ringtrain.testing import free_ports

# identity, not liveness, is tested here: on 2 shared cores a thread can be starved for
# seconds, so members are slow to suspect each other; nodes that must not get in give up soon
PATIENT = Settings(heartbeat_timeout=15.0, progress_timeout=30.0)
FAST = Settings(heartbeat_timeout=15.0, progress_timeout=30.0, form_timeout=10.0)
# a claim of a bound id, or a new key in a closed job, is refused at the first HELLO: the
# claimant's formation need not wait long
CLAIM = Settings(heartbeat_timeout=15.0, progress_timeout=30.0, form_timeout=4.0)

NAMED_WITHIN_S = 10.0


def _ring(key: JobKey, endpoints: list[str], indexes, devices: Path | None = None,
          **options) -> list[Node]:
    """Nodes for ``indexes`` of ``endpoints``, started at once (their constructors wait for
    the ring); with ``devices``, node i keeps its device key in ``devices/i``."""
    nodes: dict[int, Node] = {}
    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            device = None if devices is None else \
                open_device(f"node-{i:02d}", new_curve_keypair, devices / str(i))
            nodes[i] = Node(endpoints, listen=endpoints[i], node_id=f"node-{i:02d}", key=key,
                            job="identity", device=device, **options)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in indexes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    if errors:
        for node in nodes.values():
            node.close()
        raise errors[0]
    return [nodes[i] for i in indexes]


def _all_reduce(nodes: list[Node]) -> list[float]:
    """One all-reduce of ones on every node at once; the sum, checked equal on all."""
    results: dict[int, list[float] | BaseException] = {}
    threads = [threading.Thread(target=lambda i=i, n=n: results.__setitem__(
        i, _try(lambda: n.all_reduce(np.ones(2), timeout=30).tolist())))
        for i, n in enumerate(nodes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(40)
    failed = [r for r in results.values() if isinstance(r, BaseException)]
    if failed:
        raise failed[0]  # e.g. PeerFailedError: the caller may re-form and try again
    assert len(results) == len(nodes) and all(r == results[0] for r in results.values())
    return results[0]


def test_a_wrong_key_is_named_within_seconds_on_both_sides(caplog):
    caplog.set_level(logging.WARNING, logger="ringtrain")
    key, wrong = JobKey.generate(), JobKey.generate()
    endpoints = [f"127.0.0.1:{port}" for port in free_ports(3)]
    ring = _ring(key, endpoints, range(2), world_size=2)
    try:
        started = time.monotonic()
        with pytest.raises(SecurityError) as error:
            Node(endpoints, listen=endpoints[2], node_id="node-02", key=wrong, job="identity",
                 world_size=3)
        took = time.monotonic() - started
        assert _all_reduce(ring) == [2.0, 2.0]  # the ring goes on
    finally:
        for node in ring:
            node.close()
    text = str(error.value)
    print(f"\nthe node with the wrong key gave up after {took:.1f} s: {text}")
    assert took < NAMED_WITHIN_S
    # the door named the ring's job key too: both fingerprints
    assert "refused our key" in text and wrong.fingerprint[:8] in text \
        and key.fingerprint[:8] in text
    assert any(endpoint in text for endpoint in endpoints[:2])
    ring_side = [r.getMessage() for r in caplog.records if r.threadName == "ringtrain-zap"]
    assert any("127.0.0.1 asks for this node's key under another job key" in line
               for line in ring_side), ring_side


def _refused(nodes: list[Node]) -> dict[str, int]:
    total: dict[str, int] = {}
    for node in nodes:
        for kind, count in node._gate.refused.items():
            total[kind] = total.get(kind, 0) + count
    return total


def test_a_key_holder_cannot_take_over_a_devices_id(tmp_path):
    """Holding the job key lets a device join as itself, never as another: a chosen id is
    bound to its first device, a derived one to its key. Refused and counted; the ring goes
    on."""
    key = JobKey.generate()
    endpoints = [f"127.0.0.1:{port}" for port in free_ports(4)]
    ring = _ring(key, endpoints[:3], range(3), devices=tmp_path, settings=PATIENT)
    try:
        victim = ring[1]
        derived = derived_node_id("victim", victim._device.key.public)
        for claimed in ("node-01", derived):
            with pytest.raises(MembershipError):  # never admitted: the ring is not joined
                Node(endpoints[:3], listen=endpoints[3], node_id=claimed, key=key,
                     job="identity", world_size=4, settings=CLAIM,
                     device=ephemeral_device(new_curve_keypair))
        refused = _refused([ring[0], ring[2]])
        assert refused.get("id claimed", 0) >= 2, refused
        assert _all_reduce(ring) == [3.0, 3.0]
        assert all(n.members == ("node-00", "node-01", "node-02") for n in ring)
    finally:
        for node in ring:
            node.close()
    print(f"\nrefused HELLOs claiming another device's id: {refused}")


def _revoke(tmp_path: Path, key_file: Path, device_home: Path, target: str,
            *extra: str) -> str:
    done = subprocess.run([sys.executable, "-m", "ringtrain", "revoke", target, "--key-file",
                           str(key_file), *extra], capture_output=True, text=True, timeout=60,
                          env={**__import__("os").environ,
                               "RINGTRAIN_DEVICE_DIR": str(device_home)}, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _reform_and_reduce(nodes: list[Node], deadline: float) -> list[float]:
    """Re-form (whoever failed a collective) and all-reduce until it works."""
    while True:
        try:
            return _all_reduce(nodes)
        except (AssertionError, PeerFailedError):
            if time.monotonic() > deadline:
                raise
            threads = [threading.Thread(target=lambda n=n: _try(n.reform, 10)) for n in nodes]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(15)


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - the caller looks at the outcome
        return exc


def test_a_revoked_device_is_refused_by_every_member_also_after_restarts(tmp_path, caplog):
    key = JobKey.generate()
    key_file = write_key_file(tmp_path / "job.key", key)
    endpoints = [f"127.0.0.1:{port}" for port in free_ports(3)]
    devices = tmp_path / "devices"
    ring = _ring(key, endpoints, range(3), devices=devices, settings=PATIENT)
    revoked = ring[2]._device.fingerprint
    survivors: list[Node] = []
    try:
        assert _all_reduce(ring) == [3.0, 3.0]
        # revoked on node-00's device, with the command; node-00 tells the others
        started = time.monotonic()
        assert "revoked" in _revoke(tmp_path, key_file, devices / "0", revoked)
        survivors = ring[:2]
        assert _reform_and_reduce(survivors, started + 30) == [2.0, 2.0]
        took = time.monotonic() - started
        assert all(n.members == ("node-00", "node-01") for n in survivors)
        # the revoked node learnt it: its node stopped, naming the cause
        deadline = time.monotonic() + 10
        while ring[2]._fatal is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "was revoked" in str(ring[2]._fatal)
        ring[2].close()
        # it restarts: it knows, and the others refuse it at the handshake anyway
        with pytest.raises(SecurityError, match="was revoked"):
            _ring(key, endpoints, [2], devices=devices, settings=FAST, world_size=3)
        # the others restart too (the revocation is in each one's ledger)
        for node in survivors:
            node.close()
        survivors = _ring(key, endpoints, range(2), devices=devices, world_size=2,
                          settings=PATIENT)
        # its ledger lost (a copy of the job key and device key elsewhere)
        (devices / "2" / f"{key.fingerprint}.ledger").unlink()
        # it listens (a ring of its own) and a member is told of its address: the door there
        # answers with the revoked device key, so the member never dials it; it hears nothing
        caplog.set_level(logging.WARNING, logger="ringtrain")
        poser = Node([], listen=f"127.0.0.1:{free_ports(1)[0]}", node_id="node-02", key=key,
                     job="identity", world_size=1, settings=FAST,
                     device=open_device("node-02", new_curve_keypair, devices / "2"))
        try:
            survivors[0].add_candidates([poser.endpoint])
            deadline = time.monotonic() + 10
            while not any("which is revoked: not dialling it" in r.getMessage()
                          for r in caplog.records):
                assert time.monotonic() < deadline, "the member dialled a revoked listener"
                time.sleep(0.1)
            time.sleep(1.0)
            assert not poser._engine.membership.protocol.peers
        finally:
            poser.close()
        # it dials the others: they refuse the device key at the handshake, and it is told so
        with pytest.raises(SecurityError, match="refused our device key"):
            _ring(key, endpoints, [2], devices=devices, settings=FAST, world_size=3)
        # a new device key made on the revoked device is refused too: under the old name
        # (bound to the revoked device), and under a new one (the job is closed)
        with pytest.raises(MembershipError):
            _ring(key, endpoints, [2], devices=tmp_path / "new", settings=CLAIM, world_size=3)
        with pytest.raises(MembershipError):
            Node(endpoints, listen=endpoints[2], node_id="newcomer", key=key, job="identity",
                 world_size=3, settings=CLAIM,
                 device=open_device("newcomer", new_curve_keypair, tmp_path / "new"))
        refused = _refused(survivors)
        assert refused.get("id claimed", 0) >= 1 and refused.get("closed", 0) >= 1, refused
        assert _all_reduce(survivors) == [2.0, 2.0]  # no re-keying
    finally:
        for node in [*ring, *survivors]:
            node.close()
    print(f"\ndevice {revoked} revoked; the others trained on without it after {took:.1f} s")
