"""A peer that hangs up while we have not read what it sent never aborts our process.

libzmq 4.3.5 aborts (``Assertion failed: !_io_error``, stream_engine_base.cpp:310) when a ZMTP
heartbeat timer fires on a connection whose receive queue was full when its peer hung up; it
took down three nodes of the elastic suite at once when a woken, fenced-off process was killed.
Our sockets never run ZMTP heartbeats (see ``ringtrain.comm.transport``); this sends more than
the receive queue holds to a socket made by ``bounded_socket``, hangs up, and checks that the
process holding that socket is still alive seconds later (eight of the old 0.25 s pings).
"""

from __future__ import annotations

import multiprocessing
import time

import pytest
import zmq

from ringtrain.comm.transport import bounded_socket
from ringtrain.config import Settings
from ringtrain.testing import free_ports

UNREAD_S = 2.0
BURST = 5_000  # messages: far more than the receive high-water mark of a bounded socket


def _hold_without_reading(kind: int, endpoint: str, ready, done) -> None:
    """The process under test: one bounded socket that reads nothing for ``UNREAD_S``."""
    context = zmq.Context()
    sock = bounded_socket(context, kind, Settings())
    if kind == zmq.DEALER:
        sock.setsockopt(zmq.ROUTING_ID, b"held")
        sock.connect(endpoint)
        sock.send(b"here")
    else:
        sock.bind(endpoint)
    ready.send("ready")
    time.sleep(UNREAD_S)
    done.send(sock.poll(0) != 0)  # the queue it never read is still there to read
    sock.close(linger=0)
    context.term()


def _flood_and_hang_up(kind: int, endpoint: str) -> None:
    """The peer: fills the held socket's queue, then closes at once."""
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER if kind == zmq.DEALER else zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, BURST)
    try:
        if kind == zmq.DEALER:
            sock.bind(endpoint)
            assert sock.poll(10_000), "the held socket never dialled in"
            route, _ = sock.recv_multipart()
            frames = [route, b"x" * 1000]
        else:
            sock.connect(endpoint)
            frames = [b"x" * 1000]
        for _ in range(BURST):
            try:
                sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                break
        time.sleep(0.5)  # let the queue fill on the other side
    finally:
        sock.close(linger=0)
        context.term()


@pytest.mark.parametrize("kind", [zmq.DEALER, zmq.ROUTER], ids=["link", "listener"])
def test_a_peer_hanging_up_on_a_full_queue_never_aborts_the_process(kind):
    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    ctx = multiprocessing.get_context("spawn")
    ready_rx, ready_tx = ctx.Pipe(duplex=False)
    done_rx, done_tx = ctx.Pipe(duplex=False)
    held = ctx.Process(target=_hold_without_reading, args=(kind, endpoint, ready_tx, done_tx))
    held.start()
    try:
        assert ready_rx.poll(10), "the held socket never came up"
        _flood_and_hang_up(kind, endpoint)
        held.join(UNREAD_S + 20)
        assert held.exitcode == 0, f"the process holding the socket died: exit {held.exitcode}"
        assert done_rx.poll(0) and done_rx.recv(), "nothing was queued: the test showed nothing"
    finally:
        if held.is_alive():
            held.kill()
