"""What a node says while it waits for a ring: why it waits (a full ring) and which peers it
cannot see, never itself among them."""

from __future__ import annotations

import io
import logging
import socket
import time
from collections.abc import Iterator

import pytest

from ringtrain.cli import output, watch
from ringtrain.comm.security import JobKey
from ringtrain.config import LaunchOptions
from ringtrain.observe.diagnose import check_peers
from ringtrain.observe.recorder import FlightRecorder


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed: connecting is refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_checks_skip_the_node_itself_in_the_peer_list() -> None:
    """Every node may be given the same --peer list: its own entry is not a peer it lacks."""
    own, other = _closed_port(), _closed_port()
    peers = [f"localhost:{own}", f"127.0.0.1:{other}"]
    key = JobKey.generate()
    unfiltered = check_peers("j", key, (), peers, timeout=2.0)
    assert len(unfiltered) == 2 and all(f.cause != "ok" for f in unfiltered)
    findings = check_peers("j", key, (), peers, timeout=2.0, own_port=own)
    assert [f.cause for f in findings] == ["port-closed"]
    assert str(other) in findings[0].sentence and str(own) not in findings[0].sentence


@pytest.fixture
def printed() -> Iterator[io.StringIO]:
    """The event lines ``ringtrain node`` would print, as it formats them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(output.HumanFormatter())
    events = logging.getLogger(output.EVENTS_LOGGER)
    level = events.level
    events.setLevel(logging.INFO)
    events.addHandler(handler)
    yield stream
    events.removeHandler(handler)
    events.setLevel(level)


def test_a_node_outside_a_full_ring_says_it_waits_for_a_place(monkeypatch, printed) -> None:
    """After the membership's "full" event the waiting lines name the full ring, not
    --min-nodes, and no diagnosis runs (the peers answer: the reason is known; here the one
    peer's port is closed, which a diagnosis would report)."""
    stream = printed
    monkeypatch.setattr(watch, "REPORT_EVERY", 0.05)
    options = LaunchOptions(peers=(f"127.0.0.1:{_closed_port()}",), discovery=False)
    with watch.WaitReporter(options, diagnose_after=0.0):
        FlightRecorder("n2").ring_full((), 2, ("n0", "n1"))
        deadline = time.monotonic() + 10.0
        while "waiting for a place" not in stream.getvalue():
            if time.monotonic() > deadline:
                pytest.fail(f"no waiting line in 10 s; printed:\n{stream.getvalue()}")
            time.sleep(0.02)
    lines = [line for line in stream.getvalue().splitlines() if "waiting" in line]
    assert "the ring of n0, n1 is full (2 nodes, their --max-nodes); this node joins when a " \
           "member leaves (Ctrl-C to stop)" in lines[0], lines
    assert not any("--min-nodes" in line for line in lines), lines
    assert "cannot see a peer" not in stream.getvalue(), stream.getvalue()
