"""Shared-memory lanes (ringtrain.comm.shm): who qualifies, the slot protocol, and every way a
reference from a peer can be wrong. Real files in /dev/shm; Linux only."""

from __future__ import annotations

import os
import socket
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import numpy as np
import pytest

from ringtrain.comm import shm
from ringtrain.comm.wire import (
    FLAG_DESCRIPTOR,
    FLAG_SHM,
    SHM_NAME_BYTES,
    SHM_REF,
    Header,
    MessageKind,
    dtype_code,
)
from ringtrain.errors import ProtocolError

pytestmark = pytest.mark.skipif(shm.network_namespace() is None or not os.path.isdir(
    shm.SHM_DIR), reason="shared-memory lanes need Linux and /dev/shm")

SLOT = 4096


@pytest.fixture
def pair() -> Iterator[tuple[shm.SharedMemoryLanes, shm.SharedMemoryLanes]]:
    """Two nodes' lanes, "a" and "b", that have checked each other's beacons."""
    a = shm.SharedMemoryLanes("a", 4 * SLOT, SLOT)
    b = shm.SharedMemoryLanes("b", 4 * SLOT, SLOT)
    assert a.verify("b", b.beacon) and b.verify("a", a.beacon)
    yield a, b
    a.close()
    b.close()


def test_beacons_prove_the_same_host_and_name_their_node(pair):
    a, b = pair
    assert a.reaches("b") and b.reaches("a")
    # a beacon that names another node, a missing beacon, no beacon: not the same host
    assert not a.verify("c", b.beacon) and not a.reaches("c")
    assert not a.verify("c", "0" * SHM_NAME_BYTES)
    assert not a.verify("b", "") and not a.reaches("b")
    with pytest.raises(ProtocolError) as info:
        a.verify("b", "../../etc/passwd")
    assert info.value.field == "hello.host" and info.value.peer == "b"


def test_a_beacon_from_another_network_namespace_does_not_qualify(pair):
    a, _ = pair
    other = shm.SharedMemoryLanes("c", 4 * SLOT, SLOT)
    try:
        other.namespace = "1:2"  # as if it ran in another network namespace
        os.unlink(other._beacon_path)
        with open(other._beacon_path, "wb") as f:
            f.write(other._beacon_text("c", os.getpid()))
        assert not a.verify("c", other.beacon)
    finally:
        other.close()


