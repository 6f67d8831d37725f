"""A node's engine thread (:class:`Engine`), the one thread that touches its sockets.

The caller's thread queues collectives (and calls such as a re-form) with :meth:`Engine.submit`;
the engine runs them in order and, between them and between the segments of one
(``RingRunner``'s service callback), serves membership: new candidates, control messages,
heartbeats. It installs the views membership agrees on, orders their ring
(:class:`~ringtrain.node.ring_order.RingOrder`) and announces them to the listeners.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from ..comm.mailbox import Mailbox
from ..config import Settings
from ..errors import MembershipError, ProtocolError, RingtrainError
from ..membership.links import Links
from ..membership.protocol import View
from ..ring.runner import RingRunner
from .executor import Executor
from .gate import Gate, is_ledger
from .parts import Parts
from .peer_sources import PeerSources
from .ring_order import RingOrder
from .work import Work
from .wrong_key import WrongKeyDetector

log = logging.getLogger(__name__)

SNAPSHOT_INTERVAL = 0.5  # seconds between the engine's snapshots of state()
KEY_CHECK_INTERVAL = 0.5  # seconds between looks for evidence of a wrong key while forming


class Engine:
    """The thread that drives a node's parts: collectives, membership, views."""

    def __init__(self, settings: Settings, job: str, parts: Parts,
                 wrong_key: WrongKeyDetector | None, peer_sources: PeerSources):
        self.settings, self.job, self.node_id = settings, job, parts.node_id
        self.transport, self.mailbox, self.lanes = parts.transport, parts.mailbox, parts.lanes
        self.membership, self.gate, self.device = parts.membership, parts.gate, parts.device
        self.runner = RingRunner(self.transport, self.mailbox, self.node_id, parts.job_id,
                                 settings.progress_floor, settings.progress_timeout,
                                 self._service, settings.heartbeat_interval, self.lanes)
        self.ring_order = RingOrder(self.node_id, settings, self.runner)
        self.executor = Executor(self.node_id, self.runner, self.mailbox, self.membership,
                                 self.ring_order)
        self.peer_sources = peer_sources
        self.wrong_key = wrong_key
        self._last_key_check = 0.0
        self.key_error: RingtrainError | None = parts.revoked  # why forming cannot succeed
        self.view: View | None = None  # the view collectives run in: members in ring order
        self.installed: View | None = None  # the view membership agreed (sorted members)
        self.order_due = False  # the links of the installed view are still to be measured
        self.view_listeners: list[Callable[[View], None]] = []
        self.formed = threading.Event()  # set once a view is announced
        self.closing = False
        self.leave_requested = False  # set by any thread, a signal handler too: we leave
        self.fatal: BaseException | None = None
        self._snapshot: dict[str, Any] = {}  # state() as the engine last wrote it
        self._snapshot_at = 0.0
        self._queue: queue.SimpleQueue[Work | Callable[[], None] | None] = queue.SimpleQueue()
        self._new_candidates: queue.SimpleQueue[tuple[list[str], str]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"ringtrain-{self.node_id}",
                                        daemon=True)

    def forming_error(self) -> RingtrainError | None:
        """Why the first ring cannot form, if that is known: a wrong or revoked key, or a
        member refused this node."""
        if self.key_error is not None:
            return self.key_error
        refusal = self.membership.refusal
        return MembershipError(refusal) if refusal else None

    def form_alone(self) -> None:
        """A ring of one, formed at once (before the thread starts)."""
        self.membership.alone()
        self.view = self.installed = self.membership.view
        self.formed.set()

    def start(self) -> None:
        """Start the thread; from now on it alone touches the parts."""
        self._thread.start()

    def submit(self, item: Work | Callable[[], None]) -> None:
        """Run a collective, or a call, on the engine thread after those submitted before."""
        self._queue.put(item)
        self.transport.wake()

    def add_candidates(self, endpoints: list[str], source: str) -> None:
        """Dial these endpoints on the engine's next membership turn (from any thread)."""
        self._new_candidates.put((list(endpoints), source))
        self.transport.wake()

    def stop(self, timeout: float) -> None:
        """Stop the thread once the work queued before is done (waiting at most ``timeout``
        seconds); it fails what is still queued and closes the sockets as it ends."""
        self._queue.put(None)
        self.closing = True
        self.transport.wake()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("node %s engine did not stop within %.1f s", self.node_id, timeout)

    def state(self) -> dict[str, Any]:
        """The last snapshot, with why the engine stopped (if it did) and the runner's stage
        (safe from any thread: the engine replaces the snapshot, never changes it)."""
        snapshot = dict(self._snapshot) or {"node": self.node_id,
                                            "endpoint": self.transport.endpoint,
                                            "job": self.job, "view": None}
        snapshot["fatal"] = None if self.fatal is None else repr(self.fatal)
        snapshot["stage"] = self.runner.stage
        return snapshot

    def _take_snapshot(self) -> None:
        """Write :meth:`state`'s answer (engine thread only)."""
        self._snapshot_at = time.monotonic()
        view, lanes = self.view, self.lanes
        self._snapshot = {
            "node": self.node_id, "endpoint": self.transport.endpoint, "job": self.job,
            "view": None if view is None else {"generation": view.generation,
                                               "members": list(view.members), "rank": view.rank},
            "link_rates_mbit": self.ring_order.link_rates_mbit(self.installed),
            "slow_links": self.ring_order.slow_link_names(view),
            "sequence": self.executor.sequence, "membership": self.membership.state(),
            "dropped": {**self.mailbox.dropped,
                        **({"door": lanes.dropped} if lanes and lanes.dropped else {})},
            "shared_memory_peers": [] if lanes is None else lanes.peers(),
            "candidates": self.membership.candidates.state(),
            "identity": None if self.gate is None else self.gate.state(),
            "connections": self.transport.budget(),
            "peers_dns": self.peer_sources.dns_endpoints()}

    def _run(self) -> None:
        """The thread: queued work in order, membership between; on the way out, fail what
        is still queued and close the sockets, lanes and device."""
        spin_until = 0.0  # the next collective often follows at once: until then, yield
        try:
            while not self.closing:
                if self.order_due:
                    self._order_ring()
                    continue
                if self.view is None:
                    self._serve_membership()
                    self.mailbox.pump(self.settings.heartbeat_interval / 2)
                    continue
                try:
                    work = self._queue.get_nowait()
                except queue.Empty:
                    # between collectives too, a membership turn at most every
                    # SERVICE_INTERVAL, unless control traffic or candidates wait
                    if (self.runner.take_turn() or self.mailbox.control
                            or not self._new_candidates.empty()):
                        self._serve_membership()
                    if time.monotonic() < spin_until:
                        os.sched_yield()  # rather than sleep in poll (Settings.spin_seconds)
                        continue
                    self.mailbox.pump(self.settings.heartbeat_interval / 2)
                    continue
                if work is None:
                    break
                if isinstance(work, Work):
                    self._announce_leaving()
                    self.executor.execute(work, self.view)
                    spin_until = time.monotonic() + self.settings.spin_seconds
                else:
                    work()
        except BaseException as exc:  # noqa: BLE001 - reported to every waiter, then re-raised
            log.exception("node %s engine stopped", self.node_id)
            self.fatal = exc
            self.formed.set()
        finally:
            self._fail_queued(RingtrainError(f"node {self.node_id} closed"))
            if self.fatal is None:
                self.membership.leave(outsiders_only=True)  # tells joiners the ring ends
            self.transport.close(linger=0 if self.fatal else self.settings.linger)
            self.membership.dialler.close()
            if self.lanes is not None:
                self.lanes.close()
            if self.device is not None:
                self.device.close()

    def _serve_membership(self) -> None:
        """Membership work on the engine thread: new candidates, control messages, ticks."""
        self.transport.check_health()
        self._announce_leaving()
        while True:
            try:
                endpoints, source = self._new_candidates.get_nowait()
            except queue.Empty:
                break
            try:
                self.membership.add_candidates(endpoints, source)
            except RingtrainError as exc:  # e.g. out of sockets: the next turn tries again
                log.warning("node %s: cannot dial candidates from %s: %s", self.node_id,
                            source, exc)
        self.mailbox.drain()
        _handle_control(self.node_id, self.mailbox, self.membership, self.gate)
        for peer, reason in self.mailbox.take_offenders().items():
            self.membership.protocol.suspect(peer, reason)  # keeps sending garbage
        self.membership.tick()
        m = self.membership.protocol  # a full ring: joiners it turns away, or keeps out
        self.runner.recorder.ring_full(m.turned_away, m.config.max_size, m.full_ring)
        if self.gate is not None:
            self.gate.tick()
        if self.wrong_key is not None:
            self._check_key(self.wrong_key)
        installed = self.membership.view
        if installed is not None and installed != self.installed:
            self._install(installed)
            self._take_snapshot()
        elif time.monotonic() - self._snapshot_at >= SNAPSHOT_INTERVAL:
            self._take_snapshot()

    def _announce_leaving(self) -> None:
        """Once a leave is requested, tell the peers at once, before any collective that
        follows: the step that announces the leave must not reach them before the heartbeat
        saying it, or the view they agree on after it still names us (data on a same-host
        lane overtakes TCP)."""
        if self.leave_requested and not self.membership.protocol.leaving:
            self.membership.prepare_leave()

    def _check_key(self, wrong_key: WrongKeyDetector) -> None:
        """Read the probes' handshake events (always: see ``Transport.refused_links``) and,
        while forming, weigh the evidence of a wrong job key (see ``wrong_key``)."""
        now = time.monotonic()
        if now - self._last_key_check < KEY_CHECK_INTERVAL:
            return
        self._last_key_check = now
        wrong_key.saw_refusals(self.transport.refused_links(), now)
        wrong_key.saw_doors(self.membership.dialler.news, now)
        if self.view is None:
            # linked: some peer answered us (hearing from peers is not enough: a revoked
            # device still hears the members that dial it)
            linked = bool(self.membership.welcomed)
            self.key_error = self.key_error or wrong_key.verdict(now, linked)

    def _install(self, view: View) -> None:
        """Take the view membership agreed: a new generation, numbered from collective 0."""
        old = self.installed
        if old is not None and old.lineage and view.lineage != old.lineage:
            self.executor.merged_into = view.generation
        self.installed = view
        self.executor.sequence = 0
        self.mailbox.retire(view.generation, -1)
        self.ring_order.forget()
        if self.ring_order.measures(view):
            self.order_due = True  # before any collective of this view: see _order_ring
            return
        self._announce(view)

    def _order_ring(self) -> None:
        """Measure the links of the installed view and announce it in that ring order, as
        the first collectives of the view, so every member does the same."""
        self.order_due = False
        assert self.installed is not None
        self._announce(self.ring_order.order(self.installed, self.executor.collect))

    def _announce(self, view: View) -> None:
        """``view`` is the one collectives run in from now on: release waiters, tell the
        listeners. The snapshot is taken first, so that :meth:`state` shows this view (and
        its measured links) to whoever the announcement wakes."""
        self.view = view
        self._take_snapshot()
        self.formed.set()
        for listener in self.view_listeners:
            try:
                listener(view)
            except Exception:  # noqa: BLE001 - a listener must not stop the engine
                log.exception("view listener failed")

    def _service(self, view: View) -> tuple[str, str | None] | None:
        """Runs between segments of a collective: keep membership alive, and abandon the
        collective if the ring is changing under it."""
        membership = self.membership.protocol
        for peer_id, when in self.runner.heard.items():  # data is a sign of life too
            membership.heard(peer_id, when)
        self._serve_membership()
        suspects = set(membership.suspects) & set(view.members)
        if suspects:
            suspect = sorted(suspects)[0]
            return f"member {suspect} is suspected to have failed", suspect
        if membership.newer_generation_seen() or self.installed is None \
                or self.installed.generation != view.generation:
            return "the ring is re-forming", None
        if membership.reforming:
            # A change that keeps every member (a join, or a leave not yet said) lets this
            # collective finish: members that already proposed had finished it, so all their
            # data is sent. A change that drops a member ends it now.
            # A member that said it leaves takes part in this last step of its: a change
            # that drops only leaving members lets the step finish too.
            pending = membership.pending_members()
            if pending is None or set(view.members) - set(pending) - membership.leaving_peers():
                return "the ring is re-forming", None
        return None

    def reform(self, since: int | None, deadline: float) -> View:
        """Agree on a generation newer than ``since`` (default: the one the last collective
        ran in) by ``deadline``, and return it in ring order (engine thread only)."""
        membership = self.membership.protocol
        if since is None:
            since = self.executor.ran_in

        def formed() -> bool:
            view = self.installed
            return view is not None and view.generation > since and not membership.reforming

        if not formed() and not membership.reforming:
            self._serve_membership()  # first hear what peers said (a leaver's heartbeat)
            if not formed() and not membership.reforming:
                membership.start_reform(time.monotonic())
        while not formed():
            if time.monotonic() >= deadline or self.closing:
                raise MembershipError(f"node {self.node_id} could not re-form the ring since "
                                      f"generation {since}: "
                                      f"{membership.waiting or 'no new view agreed yet'}")
            self._serve_membership()
            if not formed():
                self.mailbox.pump(self.settings.heartbeat_interval / 2)
        self.executor.merged_into = None
        if self.order_due:
            self._order_ring()
        return self.view

    def _fail_queued(self, error: BaseException) -> None:
        """Fail every collective still queued with ``error``."""
        while True:
            try:
                work = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(work, Work):
                work._finish(error=error)


def _handle_control(node_id: str, mailbox: Mailbox, membership: Links, gate: Gate | None) -> None:
    """Hand the control messages waiting in ``mailbox`` to the gate (ledger messages) or to
    membership; a message that makes them raise counts as its sender's offence."""
    while mailbox.control:
        message = mailbox.control.popleft()
        try:
            if gate is not None and is_ledger(message):
                gate.handle(message)
                continue
            membership.handle(message)
        except ProtocolError as exc:
            mailbox.reject(message, exc)  # counted, logged once per sender
        except Exception as exc:  # noqa: BLE001 - a peer's message must not stop us
            # whatever a peer's message made membership raise is that peer's offence: it
            # is counted like a malformed message (and evicts it when repeated)
            log.debug("node %s: control message from %s raised", node_id, message.origin,
                      exc_info=True)
            mailbox.reject(message, ProtocolError(
                f"{message.header.kind.name.lower()} (handling raised)",
                "a message this node can act on", f"{type(exc).__name__}: {exc}"[:200],
                message.origin))
