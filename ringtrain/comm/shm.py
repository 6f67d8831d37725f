"""Shared-memory lanes: the data path between nodes on one host.

Nodes that share a machine, a network namespace and a user gain nothing from pushing
gradients through TCP and CURVE: the bytes never leave the host. Between such peers a ring
segment travels through a *lane* instead, a file in ``/dev/shm`` that the sender writes and
its successor reads in place; the ZeroMQ message that announces it carries only a reference
(``wire.SHM_REF``: lane name, slot, ticket). Linux only; elsewhere every link uses TCP.

Who qualifies. Every node keeps a *beacon*, ``/dev/shm/ringtrain-beacon-<hex>``, holding its
node id and its network namespace, and names it in its HELLO. A peer that can open that file
(a regular file, not a link, owned by its own uid) and finds in it the HELLO's sender and
its own network namespace shares ``/dev/shm``, the namespace and the uid with that node; the
relation is symmetric, so both ends of a link decide the same way. Nodes in different
network namespaces (the emulated LAN of ``ringtrain.lab.netns``) never qualify, so they keep
measuring their links.

A lane, ``/dev/shm/ringtrain-lane-<hex>`` (mode 0600), has ``slots`` slots of ``slot_bytes``::

    0   magic "RTLANE01"      8   slots (u32), attached (u32, set by the receiver)
    16  slot_bytes (u64)      24  creator pid (u32), its pid namespace (u32)
    32  owner node id (64 bytes, UTF-8, NUL padded)
    96  written[slots] (u64)  ticket of each slot's content, set by the sender
    ..  released[slots] (u64) ticket of each slot the receiver is done with
    DATA_OFFSET(slots)        the slots, each slot_bytes long

A slot is free when released == the ticket last sent in it. The sender copies a segment into
the next slot in turn, stamps a fresh ticket, and sends the reference; the receiver checks
that the slot holds that ticket, reduces straight from the slot, then releases it. The
sender unlinks the file once the receiver has attached, so a killed process leaks nothing.
A lane belongs to one (successor, generation) and is replaced after any failed collective,
so slots of messages dropped with an abandoned collective never block a later one. A
replaced lane the receiver never attached stays (up to ``KEPT_LANES``) until it attaches a
newer one: a collective that failed here may still complete, or fail on its own terms, at
the receiver, which reads what was sent.

Doors. Every node also binds a Unix datagram socket, ``/dev/shm/ringtrain-door-<hex>``
(mode 0600, named after its beacon), and DATA messages to a same-host peer (a lane reference,
or a small collective's whole buffer) go to the peer's door as one datagram: header, payload
and descriptor back to back, cut apart again by the header's ``nbytes`` and flags. A
datagram goes straight from the sender's engine thread into the receiver's poll, with none
of ZeroMQ's I/O-thread hops and no encryption the host does not need, which is what small
collectives' latency is made of. Only the same uid can write to a door, and the kernel
stamps every datagram with the sender's bound path, which names the door of a peer whose
beacon we verified: a datagram from any other path is dropped. Control messages stay on
ZeroMQ.

Memory order: the sender's data and ticket stores precede the send (a system call) that
announces them, and the receiver reads only after the matching receive. Before releasing,
the receiver passes a mutex, which orders its reads of the slot before the release store on
weakly ordered CPUs too.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
import socket
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import ProtocolError
from .wire import FLAG_DESCRIPTOR, FLAG_SHM, HEADER_SIZE, SHM_NAME_BYTES, SHM_REF

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
BEACON_PREFIX, LANE_PREFIX, DOOR_PREFIX = "ringtrain-beacon-", "ringtrain-lane-", "ringtrain-door-"
DATAGRAM_BYTES = 64 * 1024  # largest message sent to a door; larger ones take ZeroMQ
DOOR_BUFFER_BYTES = 4 << 20
LANE_POLL = 0.0005  # seconds between looks at a full lane or door: they free up with no message
BEACON_MAGIC = b"ringtrain-beacon 1\n"
LANE_MAGIC = b"RTLANE01"
# magic, slots, attached, slot_bytes, creator pid, its pid namespace, owner node id
LANE_HEADER = struct.Struct("<8sIIQII64s")
MAX_SLOTS = 1024
KEPT_LANES = 4  # per peer: lanes of abandoned collectives a receiver may still have to read
_NAME_RE = re.compile(rb"[0-9a-f]{%d}" % SHM_NAME_BYTES)
_PAGE = 4096


def data_offset(slots: int) -> int:
    """Where a lane of ``slots`` slots keeps its first slot (page aligned)."""
    end = LANE_HEADER.size + 16 * slots
    return -(-end // _PAGE) * _PAGE


def network_namespace() -> str | None:
    """This process's network namespace as ``device:inode``; None where there is none
    (not Linux), which turns shared memory off."""
    try:
        info = os.stat("/proc/self/ns/net")
    except OSError:
        return None
    return f"{info.st_dev}:{info.st_ino}"


def pid_namespace() -> int:
    """This process's pid namespace (its inode, 0 if unknown): a pid means a process only
    within one."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino & 0xFFFFFFFF
    except OSError:
        return 0


