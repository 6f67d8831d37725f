"""Sorting what arrives: validated data for collectives, aborts, and control for membership.

Every message is decoded and checked here before anything else sees it. A message that breaks
the wire format is dropped, counted, and logged once per peer; it never reaches a collective.
On a keyed ring, a message that arrives on our listening socket is accepted only from a CURVE
key that membership has admitted for the node id it claims, HELLOs (which prove the key)
excepted: nobody can speak for another node.
Data that arrives before the collective it belongs to has started (a fast predecessor) is kept,
up to a byte budget, until that collective asks for it.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field

from .errors import ProtocolError
from .transport import Incoming, Transport
from .wire import FLAG_DESCRIPTOR, Header, MessageKind, check_frames, decode_header

log = logging.getLogger(__name__)


@dataclass
class Message:
    """A validated message: its header, its sender and its frames (payload at ``frames[1]``)."""

    header: Header
    origin: str
    frames: list = field(repr=False)
    on_link: bool = False
    peer_address: str = ""
    user: str = ""  # the sender's proven CURVE public key on a keyed ring

    @property
    def payload(self) -> memoryview:
        """The payload frame's bytes, without a copy."""
        return self.frames[1].buffer

    @property
    def descriptor(self) -> bytes | None:
        """The sender's collective descriptor, when it sent one."""
        return bytes(self.frames[2].buffer) if self.header.flags & FLAG_DESCRIPTOR else None


class Mailbox:
    """Receives from a transport and sorts messages by kind.

    Args:
        transport: where messages come from.
        job: the 64-bit job id; messages of other jobs are dropped.
        max_stash_bytes: cap on data kept for collectives that have not started yet.
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
        self._logged: set[tuple[str, str]] = set()
        self.admitted: dict[str, str] = {}  # node id -> the CURVE key it proved (keyed rings)
        self.floor: tuple[int, int] = (0, 0)  # (generation, sequence) below which data is stale

    def pump(self, timeout: float, writable: str | None = None) -> bool:
        """Wait up to ``timeout`` for traffic, then sort everything that has arrived.

        Returns:
            whether a send on link ``writable`` would not block now.
        """
        readable, can_send = self.transport.wait(timeout, writable)
        if readable:
            self.drain()
        return can_send

    def drain(self) -> None:
        """Sort every message waiting in the transport, without blocking."""
        while (incoming := self.transport.receive()) is not None:
            self._sort(incoming)

    def _sort(self, incoming: Incoming) -> None:
        try:
            if not incoming.frames:
                raise ProtocolError("frame count", "at least 2", 0, incoming.origin)
            header = decode_header(incoming.frames[0].buffer,
                                   max_payload=self.transport.settings.segment_bytes,
                                   peer=incoming.origin)
            check_frames(header, incoming.frames, incoming.origin)
        except ProtocolError as exc:
            self._drop(incoming.origin, exc.field, str(exc))
            return
        if (self.transport.key is not None and not incoming.on_link
                and header.kind is not MessageKind.HELLO
                and self.admitted.get(incoming.origin) != incoming.user):
            self._drop(incoming.origin, "unauthenticated",
                       f"message from {incoming.origin!r} at {incoming.peer_address} whose key "
                       f"was not admitted, dropped")
            return
        if header.job != self.job:
            self._drop(incoming.origin, "job", f"message from {incoming.origin} of another job "
                                               f"({header.job:#x}), dropped")
            return
        message = Message(header, incoming.origin, incoming.frames, incoming.on_link,
                          incoming.peer_address, incoming.user)
        if header.kind is MessageKind.DATA:
            key = (header.generation, header.sequence)
            if key < self.floor:
                self.dropped["stale"] += 1
                return
            if self._stash_bytes + header.nbytes > self.max_stash_bytes:
                self._drop(incoming.origin, "stash", f"data from {incoming.origin} for "
                           f"collective {key} exceeds the stash budget, dropped")
                return
            self._stash_bytes += header.nbytes
            self._data[key].append(message)
        elif header.kind is MessageKind.ABORT:
            self.aborts.setdefault((header.generation, header.sequence), message)
        else:
            self.control.append(message)

    def _drop(self, origin: str, reason: str, text: str) -> None:
        self.dropped[reason] += 1
        if (origin, reason) not in self._logged:
            self._logged.add((origin, reason))
            log.warning("%s (further such messages from this peer are dropped silently)", text)

    def next_data(self, generation: int, sequence: int) -> Message | None:
        """The oldest data message of one collective, if one has arrived."""
        queue = self._data.get((generation, sequence))
        if not queue:
            return None
        message = queue.popleft()
        self._stash_bytes -= message.header.nbytes
        return message

    def retire(self, generation: int, sequence: int) -> None:
        """Forget data of every collective up to and including this one; later data for them
        is dropped as stale."""
        self.floor = max(self.floor, (generation, sequence + 1))
        for key in [k for k in self._data if k < self.floor]:
            for message in self._data.pop(key):
                self._stash_bytes -= message.header.nbytes
        for key in [k for k in self.aborts if k[0] < generation]:
            del self.aborts[key]
