"""Sorting what arrives: validated data for collectives, aborts, and control for membership.

Every message is decoded and checked here before anything else sees it. A message that breaks
the wire format is dropped and counted; the first drop from each peer is logged, later ones are
not, so a stranger cannot flood the log. It never reaches a collective.

On a keyed ring, a message that arrives on our listening socket is accepted only from a CURVE
key that membership has admitted for the node id it claims, HELLOs (which prove the key)
excepted: nobody can speak for another node. A message whose routing id names another key
than the one CURVE proved is forged and dropped.

Repeat offenders. Every drop that is the sender's fault (a bad field, an unauthenticated or
forged message, another job's traffic, a control message membership refused) is an offence of
the *offender*: the sender's proven CURVE key on a keyed ring, else its node id and address.
After ``MAX_OFFENCES`` offences the offender is evicted for ``EVICTION_SECONDS``: its messages
are dropped without being decoded, counted under ``"evicted"``, and one more line is logged. An
evicted offender that is an admitted member is reported in :attr:`Mailbox.offenders`, for the
node to suspect it (a member that keeps sending garbage is broken, whatever it says).

Data that arrives before the collective it belongs to has started (a fast predecessor) is kept,
up to a byte budget, until that collective asks for it. Every table keyed by what a peer
chooses (offenders, logged peers) is bounded.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field

from ..errors import ProtocolError
from .shm import SharedMemoryLanes
from .transport import Incoming, Transport
from .wire import FLAG_DESCRIPTOR, Header, MessageKind, check_frames, decode_header, payload_frames

log = logging.getLogger(__name__)

MAX_OFFENCES = 20  # dropped messages before their sender is evicted
EVICTION_SECONDS = 300.0  # how long an eviction lasts (a new process has a new key anyway)
MAX_TRACKED = 4096  # bound on each table keyed by offenders
MAX_ABORTS = 256  # aborts kept: a ring has one collective in flight, a few more in a reform
# what one stashed message costs against the stash budget, whatever its payload: an empty
# message still takes a header, frames and a table entry, so many of them cannot be free
STASH_MESSAGE_BYTES = 1024


@dataclass
class Message:
    """A validated message: its header, its sender and its frames (header, payload in one
    or more frames, descriptor when flagged)."""

    header: Header
    origin: str
    frames: list = field(repr=False)
    on_link: bool = False
    peer_address: str = ""
    user: str = ""  # the sender's proven CURVE public key on a keyed ring
    local: bool = False  # it came through a same-host door

    @property
    def payload(self) -> memoryview:
        """The payload's bytes: without a copy when it came in one frame (a DATA payload
        may come in pieces, see ``wire``: they are joined)."""
        parts = self.payload_parts
        return parts[0] if len(parts) == 1 else memoryview(b"".join(parts))

    @property
    def payload_parts(self) -> list[memoryview]:
        """The payload as it came: one buffer, or its pieces in order (each holding whole
        elements), without a copy."""
        return [frame.buffer for frame in payload_frames(self.header, self.frames)]

    @property
    def descriptor(self) -> bytes | None:
        """The sender's collective descriptor, when it sent one."""
        return bytes(self.frames[-1].buffer) if self.header.flags & FLAG_DESCRIPTOR else None


