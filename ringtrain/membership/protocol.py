"""Membership: who is in the ring, agreed with no leader, as a pure state machine.

:class:`Membership` never touches a socket, a thread or a clock. It is driven by

* :meth:`Membership.hello`: a peer introduced itself (the node checked its HELLO: job key
  proof, job, protocol) as incarnation ``i`` of node id ``p`` at an endpoint;
* :meth:`Membership.receive`: a membership message (``messages``) from a peer;
* :meth:`Membership.tick`: time passed (the caller passes the time, in seconds);
* local events: :meth:`suspect` (a collective blamed a member), :meth:`start_reform` (the
  application asks for a view change), :meth:`prepare_leave`, :meth:`heard`;

and hands back messages to send (:meth:`take_sends`), the installed :attr:`view` (a new one
each time :attr:`installs` grows) and when it next needs a tick (:meth:`next_tick`). The node
wires it to ZeroMQ (``membership.links``); the simulator in ``tests/sim`` runs the same code
over a virtual network.

Identity. A member is a node id *and* an incarnation (a number drawn when the process
starts; a restart draws a higher one). A HELLO with a higher incarnation retires the old one
at once: its messages are dropped, it is suspected (so the next view leaves it out) and the
new process is a joiner. A HELLO from another node id at the endpoint of a known peer retires
that peer the same way (a device restarted under a new id).

Views and agreement. Views are named (lineage, generation). What follows view ``V_g`` is
decided by one Paxos instance whose acceptors are the members of ``V_g`` (``agreement``);
a first view by its proposer with every proposed node accepting.

Parts. :class:`Membership` takes every input and holds the state its parts share; they do
the work: ``choice.ViewChoice`` (the view this node would propose: who survives, who joins),
``heartbeats.Heartbeats`` (heartbeats sent and heard, suspicion by silence),
``installing.Installer`` (installing decided views, DECIDE to whoever is behind, merging,
leaving a view) and ``agreement`` (the instance that changes the view, and first views).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import NamedTuple

from .agreement import Genesis, Instance, has_quorum
from .choice import ViewChoice
from .heartbeats import Heartbeats
from .installing import Installer
from .messages import (
    NO_BALLOT,
    Accept,
    Accepted,
    Decide,
    Decision,
    Heartbeat,
    Leave,
    Message,
    Nack,
    Prepare,
    Promise,
    Release,
)
from .peers import Peers, PeerState
from .views import View

log = logging.getLogger(__name__)

__all__ = ["Membership", "MembershipConfig", "Send", "View", "has_quorum"]


@dataclass(frozen=True)
class MembershipConfig:
    """Sizes and timing of one node's membership (seconds)."""

    form_size: int = 1  # how many nodes a first view needs
    min_size: int = 1  # fewer and the job waits
    max_size: int = 64
    settle: float = 0.0  # the candidate set must stay unchanged this long before a first view
    heartbeat_interval: float = 0.25
    suspect_timeout: float = 2.0  # a silent member is suspected after this long
    round_timeout: float = 0.5  # a proposal without a quorum by then is tried again
    stagger: float = 0.1  # per rank: the lowest live member proposes first


class Send(NamedTuple):
    """A message for one peer (by node id)."""

    to: str
    message: Message


