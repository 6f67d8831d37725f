"""Every node listens with its own device key, over real sockets on 127.0.0.1: a dialler
reaches only the device it meant to reach, even where another holder of the job key listens.

Nodes run in threads of this process, so the test reads their logs and state.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

from ringtrain.comm.curve import new_curve_keypair
from ringtrain.comm.door import ask_once
from ringtrain.comm.identity import device_fingerprint, ephemeral_device
from ringtrain.comm.security import JobKey
from ringtrain.comm.transport import Transport
from ringtrain.comm.wire import Header, MessageKind, job_id
from ringtrain.config import Settings
from ringtrain.errors import SecurityError
from ringtrain.node.node import Node
from ringtrain.testing import free_ports

SETTINGS = Settings(heartbeat_timeout=15.0, progress_timeout=30.0, form_timeout=10.0)


def test_a_link_to_one_device_never_reaches_another_that_holds_the_job_key(caplog):
    """A dials device B's key at an address where C listens (C holds the job key and even
    introduced A at its door): the handshake fails, C receives nothing, and C says why."""
    caplog.set_level(logging.WARNING, logger="ringtrain")
    key = JobKey.generate()
    a, b, c = (Transport(name, "127.0.0.1:0", Settings(), key,
                         ephemeral_device(new_curve_keypair).key) for name in "abc")
    try:
        reply = ask_once(c.endpoint, key, a.public_key, 5.0)  # introduces A to C
        assert reply.key == c.public_key.decode()
        a.connect("b", c.endpoint, server_key=b.public_key.decode())
        header = Header(kind=MessageKind.HELLO, job=job_id("j"), generation=0, sequence=0)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            a.try_send("b", [header.pack(), b"{}"])
            assert not (c.wait(0.05)[0] and c.receive()), "C received a message meant for B"
        # the same link to C's own key gets through at once
        a.connect("c", c.endpoint, server_key=c.public_key.decode())
        deadline = time.monotonic() + 5.0
        while not (c.wait(0.05)[0] and c.receive()):
            a.try_send("c", [header.pack(), b"{}"])
            assert time.monotonic() < deadline, "the link to C's own key never connected"
    finally:
        for transport in (a, b, c):
            transport.close(linger=0)
    assert any("127.0.0.1 fails the key handshake: it dials this address expecting another "
               "device key" in r.getMessage() for r in caplog.records)


def test_a_pinned_peer_where_another_device_listens_is_refused_naming_both(caplog):
    """``--peer FINGERPRINT@IP:PORT``: the door there answers as another device of the job,
    so the node never dials it, and gives up naming the address and both fingerprints."""
    caplog.set_level(logging.WARNING, logger="ringtrain")
    key = JobKey.generate()
    port, mine = free_ports(2)
    other = Node([], listen=f"127.0.0.1:{port}", job="pins", node_id="other", key=key,
                 world_size=1, settings=SETTINGS, device=ephemeral_device(new_curve_keypair))
    wanted = device_fingerprint(new_curve_keypair()[0])  # a device that is not there
    found = other._device.fingerprint
    try:
        started = time.monotonic()
        with pytest.raises(SecurityError) as error:
            Node([f"{wanted}@127.0.0.1:{port}"], listen=f"127.0.0.1:{mine}", job="pins",
                 node_id="pinner", key=key, world_size=2, settings=SETTINGS,
                 device=ephemeral_device(new_curve_keypair))
        took = time.monotonic() - started
        assert not other._engine.membership.protocol.peers  # never even said HELLO to it
    finally:
        other.close()
    text = str(error.value)
    print(f"\nrefused after {took:.1f} s: {text}")
    assert f"127.0.0.1:{port}" in text and wanted in text and found in text
    assert took < 8.0


def test_an_unpinned_peer_and_a_pinned_one_both_form_a_ring():
    """``--peer IP:PORT`` (first contact through the door) and ``--peer FP@IP:PORT`` with
    the right fingerprint (in capitals, as a user may type it) each lead to one node; the
    two newcomers find each other through its WELCOME (pinned peer lists): a ring of three
    forms and all-reduces."""
    key = JobKey.generate()
    ports = free_ports(3)
    devices = [ephemeral_device(new_curve_keypair) for _ in ports]
    first = f"127.0.0.1:{ports[0]}"
    peers = [[], [first], [f"{devices[0].fingerprint.upper()}@{first}"]]
    nodes: dict[int, Node] = {}
    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            nodes[i] = Node(peers[i], listen=f"127.0.0.1:{ports[i]}", job="pins",
                            node_id=f"n{i}", key=key, world_size=3, settings=SETTINGS,
                            device=devices[i])
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert not errors, errors
        results: dict[int, list[float]] = {}
        workers = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, nodes[i].all_reduce(np.ones(2), timeout=30).tolist())) for i in range(3)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(40)
        assert results == {i: [3.0, 3.0] for i in range(3)}
    finally:
        for node in nodes.values():
            node.close()