def _open_own_file(path: str, peer: str, what: str) -> int:
    """Open ``path`` read-write if it is a regular file of ours; ProtocolError otherwise."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ProtocolError(what, "a shared-memory file this node can open", str(exc),
                            peer) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
        os.close(fd)
        raise ProtocolError(what, "a regular file owned by this user", path, peer)
    return fd


def _sweep_dead(prefix: str) -> None:
    """Remove our files of ``prefix`` whose creator process is gone (killed before cleanup).
    Only files made in our pid namespace: elsewhere (another container sharing /dev/shm)
    the creator's pid means nothing here."""
    here = pid_namespace()
    try:
        names = [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        path = os.path.join(SHM_DIR, name)
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_uid != os.getuid():
                    continue
                head = f.read(LANE_HEADER.size if prefix == LANE_PREFIX else 256)
            if prefix == LANE_PREFIX:
                pid, namespace = LANE_HEADER.unpack_from(head)[4:6] \
                    if len(head) == LANE_HEADER.size else (0, 0)
            else:
                lines = head.split(b"\n")
                pid = int(lines[1]) if len(lines) > 4 and lines[1].isdigit() else 0
                namespace = int(lines[4]) if pid and lines[4].isdigit() else 0
            if pid and namespace == here:
                os.kill(pid, 0)
        except ProcessLookupError:
            stale = [path]
            if prefix == BEACON_PREFIX:
                stale.append(os.path.join(SHM_DIR, DOOR_PREFIX + name[len(prefix):]))
            for stale_path in stale:
                try:
                    os.unlink(stale_path)
                except OSError:
                    pass
        except (OSError, ValueError, struct.error):
            continue


class OutboundLane:
    """The sending end of a lane: this node's segments to one successor."""

    def __init__(self, owner: str, slots: int, slot_bytes: int):
        self.name = secrets.token_hex(SHM_NAME_BYTES // 2)
        self.path = os.path.join(SHM_DIR, LANE_PREFIX + self.name)
        self.slots, self.slot_bytes = slots, slot_bytes
        size = data_offset(slots) + slots * slot_bytes
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            # reserve the pages now: a full /dev/shm (Docker gives 64 MiB) is an OSError
            # here, where TCP can take over, not a SIGBUS at the first write into the map
            os.posix_fallocate(fd, 0, size)
            self._map = mmap.mmap(fd, size)
        except OSError:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        LANE_HEADER.pack_into(self._map, 0, LANE_MAGIC, slots, 0, slot_bytes, os.getpid(),
                              pid_namespace(), owner.encode()[:64])
        self._written = np.frombuffer(self._map, np.uint64, slots, LANE_HEADER.size)
        self._released = np.frombuffer(self._map, np.uint64, slots, LANE_HEADER.size + 8 * slots)
        self._data = np.frombuffer(self._map, np.uint8, slots * slot_bytes, data_offset(slots))
        self._committed = np.zeros(slots, np.uint64)  # ticket last sent in each slot
        self._next = 0  # slot of the next segment
        self._ticket = 0
        self._linked = True

    @property
    def attached(self) -> bool:
        """Whether the receiver has mapped this lane."""
        return bool(self._map[12])

    def write(self, payload: np.ndarray) -> bytes | None:
        """Copy ``payload`` into the next slot; the reference to send, or None while that
        slot is still the receiver's. Nothing is final until :meth:`commit`."""
        slot = self._next
        if self._released[slot] != self._committed[slot]:
            return None
        raw = payload.reshape(-1).view(np.uint8)
        start = slot * self.slot_bytes
        self._data[start:start + raw.nbytes] = raw
        ticket = self._ticket + 1
        self._written[slot] = ticket
        if self._linked and self.attached:
            self._unlink()  # the receiver has it mapped: the name is no longer needed
        return SHM_REF.pack(self.name.encode(), slot, 0, ticket)

    def commit(self) -> None:
        """The reference :meth:`write` returned was sent: that slot now waits for release."""
        self._ticket += 1
        self._committed[self._next] = self._ticket
        self._next = (self._next + 1) % self.slots

    def _unlink(self) -> None:
        self._linked = False
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def close(self) -> None:
        if self._linked:
            self._unlink()
        del self._written, self._released, self._data
        self._map.close()


class DatagramFrame:
    """One frame cut out of a datagram, shaped like a ``zmq.Frame`` for the mailbox."""

    __slots__ = ("buffer",)  # a plain class: made three times per datagram, cheaply

    def __init__(self, buffer: memoryview):
        self.buffer = buffer

    def __len__(self) -> int:
        return len(self.buffer)


_FLAGS, _NBYTES = struct.Struct("<H"), struct.Struct("<Q")  # header fields at 8 and 64


def split_datagram(data: bytes) -> list[DatagramFrame]:
    """A datagram's frames: header, payload (``nbytes``, or a lane reference), and the
    descriptor when flagged. Whatever does not add up shows as a wrong frame count or
    length when the mailbox checks the frames."""
    view = memoryview(data)
    if len(view) < HEADER_SIZE:
        return [DatagramFrame(view)]
    flags, = _FLAGS.unpack_from(view, 8)
    nbytes, = _NBYTES.unpack_from(view, 64)
    end = HEADER_SIZE + (SHM_REF.size if flags & FLAG_SHM else nbytes)
    frames = [view[:HEADER_SIZE], view[HEADER_SIZE:end]]
    if len(view) > end or flags & FLAG_DESCRIPTOR:
        frames.append(view[end:])
    return [DatagramFrame(f) for f in frames]


@dataclass
class _InboundLane:
    name: bytes
    slots: int
    slot_bytes: int
    mapping: mmap.mmap = field(repr=False)
    written: np.ndarray = field(repr=False)
    released: np.ndarray = field(repr=False)
    data: memoryview = field(repr=False)


class SharedMemoryLanes:
    """A node's beacon, its lanes to successors and the lanes it reads from.

    Args:
        node_id: this node's id (written into the beacon and into its lanes).
        lane_bytes: bytes of each lane; its slots are ``slot_bytes`` each.
        slot_bytes: the segment size (``Settings.segment_bytes``).

    Raises OSError if ``/dev/shm`` is unusable; use :func:`open_lanes` for "None when not
    available".
    """

    def __init__(self, node_id: str, lane_bytes: int, slot_bytes: int):
        self.node_id = node_id
        self.slot_bytes = slot_bytes
        self.slots = max(2, min(MAX_SLOTS, lane_bytes // slot_bytes))
        self.namespace = network_namespace() or ""
        self._outbound: dict[str, tuple[int, OutboundLane]] = {}  # peer -> (generation, lane)
        self._replaced: dict[str, list[OutboundLane]] = {}  # peer -> lanes not yet attached
        self._inbound: dict[str, dict[bytes, _InboundLane]] = {}  # peer -> name -> lane
        self._same_host: dict[str, str] = {}  # peer -> the beacon it proved
        self._doors: dict[str, str] = {}  # door path -> the peer it belongs to
        self._door_of: dict[str, str] = {}  # peer -> its door path
        self._fence = threading.Lock()
        self.dropped = 0  # datagrams from paths that are no verified peer's door
        _sweep_dead(BEACON_PREFIX)
        _sweep_dead(LANE_PREFIX)
        self.beacon = secrets.token_hex(SHM_NAME_BYTES // 2)
        self._beacon_path = os.path.join(SHM_DIR, BEACON_PREFIX + self.beacon)
        self._door_path = os.path.join(SHM_DIR, DOOR_PREFIX + self.beacon)
        self._door = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._door.setblocking(False)
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                self._door.setsockopt(socket.SOL_SOCKET, option, DOOR_BUFFER_BYTES)
            mask = os.umask(0o177)  # the socket file is born 0600: only our uid may write
            try:
                self._door.bind(self._door_path)
            finally:
                os.umask(mask)
            fd = os.open(self._beacon_path,
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self._beacon_text(node_id, os.getpid()))
        except OSError:
            self._door.close()
            raise

    def _beacon_text(self, node_id: str, pid: int) -> bytes:
        return BEACON_MAGIC + f"{pid}\n{self.namespace}\n{node_id}\n{pid_namespace()}\n".encode()

    # who shares this host ------------------------------------------------------------------

    def verify(self, peer: str, beacon: str) -> bool:
        """Check the beacon a peer named in its HELLO; remember whether it shares this host."""
        if not beacon:
            self._forget_host(peer)
            return False
        if self._same_host.get(peer) == beacon:
            return True
        if not _NAME_RE.fullmatch(beacon.encode()):
            raise ProtocolError("hello.host", f"{SHM_NAME_BYTES} lowercase hex digits", beacon,
                                peer)
        try:
            fd = _open_own_file(os.path.join(SHM_DIR, BEACON_PREFIX + beacon), peer,
                                "hello.host")
        except ProtocolError:
            self._forget_host(peer)
            return False  # another host (or another /dev/shm): the link uses TCP
        with os.fdopen(fd, "rb") as f:
            text = f.read(512)
        lines = text[len(BEACON_MAGIC):].split(b"\n")
        same = (text.startswith(BEACON_MAGIC) and len(lines) >= 3
                and lines[1].decode(errors="replace") == self.namespace
                and lines[2].decode(errors="replace") == peer)
        self._forget_host(peer)
        if same:
            door = os.path.join(SHM_DIR, DOOR_PREFIX + beacon)
            self._same_host[peer] = beacon
            self._doors[door], self._door_of[peer] = peer, door
        return same

    def _forget_host(self, peer: str) -> None:
        self._same_host.pop(peer, None)
        door = self._door_of.pop(peer, None)
        if door is not None:
            self._doors.pop(door, None)

    def reaches(self, peer: str) -> bool:
        """Whether segments to ``peer`` can go through a lane."""
        return peer in self._same_host

    def peers(self) -> list[str]:
        """The peers known to share this host, sorted."""
        return sorted(self._same_host)

    def forget(self, peer: str) -> None:
        """``peer`` restarted or left: drop what we know of it and our lanes with it."""
        self._forget_host(peer)
        self.reset(peer)
        for lane in self._replaced.pop(peer, []):
            lane.close()
        self._inbound.pop(peer, None)

    # sending -------------------------------------------------------------------------------

    def outbound(self, peer: str, generation: int) -> OutboundLane | None:
        """The lane to ``peer`` for ``generation`` (a fresh one for a new generation); None
        if no lane can be made (``/dev/shm`` full: logged, and ``peer`` gets TCP from now)."""
        current = self._outbound.get(peer)
        if current is not None and current[0] == generation:
            if current[1].attached and self._replaced.get(peer):
                for lane in self._replaced.pop(peer):  # the receiver has moved past them
                    lane.close()
            return current[1]
        self.reset(peer)
        try:
            lane = OutboundLane(self.node_id, self.slots, self.slot_bytes)
        except OSError as exc:
            log.warning("node %s: no shared-memory lane to %s, using TCP: %s", self.node_id,
                        peer, exc)
            self._forget_host(peer)
            return None
        self._outbound[peer] = (generation, lane)
        return lane

    def reset(self, peer: str) -> None:
        """Retire the lane to ``peer`` (after a failed collective: its slots may never be
        released); the next segment opens a fresh one."""
        current = self._outbound.pop(peer, None)
        if current is None:
            return
        lane = current[1]
        if lane.attached:
            lane.close()
            return
        replaced = self._replaced.setdefault(peer, [])
        replaced.append(lane)  # the receiver may still read what was sent in it
        while len(replaced) > KEPT_LANES:
            replaced.pop(0).close()

    # doors ---------------------------------------------------------------------------------

    def fileno(self) -> int:
        """The door's file descriptor, readable when a datagram waits."""
        return self._door.fileno()

    def door_takes(self, peer: str, nbytes: int) -> bool:
        """Whether a message of ``nbytes`` to ``peer`` goes through its door."""
        return nbytes <= DATAGRAM_BYTES and peer in self._same_host

    def send(self, peer: str, frames: list) -> bool:
        """Send a message (its frames back to back) to ``peer``'s door. False when it was
        not sent: the door's queue is full (try again soon), or the door is gone (the peer
        died, or its file was removed): then ``peer`` is no longer reached through shared
        memory and the retry takes TCP, where a dead peer is noticed by its silence."""
        try:
            self._door.sendmsg(frames, [], 0, self._door_of[peer])
        except BlockingIOError:
            return False
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            log.warning("node %s: the door of %s is gone (%s); using TCP", self.node_id, peer,
                        exc)
            self._forget_host(peer)  # its lane stays valid for the collective under way
            return False
        return True

    def receive_datagram(self) -> tuple[str, list[DatagramFrame]] | None:
        """The next datagram from a verified peer's door: (peer, frames); None when none
        waits. Datagrams from any other path are dropped and counted."""
        while True:
            try:
                data, sender = self._door.recvfrom(DATAGRAM_BYTES + HEADER_SIZE)
            except (BlockingIOError, InterruptedError):
                return None
            peer = self._doors.get(sender) if isinstance(sender, str) else None
            if peer is not None:
                return peer, split_datagram(data)
            self.dropped += 1

    # receiving -----------------------------------------------------------------------------

    def receive(self, peer: str, reference: memoryview, nbytes: int
                ) -> tuple[memoryview, Callable[[], None]]:
        """The ``nbytes`` a reference from ``peer`` points at, and the function that releases
        them once used. ProtocolError names whatever in the reference is wrong."""
        if peer not in self._same_host:
            raise ProtocolError("flags", "no shared-memory reference from a peer on another "
                                "host", "a shared-memory reference", peer)
        name, slot, _, ticket = SHM_REF.unpack(reference)
        if not _NAME_RE.fullmatch(name):
            raise ProtocolError("shm lane", f"{SHM_NAME_BYTES} lowercase hex digits", name, peer)
        lane = self._inbound.get(peer, {}).get(name)
        if lane is None:
            lane = self._attach(peer, name)
        if slot >= lane.slots:
            raise ProtocolError("shm slot", f"below {lane.slots}", slot, peer)
        if nbytes > lane.slot_bytes:
            raise ProtocolError("nbytes", f"at most {lane.slot_bytes}", nbytes, peer)
        if int(lane.written[slot]) != ticket:
            raise ProtocolError("shm ticket", int(lane.written[slot]), ticket, peer)
        start = slot * lane.slot_bytes

        def release() -> None:
            with self._fence:  # orders our reads of the slot before the release store
                lane.released[slot] = ticket

        return lane.data[start:start + nbytes], release

    def _attach(self, peer: str, name: bytes) -> _InboundLane:
        path = os.path.join(SHM_DIR, LANE_PREFIX + name.decode())
        fd = _open_own_file(path, peer, "shm lane")
        try:
            size = os.fstat(fd).st_size
            if size < LANE_HEADER.size:
                raise ProtocolError("shm lane size", f"at least {LANE_HEADER.size}", size, peer)
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        magic, slots, _, slot_bytes, _, _, owner = LANE_HEADER.unpack_from(mapping)
        problem = None
        if magic != LANE_MAGIC:
            problem = ("shm lane magic", LANE_MAGIC, magic)
        elif owner.rstrip(b"\0").decode(errors="replace") != peer:
            problem = ("shm lane owner", peer, owner.rstrip(b"\0"))
        elif not 0 < slots <= MAX_SLOTS or not 0 < slot_bytes <= self.slot_bytes:
            problem = ("shm lane geometry", f"at most {MAX_SLOTS} slots of at most "
                       f"{self.slot_bytes} bytes", (slots, slot_bytes))
        elif size != data_offset(slots) + slots * slot_bytes:
            problem = ("shm lane size", data_offset(slots) + slots * slot_bytes, size)
        if problem is not None:
            mapping.close()
            raise ProtocolError(problem[0], problem[1], problem[2], peer)
        struct.pack_into("<I", mapping, 12, 1)  # attached: the sender may unlink the name
        lane = _InboundLane(name, slots, slot_bytes, mapping,
                            np.frombuffer(mapping, np.uint64, slots, LANE_HEADER.size),
                            np.frombuffer(mapping, np.uint64, slots, LANE_HEADER.size + 8 * slots),
                            memoryview(mapping)[data_offset(slots):])
        lanes = self._inbound.setdefault(peer, {})
        lanes[name] = lane
        while len(lanes) > KEPT_LANES:
            del lanes[next(iter(lanes))]  # the oldest: its sender has replaced it
        return lane

    def close(self) -> None:
        """Remove the beacon, the door and every lane this node created."""
        for peer in list(self._outbound):
            self.reset(peer)
        for lanes in self._replaced.values():
            for lane in lanes:
                lane.close()
        self._replaced.clear()
        self._inbound.clear()
        self._door.close()
        for path in (self._beacon_path, self._door_path):
            try:
                os.unlink(path)
            except OSError:
                pass


def open_lanes(node_id: str, lane_bytes: int, slot_bytes: int) -> SharedMemoryLanes | None:
    """A node's lanes, or None where shared memory is off (``lane_bytes`` 0), not Linux, or
    ``/dev/shm`` is unusable (logged)."""
    if lane_bytes <= 0 or network_namespace() is None or not os.path.isdir(SHM_DIR):
        return None
    try:
        return SharedMemoryLanes(node_id, lane_bytes, slot_bytes)
    except OSError as exc:
        log.warning("shared memory between same-host nodes is off: %s", exc)
        return None