class Mailbox:
    """Receives from a transport and sorts messages by kind.

    Args:
        transport: where messages come from.
        job: the 64-bit job id; messages of other jobs are dropped.
        max_stash_bytes: cap on data kept for collectives that have not started yet.

    Attributes:
        control: control messages for membership, oldest first.
        aborts: ABORT messages by (generation, sequence).
        dropped: how many messages were dropped, by reason (a header field, "unauthenticated",
            "routing id", "job", "stale", "stash", "evicted", or a field membership refused).
        admitted: node id -> the CURVE key it proved (keyed rings); written by membership,
            shared with the transport.
        evicted: offender -> monotonic time its eviction ends.
        offenders: admitted members evicted for repeated offences: node id -> why. The node
            should suspect each (see :meth:`take_offenders`).
    """

    def __init__(self, transport: Transport, job: int, max_stash_bytes: int):
        self.transport = transport
        self.job = job
        self.max_stash_bytes = max_stash_bytes
        self.control: deque[Message] = deque()
        self.aborts: dict[tuple[int, int], Message] = {}
        self.dropped: Counter[str] = Counter()
        self._data: dict[tuple[int, int], deque[Message]] = defaultdict(deque)
        self._stash_bytes = 0
        self.admitted: dict[str, str] = transport.admitted
        self.floor: tuple[int, int] = (0, 0)  # (generation, sequence) below which data is stale
        self.offences: dict[str, int] = {}
        self.evicted: dict[str, float] = {}
        self.offenders: dict[str, str] = {}
        self._logged: set[str] = set()
        self._logged_overflow = False
        self.doors: SharedMemoryLanes | None = None  # same-host peers' datagrams

    def pump(self, timeout: float, writable: str | None = None, links: bool = True) -> bool:
        """Wait up to ``timeout`` for traffic, then sort everything that has arrived.
        ``links=False``: only for data (see ``Transport.wait``).

        Returns:
            whether a send on link ``writable`` would not block now.
        """
        readable, can_send = self.transport.wait(timeout, writable, links)
        if readable:
            self._take()
        return can_send

    def drain(self) -> None:
        """Sort every message waiting in the transport, without blocking."""
        if self.transport.look():
            self._take()

    def _take(self) -> None:
        """Sort what the transport's last look found: its sockets' messages, and the
        datagrams at our door."""
        while (incoming := self.transport.receive()) is not None:
            self._sort(incoming)
        if self.doors is not None and self.doors.fileno() in self.transport.ready_fds:
            while (datagram := self.doors.receive_datagram()) is not None:
                self._sort(Incoming(datagram[0], datagram[1], local=True))

    def _sort(self, incoming: Incoming) -> None:
        if self.evicted:
            offender = self._offender(incoming)
            if offender in self.evicted:
                if time.monotonic() < self.evicted[offender]:
                    self.dropped["evicted"] += 1
                    return
                del self.evicted[offender]
                self.offences.pop(offender, None)
        # a door's sender is vouched for by the kernel (see shm.py), a link's by our dialling
        keyed = self.transport.key is not None and not incoming.on_link and not incoming.local
        if keyed and incoming.tag != incoming.user:
            self._drop(incoming, "routing id", f"message from {incoming.origin!r} at "
                       f"{incoming.peer_address or 'an unknown address'} whose routing id names "
                       f"another key than the one it authenticated with (forged), dropped")
            return
        try:
            if not incoming.frames:
                raise ProtocolError("frame count", "at least 2", 0, incoming.origin)
            header = decode_header(incoming.frames[0].buffer,
                                   max_payload=self.transport.settings.segment_bytes,
                                   peer=incoming.origin)
            check_frames(header, incoming.frames, incoming.origin)
        except ProtocolError as exc:
            self._drop(incoming, exc.field, self._describe(exc, incoming))
            return
        if (keyed and header.kind is not MessageKind.HELLO
                and self.admitted.get(incoming.origin) != incoming.user):
            self._drop(incoming, "unauthenticated",
                       f"message from {incoming.origin!r} at {incoming.peer_address} whose key "
                       f"was not admitted, dropped")
            return
        if header.job != self.job:
            self._drop(incoming, "job", f"message from {incoming.origin} at "
                       f"{incoming.peer_address} of another job ({header.job:#x}, this node's "
                       f"is {self.job:#x}), dropped")
            return
        message = Message(header, incoming.origin, incoming.frames, incoming.on_link,
                          incoming.peer_address, incoming.user, incoming.local)
        if header.kind is MessageKind.DATA:
            key = (header.generation, header.sequence)
            if key < self.floor:
                self.dropped["stale"] += 1
                return
            if self._stash_bytes + _stash_cost(header) > self.max_stash_bytes:
                self.dropped["stash"] += 1
                self._log_once(self._offender(incoming), f"data from {incoming.origin} for "
                               f"collective {key} exceeds the stash budget, dropped")
                return
            self._stash_bytes += _stash_cost(header)
            self._data[key].append(message)
        elif header.kind is MessageKind.ABORT:
            self._keep_abort(message)
        else:
            self.control.append(message)

    def _keep_abort(self, message: Message) -> None:
        """Remember an ABORT, in a bounded table: one for a collective already retired is
        stale, and past ``MAX_ABORTS`` the oldest goes (a peer picks the keys)."""
        key = (message.header.generation, message.header.sequence)
        if key < self.floor:
            self.dropped["stale"] += 1
            return
        if key in self.aborts:
            return
        if len(self.aborts) >= MAX_ABORTS:
            self.aborts.pop(min(self.aborts))
            self.dropped["aborts"] += 1
        self.aborts[key] = message

    @staticmethod
    def _describe(exc: ProtocolError, incoming: Incoming) -> str:
        where = f"{incoming.origin!r} at {incoming.peer_address or 'an unknown address'}"
        if exc.field == "version":
            return (f"peer {where} speaks ringtrain protocol {exc.got}, this node speaks "
                    f"protocol {exc.expected}: run the same ringtrain version on every node; "
                    f"its messages are dropped")
        if exc.field == "magic":
            return f"peer {where} does not speak ringtrain (magic {exc.got!r}), dropped"
        return f"{exc}; dropped"

    def reject(self, message: Message, exc: ProtocolError) -> None:
        """Count a control message that membership refused as an offence of its sender (and
        log it, once per sender)."""
        self._drop(message, exc.field, f"dropped control message: {exc}")

    def take_offenders(self) -> dict[str, str]:
        """Admitted members evicted since the last call: node id -> why. The node should
        suspect each one."""
        offenders, self.offenders = self.offenders, {}
        return offenders

    def _offender(self, sender: Incoming | Message) -> str:
        """Who is to blame for what ``sender`` sent (see *Repeat offenders*)."""
        if sender.on_link:
            return f"link {sender.origin}"
        if sender.local:
            return f"door {sender.origin}"
        if self.transport.key is not None:
            return f"key {sender.user}"
        return f"{sender.origin} at {sender.peer_address}"

    def _drop(self, sender: Incoming | Message, reason: str, text: str) -> None:
        self.dropped[reason] += 1
        offender = self._offender(sender)
        self._log_once(offender, f"{text} (further messages from this peer are not logged)")
        if offender not in self.offences and len(self.offences) >= MAX_TRACKED:
            self.offences.pop(next(iter(self.offences)))
        count = self.offences[offender] = self.offences.get(offender, 0) + 1
        if count < MAX_OFFENCES:
            return
        del self.offences[offender]
        if len(self.evicted) >= MAX_TRACKED:
            self.evicted.pop(next(iter(self.evicted)))
        self.evicted[offender] = time.monotonic() + EVICTION_SECONDS
        member = self._member_of(sender)
        if self.transport.key is None or sender.on_link:
            who = repr(sender.origin)
        else:
            who = f"member {member}" if member else f"{sender.origin!r} (not an admitted member)"
        log.warning("evicted %s at %s for %.0f s after %d bad messages, the last: %s; its "
                    "messages are dropped unread", who, sender.peer_address or "an unknown "
                    "address", EVICTION_SECONDS, count, reason)
        if member:
            self.offenders[member] = (f"it sent {count} bad messages (the last: {reason}) and "
                                      f"was evicted")

    def _member_of(self, sender: Incoming | Message) -> str | None:
        """The admitted node that sent this, if it is one (on an insecure ring, whoever it
        claims to be: the node suspects it only if that is a member)."""
        if sender.on_link:
            return None  # a link's messages come from whoever we dialled: not a member's key
        if sender.local:
            return sender.origin  # a door only takes datagrams from verified peers' doors
        if self.transport.key is not None:
            return sender.origin if self.admitted.get(sender.origin) == sender.user else None
        return sender.origin or None

    def _log_once(self, offender: str, text: str) -> None:
        if offender in self._logged:
            return
        if len(self._logged) >= MAX_TRACKED:
            if not self._logged_overflow:
                self._logged_overflow = True
                log.warning("more than %d peers sent bad messages: no more of them are logged",
                            MAX_TRACKED)
            return
        self._logged.add(offender)
        log.warning("%s", text)

    def next_data(self, generation: int, sequence: int) -> Message | None:
        """The oldest data message of one collective, if one has arrived."""
        queue = self._data.get((generation, sequence))
        if not queue:
            return None
        message = queue.popleft()
        self._stash_bytes -= _stash_cost(message.header)
        return message

    def has_data(self, generation: int, sequence: int) -> bool:
        """Whether data of this collective waits to be taken."""
        return bool(self._data.get((generation, sequence)))

    def retire(self, generation: int, sequence: int) -> None:
        """Forget data of every collective up to and including this one; later data for them
        is dropped as stale."""
        self.floor = max(self.floor, (generation, sequence + 1))
        for key in [k for k in self._data if k < self.floor]:
            for message in self._data.pop(key):
                self._stash_bytes -= _stash_cost(message.header)
        for key in [k for k in self.aborts if k[0] < generation]:
            del self.aborts[key]


def _stash_cost(header: Header) -> int:
    """Bytes a stashed message counts for against ``max_stash_bytes``."""
    return header.nbytes + STASH_MESSAGE_BYTES
