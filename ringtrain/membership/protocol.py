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
a first view by its proposer with every proposed node accepting. A node installs a view only
on a quorum of ACCEPTED messages it received (or a DECIDE from one who did): a message
queued is not a message delivered. Members send DECIDE to whoever they see behind.

Merging. Two lineages of one job that meet (a split start): the lower lineage id (its first
proposer started earlier) wins. Its members admit the other lineage's nodes as joiners; such
a node installs the winner's view when a DECIDE including it comes, and says so loudly. The
training layer then gives every member the state of the member furthest ahead.

Parts. :class:`Membership` takes every input and holds the state its parts share; they do
the work: ``choice.ViewChoice`` (the view this node would propose: who survives, who joins)
and ``agreement`` (the instance that changes the view, and first views).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import NamedTuple

from .agreement import Genesis, Instance, has_quorum
from .choice import ViewChoice
from .messages import (
    MAX_MEMBERS,
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
from .views import View, other_ring

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
        self.incarnations: dict[str, int] = {}  # of the view's members
        self.evicted = False  # a newer view of our lineage left us out: we join anew
        self.joined = False  # the installed view admitted us into a running ring
        self.leaving = False  # we leave after the current step: no part in view changes
        self.reforming = False  # a view change is under way (we may propose)
        self.reform_due = False  # a suspect to drop, a joiner to admit (refreshed by tick)
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
        self._random = random.Random(f"{node_id}/{incarnation}")
        self._last_heartbeat = -math.inf
        self._last_tick = -math.inf
        self._installed_at = 0.0
        self._silent: set[str] = set()  # suspects charged with silence only

    # outputs -------------------------------------------------------------------------------

    def take_retired(self) -> list[str]:
        """Peers whose endpoint another process took since the last call: their links are
        to be closed."""
        retired, self._retired = self._retired, []
        return retired

    def start_alone(self, now: float) -> None:
        """Install a first view of this node alone (a job of one, no agreement needed)."""
        lineage = f"{self.incarnation:020d}.0.{self.node_id}"
        self._install(Decision(1, lineage, ((self.node_id, self.incarnation),)), now,
                      joined=False)

    def take_sends(self) -> list[Send]:
        """The messages to send since the last call, oldest first."""
        sends, self._sends = self._sends, []
        return sends

    def send(self, to: str, message: Message) -> None:
        """Queue ``message`` for peer ``to`` (used by ``agreement``)."""
        self._sends.append(Send(to, message))

    def next_tick(self) -> float:
        """When :meth:`tick` next has work, at the latest (a time on the caller's clock)."""
        heartbeat = self._last_heartbeat + self.config.heartbeat_interval
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
        state, replaced = self.peers.introduce(peer, incarnation, endpoint, now,
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
            self._on_heartbeat(peer, state, message, now)
        elif isinstance(message, Decide):
            self._on_decide(peer, message, now)
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
                self._catch_up(peer)

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
        """The application asks for a view change (after a failure, or ``reform_due``)."""
        self.begin_reform(now)

    def begin_reform(self, now: float) -> None:
        """Take part as a proposer in changing the view: the lowest live member first."""
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
        self._last_heartbeat = -math.inf

    def leave(self) -> None:
        """Tell every peer we leave."""
        for peer, state in self.peers.items():
            if not state.left:
                self.send(peer, Leave())

    def tick(self, now: float) -> None:
        """Heartbeats, suspicion by silence, proposals and their timeouts."""
        self._last_tick = now
        if now - self._last_heartbeat >= self.config.heartbeat_interval:
            self._last_heartbeat = now
            self._heartbeat(now)
        # who is lost depends on the view and on what peers last said, neither of which
        # changes in this call but by an install: computed once (this runs for every tick)
        gone = self.choice.lost_members()
        self._abandon_dead_view(gone)
        view = self.view
        if view is not None and not self.evicted:
            timeout = self.config.suspect_timeout
            for member in view.members:
                if member == self.node_id:
                    continue
                state = self.peers.get(member)
                last = max(state.last_heard if state else 0.0, self._installed_at)
                if now - last > timeout:
                    if member not in self.suspects:
                        self._silent.add(member)
                        self.suspect(member, f"silent for {now - last:.1f} s")
                elif member in self._silent:
                    # heard again (a partition healed, a pause ended): silence was the only
                    # charge, so it is lifted (else two healed halves could suspect each
                    # other for ever, and neither would find a majority)
                    self._silent.discard(member)
                    self.suspects.pop(member, None)
            self._leave_for_running_ring(gone, now)
        installs = self.installs
        if self.forming:
            self._genesis.tick(now)
        else:
            self._instance.tick(now)
        if self.forming:
            self.reform_due = False
            return
        if installs != self.installs:
            gone = self.choice.lost_members()
        # a suspect, a member that does not survive (ViewChoice.survives, gone known), a joiner
        self.reform_due = bool(self.suspects) or any(
            m != self.node_id and (m in gone or not self.alive(m, now))
            for m in self.view.members) or bool(self.choice.joiners(now, gone))

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

    def decided(self, value: Decision, voters: set[str], ballot: tuple[int, str],
                now: float) -> None:
        """An instance this node ran decided ``value``: install it, tell everyone in it."""
        view = self.view
        old = view.members if view is not None and not self.evicted else ()
        evidence = (view.lineage if old else value.lineage, view.generation if old else 0,
                    ballot, frozenset(voters))
        for peer in sorted(set(old) | set(value.ids)):
            if peer != self.node_id:
                self.send(peer, Decide(value))
        if value.includes(self.node_id, self.incarnation):
            self._install(value, now, joined=False, evidence=evidence)
        else:  # a value another proposer chose, bound on us by Paxos: it leaves us out
            self.decision = value
            self._left_out(f"the view decided for generation {value.generation} leaves it out")

    def _abandon_dead_view(self, lost_to_view: set[str]) -> None:
        """Leave a view whose lost members (restarted, or their endpoint taken by another
        process: they will never vote again) leave no quorum: it can neither train nor change,
        so this node forms a new ring with the others (never on mere silence: a silent
        majority may be alive across a partition, and moving on)."""
        view = self.view
        if view is None or self.evicted:
            return
        gone = [m for m in view.members if m in lost_to_view]
        if gone and not has_quorum(view.members, [m for m in view.members if m not in gone]):
            log.warning("node %s: %s of the %d members of generation %d restarted, were "
                        "replaced or run another ring: this ring can no longer change; "
                        "forming a new one",
                        self.node_id, ", ".join(gone), view.world_size, view.generation)
            self._leave_view()

    def _leave_for_running_ring(self, lost_to_view: set[str], now: float) -> None:
        """Leave a view that cannot change now for another ring of this job within reach
        (``views.other_ring``: why this is safe, and needed)."""
        view = self.view
        assert view is not None
        if not self.suspects and not lost_to_view:
            return  # (the usual case, on every tick: a member silent long enough is suspected)
        live = [m for m in view.members if m == self.node_id or (
            m not in lost_to_view and m not in self.suspects and self.alive(m, now))]
        ring = None if has_quorum(view.members, live) else other_ring(
            view, self.peers.scan(), lambda p: self.alive(p, now))
        if ring is None:
            return
        log.warning("node %s: generation %d has no quorum within reach (%d of %d members) "
                    "while %s runs another ring of this job: leaving it to join that one",
                    self.node_id, view.generation, len(live), view.world_size, ring)
        self._leave_view()

    def _leave_view(self) -> None:
        """Stop running our view (evicted): no votes in it; we join or form a ring anew."""
        self.evicted = True
        self.suspects.clear()
        self._silent.clear()
        self.reforming = False
        self._instance.reset()

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

    def _catch_up(self, peer: str) -> None:
        """``peer`` speaks of an older view than ours: send it ours if it is a member."""
        view, decision = self.view, self.decision
        if view is not None and decision is not None and \
                decision.includes(peer, self.known_peer(peer).incarnation):
            self.send(peer, Decide(decision))

    def _retire(self, peer: str, why: str, now: float) -> None:
        if self._is_member(peer) and not self.evicted:
            self.suspect(peer, why)
            self.known_peer(peer).back_off(now)

    def _heartbeat(self, now: float) -> None:
        view = self.view
        beat = Heartbeat(view.lineage if view else "", view.generation if view else 0,
                         view.members if view else (), view is not None and not self.evicted,
                         self.sequence, self.leaving,
                         tuple(sorted(p for p, s in self.peers.items()
                                      if self.alive(p, now)))[:MAX_MEMBERS])
        recent = 10 * self.config.suspect_timeout
        members, sends = view.members if view else (), self._sends
        for peer, state in self.peers.scan():
            if not state.left and (now - state.last_heard <= recent or peer in members):
                sends.append(Send(peer, beat))

    def _on_heartbeat(self, peer: str, state: PeerState, beat: Heartbeat, now: float) -> None:
        state.heard_view = True
        state.lineage, state.generation, state.members = beat.lineage, beat.generation, \
            beat.members
        state.in_view, state.sequence, state.leaving = beat.in_view, beat.sequence, \
            beat.leaving
        state.hears = frozenset(beat.hears)
        view = self.view
        if view is None or self.evicted:
            return
        # a newer view of our lineage without us: we are left out, whether or not its sender
        # still runs it (a view was decided to get there; it may have abandoned it since, and
        # then nobody else may be left to tell us)
        if (beat.lineage == view.lineage and beat.generation > view.generation
                and self.node_id not in beat.members):
            self._left_out(f"{peer} installed generation {beat.generation} without it")
        elif beat.lineage != view.lineage or beat.generation < view.generation:
            self._catch_up(peer)

    def _left_out(self, why: str) -> None:
        """A newer view of our lineage leaves us out: we join anew."""
        log.warning("node %s was left out of its ring (%s): it will rejoin as a new member",
                    self.node_id, why)
        self._leave_view()

    def _on_decide(self, peer: str, msg: Decide, now: float) -> None:
        value, view = msg.value, self.view
        current = view.generation if view else 0
        if not value.includes(self.node_id, self.incarnation):
            if view is not None and not self.evicted and value.lineage == view.lineage \
                    and value.generation > view.generation:
                self._left_out(f"{peer} sent generation {value.generation} without it")
            return
        if value.generation <= current:
            return
        if self.forming:
            accepted = self._genesis.locked is not None and \
                self._genesis.locked[0] == value.lineage
            self._install(value, now, joined=not accepted)
        elif value.lineage == view.lineage:
            self._install(value, now, joined=False)
        elif value.lineage < view.lineage:
            log.warning("node %s: two rings of this job met; ring %s (generation %d) joins "
                        "ring %s (generation %d, %d members), whose first view is older; the "
                        "merged ring continues from the state of the member furthest ahead",
                        self.node_id, view.lineage, view.generation, value.lineage,
                        value.generation, len(value.members))
            self._install(value, now, joined=True)

    def _install(self, value: Decision, now: float, joined: bool,
                 evidence: tuple | None = None) -> None:
        old = self.view
        self.evidence = evidence
        ids = value.ids
        if old is not None and old.lineage and old.lineage != value.lineage:
            met = tuple(i for i in ids if i not in old.members)  # we joined their ring
        else:  # joiners that last said they run another ring: ours wins over theirs
            met = tuple(i for i in ids if i != self.node_id and (old is None or i not in
                        old.members) and (s := self.peers.get(i)) is not None
                        and s.in_view and s.lineage not in ("", value.lineage))
        self.view = View(value.generation, ids, ids.index(self.node_id), value.lineage,
                         tuple(i for _, i in value.members), met)
        self.incarnations = dict(value.members)  # member -> incarnation, for lookups
        self.decision = value
        self.installs += 1
        self.joined = joined
        self.evicted = self.reforming = False
        self._instance.reset()
        self._genesis.clear()
        self.waiting = ""
        self.sequence = 0
        self._installed_at = now
        if old is not None:
            for member, incarnation in zip(old.members, old.incarnations, strict=True):
                state = self.peers.get(member)
                # a member that said it leaves (Ctrl-C) is not flapping: no back-off, so
                # the device restarted after a graceful leave rejoins at once
                if member not in ids and state is not None and state.incarnation == incarnation \
                        and not (state.left or state.leaving):
                    state.back_off(now)
        self.suspects = {s: why for s, why in self.suspects.items()
                         if s in ids and not self.alive(s, now)}
        self._silent &= set(self.suspects)
        log.info("node %s installed generation %d: %s", self.node_id, value.generation,
                 ", ".join(ids))

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
                              "backoff_s": round(max(0.0, s.backoff_until - now), 2)}
                          for p, s in sorted(self.peers.items())}}


_HANDLERS = {Prepare: "on_prepare", Accept: "on_accept", Promise: "on_promise",
             Accepted: "on_accepted", Nack: "on_nack"}
