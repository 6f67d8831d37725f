"""One ring collective moving round the ring: its plan executed segment by segment.

:class:`PlanRun` holds what one collective's execution needs between two steps of its loop
(what is still to send, what has arrived, the deadlines) and drives the loop: send what the
successor takes, take in what arrived, check that nobody gave up, wait. Segment I/O (a send
by door, lane or ZeroMQ; a segment checked and taken into the buffer) is the runner's
(:class:`~ringtrain.ring.runner.RingRunner`), which makes one run per collective.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

from ..comm.shm import LANE_POLL
from ..comm.wire import HEADER_SIZE
from ..errors import CollectiveTimeout, PeerFailedError, TransportError
from ..membership.protocol import View
from . import plan as ring
from . import segments
from .collectives import Collective

if TYPE_CHECKING:
    from .runner import RingRunner

TRACK_BYTES = 64 * 1024  # smaller segments are copied by pyzmq anyway; larger ones are tracked


class PlanRun:
    """The execution of one collective's ring plan (:attr:`Collective.plan`).

    Args:
        runner: the node's runner, whose sends, mailbox and deadlines this uses.
        collective: what to run.
        view: the ring it runs on.
        sequence: its collective number within the generation.
        deadline: ``time.monotonic()`` by which it must be done.
        step: the training step stamped on its messages.
    """

    def __init__(self, runner: RingRunner, collective: Collective, view: View, sequence: int,
                 deadline: float, step: int):
        self.runner = runner
        self.collective, self.view, self.sequence = collective, view, sequence
        self.deadline, self.step = deadline, step
        plan, lanes = collective.plan, runner.lanes
        self.successor = view.members[ring.successor(view.rank, view.world_size)]
        self.predecessor_rank = ring.predecessor(view.rank, view.world_size)
        self.predecessor = view.members[self.predecessor_rank]
        self.where = f"{collective.name} #{sequence} of generation {view.generation}"
        # what to send next, with the payload to forward unchanged (compressed all-gather)
        self.pending: deque[tuple[ring.Transfer, Any]] = deque(
            (t, None) for t in plan.first_sends)
        self.trackers: list[Any] = []  # of large segments sent zero-copy
        self.described = False  # whether the descriptor frame went out
        self.received = 0
        self.last_progress = time.monotonic()
        self.longest_gap = 0.0
        self.progress_deadline = self.last_progress + runner.progress_timeout
        # a successor on this host reads our segments from shared memory (see shm.py)
        self.lane = lanes.outbound(self.successor, view.generation) if (
            collective.compressed is None and lanes is not None
            and lanes.reaches(self.successor)) else None
        # segments arrive in plan order only if all take one path: the door (lane references,
        # or every message fits a datagram) or all ZeroMQ
        self.spin = (runner.transport.settings.spin_seconds if runner.local(self.predecessor)
                     else 0.0)
        largest = max((r.transfer.stop - r.transfer.start for r in plan.receives), default=0)
        self.door = self.lane is not None or (lanes is not None and lanes.door_takes(
            self.successor, HEADER_SIZE + largest * collective.buffer.itemsize
            + len(collective.descriptor_frame)))

    def move_segments(self) -> float:
        """Send and receive every segment of the plan.

        Returns:
            the longest gap between two segments, seconds (the runner learns its progress
            deadline from it).

        Raises:
            PeerFailedError: a member stopped sending or receiving, or sent garbage.
            CollectiveTimeout: the deadline passed.
        """
        runner, view, sequence = self.runner, self.view, self.sequence
        expected = len(self.collective.plan.receives)
        while self.received < expected or self.pending:
            lane_full = self._send_pending()  # 1. as much as the successor takes
            self._take_in()  # 2. every segment that has arrived
            if self.received == expected and not self.pending:
                break
            runner.check_abandoned(view, sequence, self.where)
            if self.received < expected and runner.mailbox.has_data(view.generation,
                                                                      sequence):
                continue  # membership work took in our data: use it before waiting
            # 3. wait for traffic, bounded by both deadlines
            now = time.monotonic()
            self._check_deadlines(now)
            if self.spin and not self.pending and now < self.last_progress + self.spin:
                runner.yield_and_look()  # the predecessor is on this host: its data is due now
                continue
            self._wait(now, lane_full)
        return self.longest_gap

    def wait_until_sent(self) -> None:
        """Return once libzmq let go of the buffer (the caller may change it then).

        Raises:
            PeerFailedError: the successor never took the last segments.
        """
        for tracker in self.trackers:
            remaining = self.deadline - time.monotonic()
            try:
                tracker.wait(max(remaining, 0.001))
            except Exception as exc:  # zmq.NotDone: the successor never took the data
                raise PeerFailedError(f"{self.where}: successor {self.successor} did not take "
                                      f"the last segments", peer=self.successor,
                                      generation=self.view.generation,
                                      collective=self.sequence) from exc

    def _progressed(self) -> None:
        """A segment moved: the progress deadline starts again."""
        now = time.monotonic()
        self.longest_gap = max(self.longest_gap, now - self.last_progress)
        self.last_progress, self.progress_deadline = now, now + self.runner.progress_timeout

    def _send_pending(self) -> bool:
        """Send as much as the successor's queue (or lane) takes. Returns whether a lane or
        door to it is full (it frees up with no message to wake us)."""
        runner, collective, view = self.runner, self.collective, self.view
        buffer, lane, successor = collective.buffer, self.lane, self.successor
        while self.pending:
            transfer, forward = self.pending[0]
            header = segments.data_header(collective, view, runner.job, self.sequence,
                                          self.step, transfer, not self.described,
                                          shared=lane is not None)
            if lane is not None:
                payload = lane.write(buffer[transfer.start:transfer.stop])
                if payload is None:
                    return True
                big = False
            elif collective.compressed is None:
                payload = buffer[transfer.start:transfer.stop]
                big = header.nbytes >= TRACK_BYTES
            else:
                # a fresh array or a received frame, never our buffer: no need to track
                payload = forward if forward is not None else \
                    segments.encode(collective, transfer)
                big = False
            frames = [header.pack(), payload]
            if not self.described:
                frames.append(collective.descriptor_frame)
            try:
                sent = runner.send(successor, frames, big, self.door)
            except TransportError as exc:
                raise PeerFailedError(f"{self.where}: cannot send to successor {successor}: "
                                      f"{exc}", peer=successor, generation=view.generation,
                                      collective=self.sequence) from exc
            if sent is False:
                return self.door and runner.local(successor)
            if lane is not None:
                lane.commit()
            if big:
                self.trackers.append(sent)
            self.described = True
            self.pending.popleft()
            runner.messages_sent += 1
            runner.bytes_out[successor] = runner.bytes_out.get(successor, 0) + header.nbytes
            self._progressed()
        return False

    def _take_in(self) -> None:
        """Take in every segment that has arrived, queueing what it makes us send next."""
        receives = self.collective.plan.receives
        while self.received < len(receives):
            message = self.runner.mailbox.next_data(self.view.generation, self.sequence)
            if message is None:
                return
            expected = receives[self.received]
            forward = self.runner.take_segment(self.collective, self.view, self.sequence,
                                               message, expected, self.predecessor,
                                               self.predecessor_rank)
            self.received += 1
            if expected.then is not None:
                self.pending.append((expected.then, forward))
            self._progressed()

    def _check_deadlines(self, now: float) -> None:
        """Raise if the collective's deadline or the progress deadline passed."""
        expected = len(self.collective.plan.receives)
        if now >= self.deadline:
            raise CollectiveTimeout(f"{self.where} missed its deadline "
                                    f"({self.received}/{expected} segments received, "
                                    f"{len(self.pending)} waiting to be sent)",
                                    generation=self.view.generation, collective=self.sequence)
        if now >= self.progress_deadline:
            if self.pending:
                # we had data for the successor all along and it took none: it is stuck,
                # whatever our predecessor did (which may only be waiting on us)
                culprit, what = self.successor, "stopped accepting data"
            else:
                culprit, what = self.predecessor, "sent nothing"
            raise PeerFailedError(f"{self.where}: {culprit} {what} for "
                                  f"{self.runner.progress_timeout:.1f} s "
                                  f"({self.received}/{expected} segments received)",
                                  peer=culprit, generation=self.view.generation,
                                  collective=self.sequence)

    def _wait(self, now: float, lane_full: bool) -> None:
        """Wait for traffic (and say what for, for hang diagnostics), at most until the
        next deadline."""
        runner, expected = self.runner, len(self.collective.plan.receives)
        runner.stage = (f"{self.where}: {self.received}/{expected} segments received from "
                        f"{self.predecessor}, {len(self.pending)} waiting for "
                        f"{self.successor}")
        runner.waiting = {"from": self.predecessor if self.received < expected else None,
                          "to": self.successor if self.pending else None,
                          "received": self.received, "expected": expected,
                          "unsent": len(self.pending)}
        # a full lane frees up without a message telling us: look again soon
        poll = LANE_POLL if lane_full else runner.poll_interval
        runner.mailbox.pump(min(self.deadline, self.progress_deadline, now + poll) - now,
                            writable=self.successor if self.pending and not lane_full else None,
                            links=runner.links_due(now))
