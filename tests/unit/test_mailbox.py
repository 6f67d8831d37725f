"""The mailbox's sorting path: whatever frames arrive, sorting never raises, only validated
messages get through, offenders are evicted, and the log holds a line or two per offender.

The transports here listen on inproc endpoints: real sockets, no network; messages are handed
to the sorting path directly.
"""

from __future__ import annotations

import logging

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringtrain.comm.mailbox import (
    MAX_ABORTS,
    MAX_OFFENCES,
    MAX_TRACKED,
    STASH_MESSAGE_BYTES,
    Mailbox,
)
from ringtrain.comm.security import JobKey
from ringtrain.comm.transport import Incoming, Transport
from ringtrain.comm.wire import (
    HEADER_SIZE,
    MAX_PAYLOAD_FRAMES,
    Header,
    MessageKind,
    check_frames,
    encode_control,
    job_id,
)
from ringtrain.config import Settings
from ringtrain.errors import ProtocolError

JOB = job_id("job")
MEMBER_KEY = "m" * 40


@pytest.fixture(scope="module", params=["insecure", "keyed"])
def transport(request):
    key = JobKey.generate() if request.param == "keyed" else None
    t = Transport("node-00", f"inproc://mailbox-test-{request.param}",
                  Settings(segment_bytes=4096), key)
    yield t
    t.close(linger=0)


def _mailbox(transport: Transport) -> Mailbox:
    transport.admitted.clear()
    transport.admitted["node-01"] = MEMBER_KEY
    return Mailbox(transport, JOB, max_stash_bytes=1 << 16)


def _incoming(frames: list[bytes], origin: str = "node-01", user: str = MEMBER_KEY,
              tag: str | None = None, on_link: bool = False) -> Incoming:
    return Incoming(origin, [zmq.Frame(f) for f in frames], on_link=on_link,
                    peer_address="127.0.0.1", user=user, tag=user if tag is None else tag)


def _valid(kind: MessageKind, nbytes: int = 16) -> list[bytes]:
    if kind is MessageKind.DATA:
        return [Header(kind=kind, job=JOB, generation=1, sequence=2, dtype=2,
                       nbytes=nbytes).pack(), b"\0" * nbytes]
    payload = encode_control({"id": "node-01"})
    return [Header(kind=kind, job=JOB, generation=1, sequence=0,
                   nbytes=len(payload)).pack(), payload]


def _mutated(draw_frames: list[bytes], position: int, byte: int) -> list[bytes]:
    if not draw_frames or not draw_frames[0]:
        return draw_frames
    header = bytearray(draw_frames[0])
    header[position % len(header)] = byte
    return [bytes(header), *draw_frames[1:]]


frames_strategy = st.one_of(
    st.lists(st.binary(max_size=200), max_size=4),
    st.builds(lambda k, n: _valid(k, n), st.sampled_from(list(MessageKind)),
              st.sampled_from([0, 4, 8, 16, 4096, 4100])),
    st.builds(_mutated, st.builds(_valid, st.sampled_from(list(MessageKind))),
              st.integers(0, HEADER_SIZE - 1), st.integers(0, 255)),
    st.builds(lambda f, extra: f + extra, st.builds(_valid, st.sampled_from(list(MessageKind))),
              st.lists(st.binary(max_size=64), min_size=1, max_size=2)),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=frames_strategy, origin=st.sampled_from(["node-01", "node-02", "", "\ufffd" * 3]),
       user=st.sampled_from([MEMBER_KEY, "x" * 40, ""]),
       tag=st.sampled_from([None, "", "y" * 40]), on_link=st.booleans())
def test_sorting_never_raises_and_passes_only_validated_messages(transport, frames, origin,
                                                                 user, tag, on_link):
    mailbox = _mailbox(transport)
    mailbox._sort(_incoming(frames, origin, user, tag, on_link))
    delivered = list(mailbox.control) + list(mailbox.aborts.values()) + [
        m for queue in mailbox._data.values() for m in queue]
    assert len(delivered) + sum(mailbox.dropped.values()) == 1
    for message in delivered:
        check_frames(message.header, message.frames)  # raises if it was not validated
        assert message.header.job == JOB
        if transport.key is not None and not on_link:
            assert tag is None or tag == user  # the routing id names the proven key
            assert message.header.kind is MessageKind.HELLO or (
                origin == "node-01" and user == MEMBER_KEY)


def test_an_offender_is_evicted_after_repeated_garbage_and_logged_twice(transport, caplog):
    caplog.set_level(logging.WARNING, logger="ringtrain")
    mailbox = _mailbox(transport)
    stranger = dict(origin="node-07", user="s" * 40)
    for _ in range(MAX_OFFENCES + 500):
        mailbox._sort(_incoming([b"not a header", b""], **stranger))
    mailbox._sort(_incoming(_valid(MessageKind.HEARTBEAT)))  # a member is unaffected
    assert mailbox.dropped["header length"] == MAX_OFFENCES
    assert mailbox.dropped["evicted"] == 500
    assert len(mailbox.control) == 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "node-07" in lines[0] and "header length" in lines[0]
    assert lines[1].startswith("evicted 'node-07'")
    if transport.key is not None:
        assert "(not an admitted member)" in lines[1]
        assert mailbox.take_offenders() == {}  # not a member: nothing to suspect


