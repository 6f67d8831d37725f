"""The runner that moves a collective's segments around the ring over the node's transport.

For every segment that arrives from the predecessor the runner checks it
(:mod:`~ringtrain.ring.segments`), reduces or copies the payload into the buffer with a numpy
ufunc (``out=``, in place, no per-element Python) and forwards the same region to the
successor. The runner holds what lasts from collective to collective (counters, codecs, the
adaptive progress deadline, membership turns) and the segment I/O; the plan of one collective
is executed by a :class:`~ringtrain.ring.plan_run.PlanRun`. Small all-reduces take one round
instead (:mod:`~ringtrain.ring.one_round`), and link probes measure a ring's links
(:mod:`~ringtrain.ring.link_probe`); both use the runner's sends and waits.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..comm.mailbox import Mailbox, Message
from ..comm.shm import SharedMemoryLanes
from ..comm.transport import Transport
from ..comm.wire import FLAG_SHM
from ..errors import (
    CollectiveError,
    PeerFailedError,
    ProtocolError,
    TransportError,
)
from ..membership.protocol import View
from ..observe.recorder import FlightRecorder
from . import one_round, segments
from . import plan as ring
from .collectives import Collective
from .compression import Codec, get_codec
from .plan_run import PlanRun

PROGRESS_FACTOR = 8.0  # progress deadline = this x the smoothed longest gap between segments
# seconds between membership turns while collectives flow: a turn (drain, tick, flush) costs
# ~0.25 ms of Python; every 5 ms it took a fifth of a 37 KB all-reduce's CPU on a 0.45-core
# device, and heartbeats (every 0.25 s) and suspicion (2 s) need nothing finer than this
SERVICE_INTERVAL = 0.02


class RingRunner:
    """Runs collectives of one node over its transport. Not thread-safe: one caller thread.

    The progress deadline (how long the runner waits for the next segment before blaming a
    member) adapts: it is ``PROGRESS_FACTOR`` times the smoothed longest wait between segments
    of recent collectives, kept between ``progress_floor`` and ``progress_cap``.

    Args:
        transport: the node's sockets; links are named by peer node id.
        mailbox: where validated messages wait.
        node_id: this node's id.
        job: the 64-bit job id stamped on every message.
        progress_floor, progress_cap: bounds of the adaptive progress deadline, seconds.
        service: the node's membership work, called from the wait loop at most every
            ``SERVICE_INTERVAL`` seconds; returns None, or (why, suspect) to abort the
            collective because a member failed.
        poll_interval: longest single wait, so ``service`` runs at least about this often.
        lanes: shared-memory lanes to successors on this host, or None (TCP only).
    """

    def __init__(self, transport: Transport, mailbox: Mailbox, node_id: str, job: int,
                 progress_floor: float, progress_cap: float,
                 service: Callable[[View], tuple[str, str | None] | None],
                 poll_interval: float, lanes: SharedMemoryLanes | None = None):
        self.transport = transport
        self.mailbox = mailbox
        self.node_id = node_id
        self.job = job
        self.progress_floor = progress_floor
        self.progress_cap = progress_cap
        self.service = service
        self.poll_interval = poll_interval
        self.lanes = lanes
        self.progress_timeout = progress_cap
        self._slowest_wait = 0.0  # smoothed longest gap between segments, seconds
        self.messages_sent = 0
        self.stage = "idle"  # for hang diagnostics: what the runner is waiting for
        # observe: counters and the flight recorder (ringtrain.observe.recorder)
        self.messages_received = 0
        self.bytes_out: dict[str, int] = {}  # payload bytes sent to each peer
        self.bytes_in: dict[str, int] = {}  # payload bytes received from each peer
        self.waiting: dict[str, Any] = {}  # structured self.stage: from / to whom, counts
        self.recorder = FlightRecorder(node_id)
        self._codecs: dict[str, Codec] = {}
        # peer -> time.monotonic() of its last accepted segment: a sign of life. A busy link's
        # send queue is full of segments, so heartbeats on it are dropped; the data is not.
        self.heard: dict[str, float] = {}
        self._service_due = 0.0  # time.monotonic() of the next membership turn

    def codec(self, compression: str | Codec | None) -> Codec | None:
        """The codec for a ``compression`` argument: a name gives this node's one codec of
        that name, so its error-feedback state lasts from call to call; a :class:`Codec`
        is used as it is."""
        if compression is None or isinstance(compression, Codec):
            return compression
        if compression not in self._codecs:
            codec = get_codec(compression)
            if codec is None:
                return None
            self._codecs[compression] = codec
        return self._codecs[compression]

    def segment_elements(self, dtype: np.dtype) -> int:
        """How many elements of ``dtype`` fit in one segment."""
        return max(1, self.transport.settings.segment_bytes // np.dtype(dtype).itemsize)

    def run(self, collective: Collective, view: View, sequence: int, deadline: float,
            step: int = 0) -> Any:
        """Execute ``collective`` as collective number ``sequence`` of ``view``.

        Raises:
            MismatchError: members called different collectives, shapes or dtypes.
            PeerFailedError: a member stopped sending or receiving, or sent garbage.
            CollectiveTimeout: ``deadline`` passed.
        """
        record = self.recorder.collective_started(
            collective.name, collective.digest, collective.buffer.nbytes, view.generation,
            sequence, step, view.rank, view.members, self._counters)
        if view.world_size == 1:
            self.recorder.collective_finished(record)
            return collective.finish(collective.buffer)
        try:
            if collective.direct:
                one_round.exchange(self, collective, view, sequence, deadline, step)
            else:
                self._move(collective, view, sequence, deadline, step)
        except BaseException as exc:
            self.recorder.collective_finished(record, exc)
            if self.lanes is not None:  # its slots may hold segments nobody will release
                self.lanes.reset(view.members[ring.successor(view.rank, view.world_size)])
            raise
        finally:
            self.stage = "idle"
            self.waiting = {}
            self.mailbox.retire(view.generation, sequence)
        self.recorder.collective_finished(record)
        return collective.finish(collective.buffer)

    @property
    def bytes_sent(self) -> int:
        """Payload bytes this runner has sent in collectives, to all peers."""
        return sum(self.bytes_out.values())

    def _counters(self) -> tuple[int, int, dict[str, int], dict[str, int], dict[str, Any]]:
        """What the flight recorder reads when a collective starts, ends, or is looked at."""
        return (self.messages_sent, self.messages_received, self.bytes_out, self.bytes_in,
                self.waiting)

    def _move(self, collective: Collective, view: View, sequence: int, deadline: float,
              step: int) -> None:
        run = PlanRun(self, collective, view, sequence, deadline, step)
        self._learn_gap(run.move_segments())
        run.wait_until_sent()  # the caller may change the buffer once we return

    def take_turn(self) -> bool:
        """Whether a membership turn is due (they come at most every ``SERVICE_INTERVAL``
        while collectives flow, in the runner's waits and between collectives alike); if
        so, the next one is due that much later."""
        now = time.monotonic()
        if now < self._service_due:
            return False
        self._service_due = now + SERVICE_INTERVAL
        return True

    def yield_and_look(self) -> None:
        """Wait for data due within microseconds without sleeping: give the core to whoever
        is runnable (the sender, typically), then take in what arrived
        (``Settings.spin_seconds``: a sleep and its wake-up cost more)."""
        os.sched_yield()
        self.mailbox.pump(0.0, links=False)

    def links_due(self, now: float) -> bool:
        """Whether a wait should also watch the outgoing links: their traffic (replies to
        membership) is only handled at a membership turn, so until one is due a wait
        watches only where data comes in, which costs fewer system calls."""
        return now >= self._service_due

    def local(self, peer: str) -> bool:
        """Whether ``peer`` is on this host (its door and lanes free up with no message
        to wake us: a blocked send there is retried every ``LANE_POLL``)."""
        return self.lanes is not None and self.lanes.reaches(peer)

    def send(self, peer: str, frames: list, track: bool = False, door: bool = True) -> Any:
        """Send a DATA message: through ``peer``'s door when ``door`` allows it, the peer is
        on this host and the message fits a datagram, else over ZeroMQ (see
        ``Transport.try_send``). A door and a ZeroMQ link do not keep order between them:
        messages that must arrive in order go all through one (``door=False`` for a
        stream whose larger messages take ZeroMQ)."""
        lanes = self.lanes
        if door and lanes is not None and lanes.reaches(peer) and lanes.door_takes(
                peer, sum(memoryview(f).nbytes for f in frames)):
            return lanes.send(peer, frames)
        return self.transport.try_send(peer, frames, track=track)

    def _learn_gap(self, gap: float) -> None:
        """Adapt the progress deadline to the gaps this ring really has."""
        smoothed = 0.8 * self._slowest_wait + 0.2 * gap
        self._slowest_wait = gap if self._slowest_wait == 0 else smoothed
        self.progress_timeout = min(self.progress_cap,
                                    max(self.progress_floor, PROGRESS_FACTOR * self._slowest_wait))

    def take_segment(self, collective: Collective, view: View, sequence: int, message: Message,
                     expected: ring.Receive, predecessor: str, predecessor_rank: int) -> Any:
        """Check a segment and take it into the buffer. Returns the payload to forward
        unchanged, when the segment is compressed and only copied (all-gather), else None."""
        self.check_digest(collective, view, sequence, message)
        segments.check_from_predecessor(collective, view, sequence, message, expected,
                                        predecessor, predecessor_rank)
        transfer, where = expected.transfer, segments.where(collective, view, sequence)
        if message.header.flags & FLAG_SHM:
            try:
                if collective.compressed is not None or self.lanes is None:
                    raise ProtocolError("flags", "no shared-memory reference here",
                                        "FLAG_SHM", predecessor)
                shared, release = self.lanes.receive(predecessor, message.payload,
                                                     message.header.nbytes)
            except ProtocolError as exc:
                raise PeerFailedError(f"{where}: {predecessor} sent a bad shared-memory "
                                      f"reference: {exc}", peer=predecessor,
                                      generation=view.generation, collective=sequence) from exc
            segments.take_parts(collective, expected, [shared])
            release()
            return None
        if collective.compressed is not None:
            try:
                return segments.decode(collective, expected, message.payload)
            except ProtocolError as exc:
                raise PeerFailedError(f"{where}: {predecessor} sent a bad compressed segment "
                                      f"(hop {transfer.hop}, chunk {transfer.chunk}, segment "
                                      f"{transfer.segment}): {exc}", peer=predecessor,
                                      generation=view.generation, collective=sequence) from exc
        segments.take_parts(collective, expected, message.payload_parts)
        return None

    def check_abandoned(self, view: View, sequence: int, where: str) -> None:
        """Raise if a member aborted this collective, or the ring is changing under it."""
        abort = self.mailbox.aborts.get((view.generation, sequence))
        if abort is not None:
            raise segments.error_from_abort(abort, where, view.generation, sequence)
        if not self.take_turn():
            return  # membership work between every two segments would cost more than it saves
        failure = self.service(view)
        if failure is not None:
            why, suspect = failure
            raise PeerFailedError(f"{where} abandoned: {why}", peer=suspect,
                                  generation=view.generation, collective=sequence)

    def check_digest(self, collective: Collective, view: View, sequence: int,
                     message: Message) -> None:
        """Raise MismatchError, naming both calls, if a member's segment belongs to another
        collective. Checked before anything else in a message is trusted or used; a member's
        segment is also a sign of life (``heard``)."""
        if message.origin not in view.members:
            return  # not a member: the caller rejects it
        self.heard[message.origin] = time.monotonic()
        self.messages_received += 1
        self.bytes_in[message.origin] = self.bytes_in.get(message.origin, 0) + \
            message.header.nbytes
        if message.header.digest != collective.digest:
            raise segments.mismatch(collective, view, sequence, self.node_id, message)

    def abort_everyone(self, view: View, sequence: int, exc: CollectiveError,
                       suspect: str | None) -> None:
        """Tell every member that this collective failed here (and whom we blame), so
        nobody waits for it."""
        if (view.generation, sequence) in self.mailbox.aborts:
            return  # somebody else's abort: they have told everyone already
        frames = segments.abort_frames(view, self.job, self.node_id, sequence, exc, suspect)
        for member in view.members:
            if member == self.node_id:
                continue
            try:
                self.transport.try_send(member, frames)
            except TransportError:
                pass  # best effort: that member will time out instead