def test_segments_travel_through_slots_and_wait_for_release(pair):
    a, b = pair
    lane = a.outbound("b", generation=1)
    views, releases = [], []
    for i in range(4):
        data = np.full(SLOT // 4, i, np.float32)
        reference = lane.write(data)
        assert reference is not None
        lane.commit()
        view, release = b.receive("a", memoryview(reference), data.nbytes)
        assert np.array_equal(np.frombuffer(view, np.float32), data)
        views.append(view)
        releases.append(release)
    assert lane.write(np.zeros(1, np.float32)) is None  # all four slots are b's
    releases[0]()
    reference = lane.write(np.full(3, 7, np.float32))
    assert reference is not None and SHM_REF.unpack(reference)[1] == 0  # slot 0 again
    lane.commit()
    view, _ = b.receive("a", memoryview(reference), 12)
    assert np.array_equal(np.frombuffer(view, np.float32), [7, 7, 7])


def test_an_unsent_write_leaves_its_slot_free(pair):
    a, b = pair
    lane = a.outbound("b", generation=1)
    for _ in range(10):  # written but never committed (the send queue was full)
        assert lane.write(np.ones(4, np.float32)) is not None
    reference = lane.write(np.ones(4, np.float32))
    lane.commit()
    b.receive("a", memoryview(reference), 16)


def test_the_lane_file_is_unlinked_once_the_receiver_attached(pair):
    a, b = pair
    lane = a.outbound("b", generation=1)
    reference = lane.write(np.ones(4, np.float32))
    lane.commit()
    assert os.path.exists(lane.path)
    b.receive("a", memoryview(reference), 16)[1]()
    lane.write(np.ones(4, np.float32))
    assert not os.path.exists(lane.path)


def test_a_new_generation_or_a_reset_gives_a_new_lane(pair):
    a, _ = pair
    first = a.outbound("b", generation=1)
    assert a.outbound("b", generation=1) is first
    second = a.outbound("b", generation=2)
    assert second is not first
    a.reset("b")
    assert a.outbound("b", generation=2) is not second


def test_a_replaced_lane_stays_readable_until_the_receiver_moves_on(pair):
    a, b = pair
    old = a.outbound("b", generation=1)
    sent = old.write(np.full(4, 5, np.float32))
    old.commit()
    a.reset("b")  # our collective failed, but b may still complete it
    new = a.outbound("b", generation=1)
    view, _ = b.receive("a", memoryview(sent), 16)
    assert np.array_equal(np.frombuffer(view, np.float32), [5] * 4)
    reference = new.write(np.ones(4, np.float32))
    new.commit()
    b.receive("a", memoryview(reference), 16)  # b attaches the new lane
    assert os.path.exists(old.path)
    assert a.outbound("b", generation=1) is new
    assert not os.path.exists(old.path)  # b has moved past it


def bad_reference(pair, **changes) -> ProtocolError:
    a, b = pair
    a.reset("b")  # a fresh lane: earlier cases left their slots unreleased
    lane = a.outbound("b", generation=1)
    reference = lane.write(np.ones(4, np.float32))
    lane.commit()
    name, slot, reserved, ticket = SHM_REF.unpack(reference)
    fields = dict(name=name, slot=slot, ticket=ticket, nbytes=16, peer="a")
    fields.update(changes)
    forged = SHM_REF.pack(fields["name"], fields["slot"], reserved, fields["ticket"])
    with pytest.raises(ProtocolError) as info:
        b.receive(fields["peer"], memoryview(forged), fields["nbytes"])
    return info.value


def test_hostile_references_are_refused_naming_field_and_peer(pair):
    cases = {
        "shm lane": dict(name=b"../" + b"0" * (SHM_NAME_BYTES - 3)),
        "shm slot": dict(slot=4),
        "shm ticket": dict(ticket=99),
        "nbytes": dict(nbytes=SLOT + 1),
    }
    for field, changes in cases.items():
        error = bad_reference(pair, **changes)
        assert error.field == field and error.peer == "a", (field, error)
    missing = bad_reference(pair, name=b"f" * SHM_NAME_BYTES)
    assert missing.field == "shm lane" and "a" in str(missing)


def test_references_from_a_peer_not_on_this_host_are_refused(pair):
    _, b = pair
    error = bad_reference(pair, peer="stranger")
    assert error.field == "flags" and error.peer == "stranger"
    b.forget("a")
    assert bad_reference(pair).field == "flags"


def test_a_lane_claimed_by_another_node_is_refused(pair):
    a, b = pair
    c = shm.SharedMemoryLanes("c", 4 * SLOT, SLOT)
    try:
        assert b.verify("c", c.beacon)
        lane = a.outbound("b", generation=1)  # a's lane, presented by c
        reference = lane.write(np.ones(4, np.float32))
        with pytest.raises(ProtocolError) as info:
            b.receive("c", memoryview(reference), 16)
        assert info.value.field == "shm lane owner" and info.value.peer == "c"
    finally:
        c.close()


def test_a_lane_with_a_forged_geometry_is_refused(pair):
    a, b = pair
    lane = a.outbound("b", generation=1)
    reference = lane.write(np.ones(4, np.float32))
    struct.pack_into("<Q", lane._map, 16, 1 << 40)  # slot_bytes far beyond the segment size
    with pytest.raises(ProtocolError) as info:
        b.receive("a", memoryview(reference), 16)
    assert info.value.field == "shm lane geometry"


def test_files_of_killed_processes_are_swept():
    code = ("import os, sys; from ringtrain.comm import shm\n"
            "lanes = shm.SharedMemoryLanes('dead', 8192, 4096)\n"
            "lane = lanes.outbound('x', 1)\n"
            "print(lanes._beacon_path, lane.path, lanes._door_path, flush=True)\n"
            "os._exit(0)  # no cleanup, as after SIGKILL\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    paths = out.stdout.split()
    assert all(os.path.exists(p) for p in paths)
    shm.SharedMemoryLanes("sweeper", 8192, 4096).close()
    assert not any(os.path.exists(p) for p in paths)


def test_open_lanes_is_off_with_zero_bytes():
    assert shm.open_lanes("a", 0, SLOT) is None
    lanes = shm.open_lanes("a", 4 * SLOT, SLOT)
    assert lanes is not None
    lanes.close()
    assert not os.path.exists(lanes._beacon_path)


def data_message(nbytes: int, flags: int = 0, descriptor: bytes = b"") -> list[bytes]:
    header = Header(kind=MessageKind.DATA, job=1, generation=2, sequence=3, dtype=dtype_code(
        np.dtype("u1")), flags=flags, nbytes=nbytes)
    return [header.pack(), bytes(range(256)) * (nbytes // 256) + b"x" * (nbytes % 256),
            descriptor]


def test_doors_carry_whole_messages_between_verified_peers(pair):
    a, b = pair
    assert stat.S_IMODE(os.stat(a._door_path).st_mode) == 0o600
    frames = data_message(1000, FLAG_DESCRIPTOR, b'{"collective": "all_reduce"}')
    assert a.send("b", frames)
    peer, got = b.receive_datagram()
    assert peer == "a" and [bytes(f.buffer) for f in got] == frames
    assert b.receive_datagram() is None
    header, payload, _ = data_message(0, FLAG_SHM)
    reference = SHM_REF.pack(b"0" * SHM_NAME_BYTES, 1, 0, 2)
    assert b.send("a", [header, reference])
    peer, got = a.receive_datagram()
    assert peer == "b" and [bytes(f.buffer) for f in got] == [header, reference]


def test_datagrams_from_anyone_but_a_verified_peer_are_dropped(pair, tmp_path):
    _, b = pair
    stranger = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stranger.bind(str(tmp_path / "stranger"))
    unbound = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        for sock in (stranger, unbound):
            sock.sendto(b"".join(data_message(8)), b._door_path)
        assert b.receive_datagram() is None
        assert b.dropped == 2
    finally:
        stranger.close()
        unbound.close()


def test_malformed_datagrams_split_into_frames_the_mailbox_rejects():
    header, payload, _ = data_message(16)
    assert len(shm.split_datagram(header[:10])) == 1  # too short for a header
    assert [len(f) for f in shm.split_datagram(header + payload)] == [72, 16]
    assert [len(f) for f in shm.split_datagram(header + payload + b"zz")] == [72, 16, 2]
    assert [len(f) for f in shm.split_datagram(header + payload[:5])] == [72, 5]


def test_a_full_door_says_so_and_a_gone_one_hands_over_to_tcp(pair):
    a, b = pair
    frames = data_message(shm.DATAGRAM_BYTES)
    sent = 0
    while a.send("b", frames):
        sent += 1
        assert sent < 10_000, "a door never filled up"
    assert sent >= 1
    assert a.door_takes("b", shm.DATAGRAM_BYTES) and not a.door_takes("b", shm.DATAGRAM_BYTES + 1)
    assert not a.door_takes("stranger", 10)
    b._door.close()
    os.unlink(b._door_path)
    assert not a.send("b", frames)  # the door is gone: not sent, and b now takes TCP
    assert not a.reaches("b")


@pytest.fixture
def tiny_shm(monkeypatch) -> Iterator[str]:
    """A real 1 MiB tmpfs standing in for /dev/shm (needs root; skips otherwise). A short
    path: a door is a Unix socket, whose path may not exceed 107 bytes."""
    where = tempfile.mkdtemp(prefix="rtshm", dir="/tmp")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", where],
                           capture_output=True, text=True, timeout=10)
    if mount.returncode != 0:
        os.rmdir(where)
        pytest.skip(f"cannot mount a tmpfs: {mount.stderr.strip()}")
    monkeypatch.setattr(shm, "SHM_DIR", where)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", where], timeout=10)
        os.rmdir(where)


def test_a_full_dev_shm_falls_back_to_tcp_instead_of_crashing(tiny_shm):
    a = shm.SharedMemoryLanes("a", 8 << 20, 1 << 20)  # lanes of 8 MiB in 1 MiB of tmpfs
    b = shm.SharedMemoryLanes("b", 8 << 20, 1 << 20)
    try:
        assert a.verify("b", b.beacon)
        assert a.outbound("b", generation=1) is None  # no room: logged, no SIGBUS later
        assert not a.reaches("b")
        assert os.listdir(tiny_shm) and not any(
            name.startswith(shm.LANE_PREFIX) for name in os.listdir(tiny_shm))
    finally:
        a.close()
        b.close()


def test_the_sweep_spares_files_made_in_another_pid_namespace():
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, timeout=30, check=True)
    lane = shm.OutboundLane("x", 2, 4096)
    try:
        struct.pack_into("<II", lane._map, 24, int(dead.stdout), shm.pid_namespace() ^ 1)
        shm._sweep_dead(shm.LANE_PREFIX)
        assert os.path.exists(lane.path)  # that pid may be alive in its own namespace
        struct.pack_into("<I", lane._map, 28, shm.pid_namespace())
        shm._sweep_dead(shm.LANE_PREFIX)
        assert not os.path.exists(lane.path)  # ours, and its creator is gone
    finally:
        lane.close()