def test_a_member_that_keeps_sending_garbage_is_reported_for_suspicion(transport):
    mailbox = _mailbox(transport)
    header = Header(kind=MessageKind.HEARTBEAT, job=JOB + 1, generation=1, sequence=0,
                    nbytes=2).pack()
    for _ in range(MAX_OFFENCES):
        mailbox._sort(_incoming([header, b"{}"]))  # another job's id, from a member
    assert mailbox.dropped["job"] == MAX_OFFENCES
    offenders = mailbox.take_offenders()
    assert list(offenders) == ["node-01"] and "evicted" in offenders["node-01"]
    assert mailbox.take_offenders() == {}
    mailbox._sort(_incoming(_valid(MessageKind.HEARTBEAT)))
    assert mailbox.dropped["evicted"] == 1 and not mailbox.control


def test_refused_control_messages_count_and_log_once(transport, caplog):
    caplog.set_level(logging.WARNING, logger="ringtrain")
    mailbox = _mailbox(transport)
    for _ in range(5):
        mailbox._sort(_incoming(_valid(MessageKind.HELLO), origin="node-03", user="h" * 40))
    assert len(mailbox.control) == 5
    while mailbox.control:
        message = mailbox.control.popleft()
        mailbox.reject(message, ProtocolError("hello.proof", "a proof", "garbage", "node-03"))
    assert mailbox.dropped["hello.proof"] == 5
    assert len(caplog.records) == 1


def test_tables_keyed_by_offenders_stay_bounded(transport, caplog):
    caplog.set_level(logging.WARNING, logger="ringtrain")
    mailbox = _mailbox(transport)
    for i in range(MAX_TRACKED + 300):
        mailbox._sort(_incoming([b"x"], origin=f"o{i}", user=f"{i:040d}"))
    assert len(mailbox._logged) <= MAX_TRACKED
    assert len(mailbox.offences) <= MAX_TRACKED
    assert len(caplog.records) == MAX_TRACKED + 1  # and one line saying the rest are not


def test_forged_routing_ids_are_dropped_on_keyed_rings(transport):
    mailbox = _mailbox(transport)
    mailbox._sort(_incoming(_valid(MessageKind.HEARTBEAT), tag="n" * 40))
    mailbox._sort(_incoming(_valid(MessageKind.HELLO), tag=""))
    if transport.key is None:  # nothing is authenticated: tags mean nothing
        assert len(mailbox.control) == 2
    else:
        assert mailbox.dropped["routing id"] == 2 and not mailbox.control


def test_a_payload_in_too_many_pieces_is_dropped_as_malformed(transport):
    mailbox = _mailbox(transport)
    header = Header(kind=MessageKind.DATA, job=JOB, generation=1, sequence=2, dtype=2,
                    nbytes=4 * (MAX_PAYLOAD_FRAMES + 1))
    mailbox._sort(_incoming([header.pack(), *[b"\0" * 4] * (MAX_PAYLOAD_FRAMES + 1)]))
    assert mailbox.dropped == {"frame count": 1} and not mailbox._data
    two = Header(kind=MessageKind.DATA, job=JOB, generation=1, sequence=2, dtype=2, nbytes=8)
    mailbox._sort(_incoming([two.pack(), b"\1" * 4, b"\2" * 4]))
    assert bytes(mailbox.next_data(1, 2).payload) == b"\1" * 4 + b"\2" * 4


def test_empty_data_messages_still_count_against_the_stash(transport):
    """Zero-byte DATA from a member costs stash budget too: a flood of them is bounded."""
    mailbox = _mailbox(transport)
    for sequence in range(1000):
        frames = [Header(kind=MessageKind.DATA, job=JOB, generation=1, sequence=sequence,
                         dtype=2, nbytes=0).pack(), b""]
        mailbox._sort(_incoming(frames))
    kept = sum(len(q) for q in mailbox._data.values())
    assert kept == (1 << 16) // STASH_MESSAGE_BYTES
    assert mailbox.dropped["stash"] == 1000 - kept


def test_aborts_a_member_sends_are_bounded_and_stale_ones_dropped(transport):
    mailbox = _mailbox(transport)
    payload = encode_control({"kind": "failure", "message": "x", "node": "node-01", "peer": ""})
    for sequence in range(3 * MAX_ABORTS):
        header = Header(kind=MessageKind.ABORT, job=JOB, generation=5, sequence=sequence,
                        nbytes=len(payload)).pack()
        mailbox._sort(_incoming([header, payload]))
    assert len(mailbox.aborts) == MAX_ABORTS
    assert max(mailbox.aborts) == (5, 3 * MAX_ABORTS - 1)  # the newest are kept
    mailbox.retire(6, -1)
    header = Header(kind=MessageKind.ABORT, job=JOB, generation=5, sequence=10 ** 6,
                    nbytes=len(payload)).pack()
    mailbox._sort(_incoming([header, payload]))
    assert (5, 10 ** 6) not in mailbox.aborts and mailbox.dropped["stale"] >= 1
