"""How the engine runs a collective: as the next numbered collective of a view, and when it
fails, with the suspect named to membership and the collective aborted on every member."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..comm.mailbox import Mailbox
from ..errors import CollectiveError, MismatchError, PeerFailedError, RingtrainError
from ..membership.links import Links
from ..membership.peers import PeerState
from ..membership.protocol import View
from ..ring.runner import RingRunner
from .ring_order import RingOrder
from .work import Work


class Executor:
    """Runs collectives on the engine thread and numbers them within their view
    (``sequence``, which heartbeats report so that a laggard can be found)."""

    def __init__(self, node_id: str, runner: RingRunner, mailbox: Mailbox, membership: Links,
                 ring_order: RingOrder):
        self.node_id = node_id
        self.runner = runner
        self.mailbox = mailbox
        self.membership = membership
        self.ring_order = ring_order
        self.sequence = 0  # the number of the next collective of the installed view
        self.ran_in = 0  # the generation of the last collective the engine ran
        # a view of another lineage installed under a running ring (two rings of the job
        # merged): no collective of it runs until the caller re-forms (and syncs state)
        self.merged_into: int | None = None

    def execute(self, work: Work, view: View) -> None:
        """Run a queued collective in ``view`` and finish its handle with the outcome."""
        if work.generation is not None and work.generation != view.generation:
            # started before the ring re-formed (say, a gradient bucket queued while backward
            # ran on): run in the new generation it would meet another collective there
            work._finish(error=PeerFailedError(
                f"the ring re-formed (generation {work.generation} -> {view.generation}) "
                f"before this collective ran; re-form and redo it", generation=view.generation))
            return

        def run(sequence: int, deadline: float) -> Any:
            collective = work.build(view.rank, view.world_size)
            compressed = collective.compressed
            residual = None if compressed is None else compressed.residual
            # the error-feedback residual changes as segments are encoded: a failed
            # collective puts back what it held, so a retry counts nothing twice
            saved = None if residual is None else residual.copy()
            try:
                if self.ring_order.slow_links is not None:
                    collective.compress_slow_links(self.ring_order.slow_links, view.rank)
                return self.runner.run(collective, view, sequence, deadline, work.step)
            except BaseException:
                if residual is not None and saved is not None:
                    residual[...] = saved
                raise

        try:
            result = self.collect(view, work.timeout, run)
        except RingtrainError as exc:
            work._finish(error=exc)
        else:
            work._finish(result)

    def collect(self, view: View, timeout: float, run: Callable[[int, float], Any]) -> Any:
        """``run(sequence, deadline)`` as the next collective of ``view``; when it fails,
        suspect whom it blames and abort it on every member."""
        if self.merged_into == view.generation:
            # The DECIDE of the ring ours joined arrived between two of our collectives: the
            # winning ring's members re-formed at a step boundary and sync state now, while
            # our caller would run its next collective (a gradient) in their view: they
            # mismatched, and every node exited. Fail it here, before it takes a sequence
            # number or aborts anything, so that the caller re-forms (taking this view as it
            # is) and syncs like the others.
            raise PeerFailedError(f"two rings of this job merged into generation "
                                  f"{view.generation}: re-form and sync state first",
                                  generation=view.generation, collective=self.sequence)
        protocol = self.membership.protocol
        sequence = self.sequence
        self.sequence += 1
        self.ran_in = view.generation
        protocol.sequence = sequence
        try:
            if self.ring_order.error is not None:
                raise self._no_ring(view, sequence)
            return run(sequence, time.monotonic() + timeout)
        except CollectiveError as exc:
            suspect = exc.peer if isinstance(exc, PeerFailedError) else None
            # Look for the stall's cause (``culprit``: a silent member, else a laggard) only
            # when this node itself blamed a peer nobody suspected yet (a stall: then every
            # healthy member's heartbeats report the stalled collective). Not when the
            # collective was abandoned because the ring is re-forming (no peer), nor for a
            # member already suspected, nor when another member aborted it naming whom it
            # blames: heartbeat sequences are then up to a heartbeat old, and the "laggard"
            # is just the member heard from last, healthy. Blaming it evicted healthy nodes
            # when a joiner was admitted or a node left.
            aborted = (view.generation, sequence) in self.mailbox.aborts
            if isinstance(exc, PeerFailedError) and suspect is not None and not aborted \
                    and suspect not in protocol.suspects:
                suspect = culprit(view, self.node_id, suspect, protocol.peers.get,
                                  sequence, time.monotonic(),
                                  SILENT_BEATS * protocol.config.heartbeat_interval)
            if suspect is not None:
                named = isinstance(exc, PeerFailedError) and suspect == exc.peer
                why = str(exc) if named else \
                    f"{exc}; the stall's cause is {suspect} (silent or behind the longest)"
                protocol.suspect(suspect, why)
                self.runner.recorder.suspected(suspect, why)  # observe
            self.runner.abort_everyone(view, sequence, exc, suspect)
            raise

    def _no_ring(self, view: View, sequence: int) -> CollectiveError:
        """Why a collective of ``view`` cannot run: measuring its links failed. Members that
        probe differently is a setting to fix (MismatchError); anything else is a failed
        peer, and re-forming the ring measures again."""
        error = self.ring_order.error
        where = {"generation": view.generation, "collective": sequence}
        text = f"generation {view.generation} has no agreed ring order: {error}"
        if isinstance(error, MismatchError):
            return MismatchError(text, **where)
        peer = error.peer if isinstance(error, PeerFailedError) else None
        return PeerFailedError(f"{text}; re-form the ring", peer=peer, **where)


SILENT_BEATS = 3  # heartbeats missed before a member counts as silent when a collective stalls


def culprit(view: View, me: str, blamed: str, peer: Callable[[str], PeerState | None],
            sequence: int, now: float, quiet: float) -> str:
    """Whom to suspect when collective ``sequence`` of ``view`` stalled here and this node
    blames ``blamed`` (the member it waits for, or cannot send to).

    Every member but a failed one goes on sending heartbeats while it waits, so a stall's
    cause is, in order: the member silent the longest, once silent for more than ``quiet``
    seconds (a dead or stopped process: its neighbour was blamed, alive and waiting in turn,
    when the victim's last heartbeat came after the last data and the progress deadline
    passed before its silence was long enough to suspect it: a healthy node was left out);
    else the member furthest behind in collectives, if behind this one (a live process that
    stopped calling collectives holds the ring up); else ``blamed``. It only chooses whom a
    stall removes; it never makes one.
    """
    silences = [(now - state.last_heard, member) for member in view.members
                if member != me and (state := peer(member)) is not None]
    if silences:
        silence, member = max(silences)
        if silence > quiet:
            return member
    behind = [(state.sequence, member) for member in view.members
              if member != me and (state := peer(member)) is not None
              and state.generation == view.generation and state.sequence < sequence]
    return min(behind)[1] if behind else blamed
