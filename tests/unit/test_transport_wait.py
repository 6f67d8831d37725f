"""Transport.wait and look: wakes are never lost, data-only waits ignore the links, and
receive reads what the last poll found. Real sockets on loopback."""

from __future__ import annotations

import socket
import time

import pytest

from ringtrain.comm.transport import Transport
from ringtrain.config import Settings

DEADLINE_S = 5.0


@pytest.fixture
def pair():
    a = Transport("node-a", "127.0.0.1:0", Settings(segment_bytes=4096), None)
    b = Transport("node-b", "127.0.0.1:0", Settings(segment_bytes=4096), None)
    yield a, b
    a.close(linger=0)
    b.close(linger=0)


def _receive_within(transport: Transport, links: bool = True):
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if transport.wait(0.05, links=links)[0]:
            incoming = transport.receive()
            if incoming is not None:
                return incoming
    raise AssertionError("nothing arrived")


def test_a_wake_survives_a_look_and_ends_the_next_wait(pair):
    a, _ = pair
    a.wake()
    assert a.look() is False  # a wake is no traffic, and a look leaves it pending
    # waited or not is all a wait shows here: a lost wake would sit out the full 30 s, so
    # the bound tells the two apart with room for any load (not a speed claim)
    started = time.monotonic()
    assert a.wait(30.0) == (False, False)
    assert time.monotonic() - started < 15.0  # the pending wake ended the wait
    started = time.monotonic()
    a.wait(0.2)  # the wake was used up: this one waits its time out (never returns early)
    assert time.monotonic() - started >= 0.15


def test_data_only_waits_leave_link_traffic_to_the_next_look(pair):
    a, b = pair
    a.connect("node-b", b.endpoint)
    deadline = time.monotonic() + DEADLINE_S
    while not a.try_send("node-b", [b"hello"]):  # nothing queues before the link connects
        assert time.monotonic() < deadline
        time.sleep(0.01)
    incoming = _receive_within(b)
    assert (incoming.origin, [bytes(f.buffer) for f in incoming.frames][0]) == ("node-a",
                                                                                b"hello")
    assert b.reply("node-a", [b"welcome"])  # comes back on a's outgoing link
    time.sleep(0.2)
    assert a.wait(0.1, links=False) == (False, False)
    assert a.receive() is None  # a data-only wait never reads the links
    deadline = time.monotonic() + DEADLINE_S
    while not a.look():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    incoming = a.receive()
    assert incoming is not None and incoming.on_link and incoming.origin == "node-b"
    assert a.receive() is None


def test_watched_descriptors_show_in_ready_fds(pair):
    a, _ = pair
    left, right = socket.socketpair()
    try:
        a.watch(right.fileno())
        for links in (True, False):
            left.send(b"x")
            assert a.wait(1.0, links=links)[0]
            assert a.ready_fds == {right.fileno()}
            right.recv(16)
            assert a.wait(0.01, links=links) == (False, False)
            assert a.ready_fds == set()
    finally:
        left.close()
        right.close()
