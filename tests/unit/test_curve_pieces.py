"""Payloads in CURVE pieces (``transport.CURVE_PIECE_BYTES``, ``wire.split_payload``): they
arrive whole, and a tracked send is done only once libzmq took every piece. Real keyed
sockets on loopback."""

from __future__ import annotations

import time

import numpy as np

from ringtrain.comm.mailbox import Mailbox
from ringtrain.comm.security import JobKey
from ringtrain.comm.transport import CURVE_PIECE_BYTES, Transport
from ringtrain.comm.wire import FLAG_DESCRIPTOR, Header, MessageKind, job_id
from ringtrain.config import Settings

JOB = job_id("job")


def test_a_keyed_link_sends_large_payloads_in_pieces_that_arrive_whole():
    """On a keyed ring the transport cuts a payload into CURVE_PIECE_BYTES frames (libzmq
    then encrypts them one by one while the first are on the wire); the receiving mailbox
    checks the pieces against the header and stashes one joined payload. Real sockets."""
    key = JobKey.generate()
    settings_ = Settings(segment_bytes=1 << 20)
    sender = Transport("node-a", "127.0.0.1:0", settings_, key)
    receiver = Transport("node-b", "127.0.0.1:0", settings_, key)
    try:
        receiver.admitted["node-a"] = sender.public_key.decode()
        sender.connect("node-b", receiver.endpoint, server_key=receiver.public_key.decode())
        payload = np.arange(1 << 18, dtype=np.float32)  # 1 MiB
        header = Header(kind=MessageKind.DATA, job=JOB, generation=1, sequence=2, dtype=2,
                        nbytes=payload.nbytes)
        deadline = time.monotonic() + 10.0  # a hang bound, not a speed claim
        while not sender.try_send("node-b", [header.pack(), payload]):
            assert time.monotonic() < deadline, "the link never connected"
            time.sleep(0.01)
        incoming = None
        while incoming is None:
            assert time.monotonic() < deadline, "nothing arrived"
            if receiver.wait(0.05)[0]:
                incoming = receiver.receive()
        pieces = incoming.frames[1:]
        assert [len(p) for p in pieces] == [CURVE_PIECE_BYTES] * 4
        mailbox = Mailbox(receiver, JOB, max_stash_bytes=4 << 20)
        mailbox._sort(incoming)
        message = mailbox.next_data(1, 2)
        assert message is not None, dict(mailbox.dropped)
        assert np.array_equal(np.frombuffer(message.payload, dtype=np.float32), payload)
    finally:
        sender.close(linger=0)
        receiver.close(linger=0)


def test_a_tracked_send_is_done_only_once_every_frame_was_taken():
    """The caller may change a buffer once its tracker is done, so the tracker of a message
    must cover every frame: here the payload's pieces, still queued, and a small descriptor
    after them (which pyzmq copies, and whose own tracker is done at once)."""
    key = JobKey.generate()
    settings_ = Settings(segment_bytes=1 << 20)
    sender = Transport("node-a", "127.0.0.1:0", settings_, key)
    receiver = Transport("node-b", "127.0.0.1:0", settings_, key)
    try:
        receiver.introduce(sender.public_key.decode())  # as its door would
        sender.connect("node-b", receiver.endpoint, server_key=receiver.public_key.decode())
        payload = np.zeros(CURVE_PIECE_BYTES // 2, dtype=np.float32)  # 2 pieces
        header = Header(kind=MessageKind.DATA, job=JOB, generation=1, sequence=2, dtype=2,
                        flags=FLAG_DESCRIPTOR, nbytes=payload.nbytes).pack()
        deadline = time.monotonic() + 30.0  # a hang bound, not a speed claim
        last, refused_since = None, None
        # the receiver reads nothing: fill its buffers, the kernel's and our queue until
        # every send has been refused for a while (the queue is then full and stays so)
        while refused_since is None or time.monotonic() - refused_since < 0.5:
            assert time.monotonic() < deadline, "the queue never filled"
            tracker = sender.try_send("node-b", [header, payload, b"{}"], track=True)
            if tracker is False:
                refused_since = refused_since or (time.monotonic() if last else None)
                time.sleep(0.01)
            else:
                last, refused_since = tracker, None
        assert not last.done  # its pieces still wait in the full queue
        while not last.done:  # reading at the receiver lets every frame go
            assert time.monotonic() < deadline, "the queued frames were never taken"
            if receiver.wait(0.05)[0]:
                while receiver.receive() is not None:
                    pass
    finally:
        sender.close(linger=0)
        receiver.close(linger=0)