class Membership:
    """Links, liveness and agreement of one node (module docstring)."""

    def __init__(self, node_id: str, incarnation: int, config: MembershipConfig):
        self.node_id = node_id
        self.incarnation = incarnation
        self.config = config
        self.peers = Peers()
        self.view: View | None = None
        self.decision: Decision | None = None
        self.installs = 0  # grows with every view installed
        self.installed_at = 0.0  # when the view was installed
        self.incarnations: dict[str, int] = {}  # of the view's members
        self.evicted = False  # a newer view of our lineage left us out: we join anew
        self.joined = False  # the installed view admitted us into a running ring
        self.leaving = False  # we leave after the current step: no part in view changes
        self.said_leave = False  # we told every peer we leave (:meth:`leave`)
        self.reforming = False  # a view change is under way (we may propose)
        self.reform_due = False  # a suspect to drop, a joiner to admit (refreshed by tick)
        self.turned_away: tuple[str, ...] = ()  # joiners a full ring has no room for (tick)
        self.full_ring: tuple[str, ...] = ()  # outside a ring: the members of a full one (tick)
        self.suspects: dict[str, str] = {}  # member -> why
        self.sequence = 0  # the collective we are at (told in heartbeats)
        self.waiting = ""  # why no view can be proposed now ("" if it can)
        # (lineage, generation, ballot, voters) of the instance whose decision installed our
        # view, if this node decided it (None: a DECIDE told us)
        self.evidence: tuple | None = None
        self._sends: list[Send] = []
        self._retired: list[str] = []
        self._instance = Instance(self)
        self._genesis = Genesis(self)
        self.choice = ViewChoice(self)
        self.heartbeats = Heartbeats(self)
        self.installer = Installer(self, self._instance, self._genesis, self.heartbeats)
        self._random = random.Random(f"{node_id}/{incarnation}")
        self._last_tick = -math.inf

    # outputs -------------------------------------------------------------------------------

    def take_retired(self) -> list[str]:
        """Peers whose endpoint another process took since the last call: their links are
        to be closed."""
        retired, self._retired = self._retired, []
        return retired

    def start_alone(self, now: float) -> None:
        """Install a first view of this node alone (a job of one, no agreement needed)."""
        self.installer.start_alone(now)

    def take_sends(self) -> list[Send]:
        """The messages to send since the last call, oldest first."""
        sends, self._sends = self._sends, []
        return sends

    def send(self, to: str, message: Message) -> None:
        """Queue ``message`` for peer ``to`` (used by the parts)."""
        self._sends.append(Send(to, message))

    def next_tick(self) -> float:
        """When :meth:`tick` next has work, at the latest (a time on the caller's clock)."""
        heartbeat = self.heartbeats.last_sent + self.config.heartbeat_interval
        if self.forming:
            times: tuple[float, ...] = (self._genesis.next_attempt,
                                        self.choice.forming_since + self.config.settle)
            if self._genesis.proposal is not None:
                times += (self._genesis.proposal.deadline, self._genesis.proposal.resend_at)
        elif self.reforming:
            times = (self._instance.next_attempt,)
            if self._instance.round is not None:
                times += (self._instance.round.deadline, self._instance.round.resend_at)
        else:
            return heartbeat
        # a time already past is due now, but only once: the heartbeat bounds the rest
        last = self._last_tick
        return min([heartbeat, *[t for t in times if t > last]])

    @property
    def fenced(self) -> bool:
        """Whether this node promised to change its view: a collective of it must not start
        (``pending_members`` tells whether one under way may finish)."""
        return self._instance.promised != NO_BALLOT  # Instance.fenced, one call fewer

    @property
    def forming(self) -> bool:
        """Whether this node is outside any ring (no view, or left out of its lineage)."""
        return self.view is None or self.evicted

    def pending_members(self) -> tuple[str, ...] | None:
        """The member set of the change under way, if known."""
        return self._instance.pending() if self.reforming else None

    def leaving_peers(self) -> set[str]:
        """Peers whose heartbeat said they leave after their current step."""
        return {p for p, s in self.peers.scan() if s.leaving}

    def newer_generation_seen(self) -> bool:
        """Whether a member of our lineage runs a newer generation (we are behind)."""
        view = self.view
        return view is not None and any(
            s.lineage == view.lineage and s.in_view and s.generation > view.generation
            for _, s in self.peers.scan())

    # inputs --------------------------------------------------------------------------------

    def hello(self, peer: str, incarnation: int, endpoint: str, now: float) -> bool:
        """A verified HELLO from incarnation ``incarnation`` of ``peer`` at ``endpoint``.
        Returns False (refuse it) if it is older than one already seen."""
        known = self.peers.get(peer)
        if peer == self.node_id or (known is not None and incarnation < known.incarnation):
            return False
        if known is not None and incarnation == known.incarnation and endpoint \
                and endpoint == known.endpoint:
            # a HELLO again (the usual case): nobody else holds this endpoint (claiming one
            # clears it from every other peer), so only the liveness changes
            known.left = False
            known.last_heard = now
            return True
        for other in self.peers.at_endpoint(endpoint, peer):
            log.warning("node %s: %s's endpoint %s now answers as %s: %s is gone",
                        self.node_id, other, endpoint, peer, other)
            self._retire(other, f"its endpoint {endpoint} now answers as {peer}", now)
            gone = self.known_peer(other)
            gone.left, gone.endpoint = True, ""  # never alive again
            self._retired.append(other)
        _, replaced = self.peers.introduce(peer, incarnation, endpoint, now,
                                           self._is_member)
        if replaced:
            log.warning("node %s: %s restarted (new incarnation); its old process is fenced "
                        "off and the new one joins", self.node_id, peer)
            self._retire(peer, "it restarted (a new incarnation)", now)
        return True

    def receive(self, peer: str, incarnation: int, message: Message, now: float) -> None:
        """A membership message from incarnation ``incarnation`` of ``peer``; messages of
        an unknown or retired incarnation are ignored."""
        state = self.peers.get(peer)
        if state is None or state.incarnation != incarnation:
            return
        if now > state.last_heard:
            state.last_heard = now
        if isinstance(message, Heartbeat):
            self.heartbeats.on_heartbeat(peer, state, message)
        elif isinstance(message, Decide):
            self.installer.on_decide(peer, message, now)
        elif isinstance(message, Leave):
            state.left = True
            self.suspect(peer, "it left the ring")
        elif isinstance(message, Release):
            self._genesis.on_release(peer, message)
        elif isinstance(message, (Accept, Accepted, Nack)) and message.generation == 0:
            getattr(self._genesis, _HANDLERS[type(message)])(peer, message, now)
        elif isinstance(message, (Prepare, Accept, Promise, Accepted, Nack)):
            if self._in_instance(peer, message.lineage, message.generation):
                getattr(self._instance, _HANDLERS[type(message)])(peer, message, now)
            elif isinstance(message, (Prepare, Accept)):
                self.installer.catch_up(peer)

    def heard(self, peer: str, now: float) -> None:
        """A sign of life from ``peer`` outside membership (its data)."""
        state = self.peers.get(peer)
        if state is not None:
            state.last_heard = max(state.last_heard, now)

    def suspect(self, peer: str | None, reason: str) -> None:
        """Treat member ``peer`` as failed: the next view leaves it out."""
        view = self.view
        if view is None or peer is None or peer == self.node_id or peer not in view.members \
                or peer in self.suspects:
            return
        self.suspects[peer] = reason
        log.warning("node %s suspects %s: %s", self.node_id, peer, reason)

    def start_reform(self, now: float) -> None:
        """Take part as a proposer in changing the view, the lowest live member first: the
        application asks for it (after a failure, or ``reform_due``), or another member's
        round is under way."""
        if self.reforming or self.forming:
            return
        self.reforming = True
        live = [m for m in self.view.members
                if m == self.node_id or self.choice.survives(m, now)]
        rank = live.index(self.node_id) if self.node_id in live else len(live)
        self._instance.next_attempt = now + self.config.stagger * rank

    def prepare_leave(self) -> None:
        """Take part in no view change from now on (we leave after this step), and say so
        in a heartbeat at the next tick: the view the others agree on after that step then
        leaves us out, rather than including us and failing when we are gone."""
        self.leaving = True
        self.heartbeats.send_at_next_tick()

    def leave(self) -> None:
        """Tell every peer we leave."""
        self.said_leave = True
        for peer, state in self.peers.items():
            if not state.left:
                self.send(peer, Leave())

    def leave_outsiders(self) -> None:
        """Tell the peers outside our view that we leave (this node closes): a joiner waiting
        to be admitted, or a member left out on its way back, learns at once that this ring
        is going, rather than waiting for it until a timeout. Members are not told: one may
        still be in our last collective, which a LEAVE would abort (a leave that members
        must know of goes through :meth:`prepare_leave` and :meth:`leave`)."""
        if self.said_leave:
            return
        members = self.view.members if self.view is not None and not self.evicted else ()
        for peer, state in self.peers.items():
            if peer not in members and not state.left:
                self.send(peer, Leave())

    def tick(self, now: float) -> None:
        """Heartbeats, suspicion by silence, proposals and their timeouts."""
        self._last_tick = now
        self.heartbeats.tick(now)
        # who is lost depends on the view and on what peers last said, neither of which
        # changes in this call but by an install: computed once (this runs for every tick)
        gone = self.choice.lost_members()
        self.installer.abandon_dead_view(gone)
        view = self.view
        if view is not None and not self.evicted:
            self.heartbeats.suspect_silent(view, now)
            self.installer.leave_for_running_ring(gone, now)
        installs = self.installs
        if self.forming:
            self._genesis.tick(now)
        else:
            self._instance.tick(now)
        if self.forming:
            self.reform_due, self.turned_away = False, ()
            self.full_ring = next((state.members for peer, state in sorted(self.peers.items())
                                   if state.full and state.in_ring and self.alive(peer, now)
                                   and self.node_id not in state.members), ())
            return
        self.full_ring = ()
        if installs != self.installs:
            gone = self.choice.lost_members()
        # a suspect, a member that does not survive (ViewChoice.survives, gone known), a joiner
        # with room for it (a full ring would install the same members again, every step)
        view = self.view
        joiners = self.choice.joiners(now, gone)
        full = view.world_size >= self.config.max_size
        self.turned_away = tuple(joiners) if full else ()
        self.reform_due = bool(self.suspects) or any(
            m != self.node_id and (m in gone or not self.alive(m, now))
            for m in view.members) or (not full and bool(joiners))

    # helpers for the parts -----------------------------------------------------------------

    def alive(self, peer: str, now: float) -> bool:
        """Whether ``peer`` was heard from within the suspicion timeout and has not left."""
        state = self.peers.get(peer)
        return (state is not None and not state.left and state.last_heard > 0
                and now - state.last_heard <= self.config.suspect_timeout)

    def retry_delay(self) -> float:
        """How long to wait before proposing again: a round, plus jitter against duels."""
        return self.config.round_timeout * (1.0 + self._random.random())

    def known_peer(self, peer: str) -> PeerState:
        """The state of ``peer``, which must be known."""
        state = self.peers.get(peer)
        assert state is not None
        return state

    # internals -----------------------------------------------------------------------------

    def _is_member(self, peer: str) -> bool:
        return self.view is not None and peer in self.view.members

    def _in_instance(self, peer: str, lineage: str, generation: int) -> bool:
        """Whether ``peer`` is an acceptor of the instance (lineage, generation) we run."""
        view = self.view
        if self.forming or view is None or lineage != view.lineage \
                or generation != view.generation or peer not in view.members:
            return False
        return self.incarnations[peer] == self.known_peer(peer).incarnation

    def _retire(self, peer: str, why: str, now: float) -> None:
        if self._is_member(peer) and not self.evicted:
            self.suspect(peer, why)
            self.known_peer(peer).back_off(now)

    def state(self, now: float) -> dict[str, object]:
        """A printable summary (plain data: safe to hand to another thread)."""
        view = self.view
        return {"view": None if view is None else
                {"lineage": view.lineage, "generation": view.generation,
                 "members": list(view.members)},
                "reforming": self.reforming, "evicted": self.evicted, "fenced": self.fenced,
                "suspects": dict(self.suspects), "waiting": self.waiting,
                "peers": {p: {"endpoint": s.endpoint, "incarnation": s.incarnation,
                              "silent_s": round(now - s.last_heard, 2) if s.last_heard else None,
                              "lineage": s.lineage, "generation": s.generation,
                              "in_view": s.in_view, "left": s.left, "removals": s.removals,
                              "backoff_s": round(max(0.0, s.backoff_until - now), 2),
                              "hears": sorted(s.hears)}
                          for p, s in sorted(self.peers.items())}}


_HANDLERS = {Prepare: "on_prepare", Accept: "on_accept", Promise: "on_promise",
             Accepted: "on_accepted", Nack: "on_nack"}
