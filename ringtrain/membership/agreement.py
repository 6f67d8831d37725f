"""Agreement on the next view: one Paxos instance per view, and the first view of a lineage.

:class:`Instance` decides what follows view ``V_g`` (lineage L, generation g). Its acceptors
are exactly the members of ``V_g`` (the incarnations the view names); any member may propose,
with ballot ``(round, node id)``. Phase 1: PREPARE to every member; a quorum of PROMISEs, each
carrying what that member accepted last. The proposer must propose the value accepted at the
highest ballot among them, else the set it wants. Phase 2: ACCEPT; a quorum of ACCEPTED
decides, and the proposer sends DECIDE. A quorum is a strict majority of ``V_g``, or exactly
half of it including its lowest member (any two such sets intersect).

:class:`Genesis` proposes a first view among nodes that have none: the lowest candidate
proposes, every proposed node must accept it (each accepts one first view at a time, until
the proposer releases it or goes silent), and only then is it decided.

Both are driven by :class:`~.protocol.Membership`, which owns peers, views and the outbox;
they ask its ``choice`` what to propose and hand what they decide to its ``installer``.
Nothing here touches a clock, a socket or a thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .messages import (
    NO_BALLOT,
    Accept,
    Accepted,
    Ballot,
    Decision,
    Nack,
    Prepare,
    Promise,
    Release,
)

if TYPE_CHECKING:
    from .protocol import Membership


def has_quorum(members: tuple[str, ...], voters: set[str] | list[str] | tuple[str, ...]) -> bool:
    """Whether ``voters`` are a quorum of ``members``: a strict majority, or exactly half
    including the lowest member."""
    kept = len(set(members) & set(voters))
    if 2 * kept > len(members):
        return True
    return bool(members) and 2 * kept == len(members) and min(members) in voters


@dataclass
class Round:
    """One attempt of this node to get a value chosen."""

    ballot: Ballot
    deadline: float
    wanted: Decision  # what this node proposes unless an accepted value binds it
    resend_at: float  # when to send again to members that have not answered (lost messages)
    value: Decision | None = None  # set once phase 2 starts
    promises: dict[str, tuple[Ballot, Decision | None]] = field(default_factory=dict)
    acks: set[str] = field(default_factory=set)


class Instance:
    """Acceptor and proposer of the instance that changes the current view."""

    def __init__(self, membership: Membership):
        self.m = membership
        self.reset()

    def reset(self) -> None:
        """A new view: a new instance, nothing promised."""
        self.promised: Ballot = NO_BALLOT
        self.accepted_ballot: Ballot = NO_BALLOT
        self.accepted: Decision | None = None
        self.highest_round = 0
        self.round: Round | None = None
        self.next_attempt = math.inf
        self.wanted_seen: tuple[str, ...] | None = None  # the newest Prepare's intent

    @property
    def fenced(self) -> bool:
        """Whether this node promised a change of its view: it starts no collective of it."""
        return self.promised != NO_BALLOT

    def pending(self) -> tuple[str, ...] | None:
        """The member set of the change under way, as far as this node knows it."""
        if self.accepted is not None:
            return self.accepted.ids
        if self.round is not None and self.round.value is not None:
            return self.round.value.ids
        return self.wanted_seen

    # acceptor -------------------------------------------------------------------------------

    def on_prepare(self, peer: str, msg: Prepare, now: float) -> None:
        m = self.m
        if msg.ballot >= self.promised:  # equal: the proposer asks again (a lost answer)
            self.promised = msg.ballot
            self.highest_round = max(self.highest_round, msg.ballot[0])
            self.wanted_seen = msg.wanted
            m.send(peer, Promise(msg.lineage, msg.generation, msg.ballot, self.accepted_ballot,
                                 self.accepted))
            self._yield_to(msg.ballot, now)
        else:
            m.send(peer, Nack(msg.lineage, msg.generation, msg.ballot, self.promised))

    def on_accept(self, peer: str, msg: Accept, now: float) -> None:
        m = self.m
        view = m.view
        assert view is not None
        if msg.value.lineage != view.lineage or msg.value.generation <= view.generation:
            return  # not a successor of this view: ignore it
        if msg.ballot >= self.promised:
            self.promised = self.accepted_ballot = msg.ballot
            self.accepted = msg.value
            self.highest_round = max(self.highest_round, msg.ballot[0])
            m.send(peer, Accepted(msg.lineage, msg.generation, msg.ballot))
            self._yield_to(msg.ballot, now)
        else:
            m.send(peer, Nack(msg.lineage, msg.generation, msg.ballot, self.promised))

    def _yield_to(self, ballot: Ballot, now: float) -> None:
        """Another member's round is under way: take part in the change (as a backup
        proposer), but let that round finish before trying one of our own (duelling
        proposers would pre-empt each other for ever)."""
        if ballot[1] == self.m.node_id:
            return
        self.m.start_reform(now)
        if self.round is not None and self.round.ballot < ballot:
            self.round = None
        self.next_attempt = max(self.next_attempt if self.next_attempt < math.inf else now,
                                now + self.m.config.round_timeout + self.m.retry_delay())

    # proposer -------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        m = self.m
        if self.round is not None and now >= self.round.deadline:
            self.round = None  # no quorum in time: try again, later than the others
            self.next_attempt = now + m.retry_delay()
        if self.round is not None and now >= self.round.resend_at:
            self._resend(now)
        if self.round is not None or not m.reforming or m.leaving or now < self.next_attempt:
            return
        wanted = m.choice.wanted(now)
        if wanted is None:
            self.next_attempt = now + m.config.round_timeout
            return
        self.highest_round = max(self.highest_round, self.promised[0]) + 1
        ballot = (self.highest_round, m.node_id)
        self.round = Round(ballot, now + 2 * m.config.round_timeout, wanted,
                           now + m.config.round_timeout / 3)
        view = m.view
        assert view is not None
        if ballot > self.promised:  # our own promise is state, not a message
            self.promised = ballot
            self.round.promises[m.node_id] = (self.accepted_ballot, self.accepted)
        for member in view.members:
            if member != m.node_id:
                m.send(member, Prepare(view.lineage, view.generation, ballot, wanted.ids))
        self._after_promise(now)

    def _resend(self, now: float) -> None:
        """Ask again the members that have not answered this round (a message was lost)."""
        m, r, view = self.m, self.round, self.m.view
        assert r is not None and view is not None
        r.resend_at = now + m.config.round_timeout / 3
        for member in view.members:
            if member == m.node_id:
                continue
            if r.value is None and member not in r.promises:
                m.send(member, Prepare(view.lineage, view.generation, r.ballot, r.wanted.ids))
            elif r.value is not None and member not in r.acks:
                m.send(member, Accept(view.lineage, view.generation, r.ballot, r.value))

    def on_promise(self, peer: str, msg: Promise, now: float) -> None:
        r = self.round
        if r is None or r.value is not None or msg.ballot != r.ballot:
            return
        r.promises[peer] = (msg.accepted_ballot, msg.accepted)
        self._after_promise(now)

    def _after_promise(self, now: float) -> None:
        m, r = self.m, self.round
        view = m.view
        assert r is not None and view is not None
        if r.value is not None or not has_quorum(view.members, list(r.promises)):
            return
        bound = [(b, v) for b, v in r.promises.values() if v is not None]
        r.value = max(bound, key=lambda bv: bv[0])[1] if bound else r.wanted
        for member in view.members:
            if member != m.node_id:
                m.send(member, Accept(view.lineage, view.generation, r.ballot, r.value))
        if r.ballot >= self.promised:
            self.promised = self.accepted_ballot = r.ballot
            self.accepted = r.value
            r.acks.add(m.node_id)
        self._after_accepted(now)

    def on_accepted(self, peer: str, msg: Accepted, now: float) -> None:
        r = self.round
        if r is None or r.value is None or msg.ballot != r.ballot:
            return
        r.acks.add(peer)
        self._after_accepted(now)

    def _after_accepted(self, now: float) -> None:
        m, r = self.m, self.round
        view = m.view
        assert r is not None and r.value is not None and view is not None
        if has_quorum(view.members, r.acks):
            m.installer.decided(r.value, r.acks, r.ballot, now)

    def on_nack(self, peer: str, msg: Nack, now: float) -> None:
        r = self.round
        if r is None or msg.ballot != r.ballot or msg.promised <= r.ballot:
            return
        self.highest_round = max(self.highest_round, msg.promised[0])
        self.round = None
        self.next_attempt = now + self.m.retry_delay()


@dataclass
class FirstView:
    """A first view this node proposed: who accepted it so far."""

    value: Decision
    ballot: Ballot
    deadline: float
    resend_at: float
    acks: set[str] = field(default_factory=set)


class Genesis:
    """Proposing and accepting first views (no view yet, or left out of our lineage)."""

    def __init__(self, membership: Membership):
        self.m = membership
        self.locked: tuple[str, str] | None = None  # (lineage, proposer) accepted, undecided
        self.locked_until = 0.0
        self.proposal: FirstView | None = None
        self.round = 0
        self.next_attempt = 0.0

    def clear(self) -> None:
        """A view was installed: nothing to propose or hold."""
        self.locked, self.proposal = None, None

    def tick(self, now: float) -> None:
        m = self.m
        if self.locked is not None and self.locked[1] != m.node_id and (
                not m.alive(self.locked[1], now) or now >= self.locked_until):
            # its proposer went silent, or its round is over (a Release may be lost): free
            # to accept another (were it decided after all, its DECIDE still reaches us)
            self.locked = None
        if self.proposal is not None and now >= self.proposal.deadline:
            self._release(now)
        if self.proposal is not None and now >= self.proposal.resend_at:
            p = self.proposal
            p.resend_at = now + m.config.round_timeout / 3
            for member in sorted(set(p.value.ids) - p.acks):
                m.send(member, Accept(p.value.lineage, 0, p.ballot, p.value))
        if self.proposal is not None or self.locked is not None or now < self.next_attempt \
                or m.leaving:
            return
        value = m.choice.first_view(now, self.round + 1)
        if value is None:
            return
        self.round += 1
        ballot = (self.round, m.node_id)
        self.proposal = FirstView(value, ballot, now + 2 * m.config.round_timeout,
                                  now + m.config.round_timeout / 3, {m.node_id})
        self.locked = (value.lineage, m.node_id)
        for member in value.ids:
            if member != m.node_id:
                m.send(member, Accept(value.lineage, 0, ballot, value))
        self._check(now)

    def _release(self, now: float) -> None:
        assert self.proposal is not None
        for member in sorted(self.proposal.acks - {self.m.node_id}):
            self.m.send(member, Release(self.proposal.value.lineage))
        self.proposal = None
        self.locked = None
        self.next_attempt = now + self.m.retry_delay()

    def on_accept(self, peer: str, msg: Accept, now: float) -> None:
        m = self.m
        value = msg.value
        if not value.includes(m.node_id, m.incarnation) or value.lineage != msg.lineage:
            return
        if self.locked is not None and self.locked[1] == peer and msg.ballot[0] > int(
                self.locked[0].split(".")[1]):
            self.locked = None  # its proposer moved on to a newer proposal (a lost Release)
        # a view we could not install (its generation is not above ours: a node's generations
        # only grow) must not be accepted: its proposer would run it without us, for ever.
        # The refusal frees the proposer; our heartbeats tell it our generation meanwhile.
        behind = m.view is not None and value.generation <= m.view.generation
        if m.leaving or not m.forming or behind or (self.locked is not None
                                                    and self.locked != (msg.lineage, peer)):
            m.send(peer, Nack(msg.lineage, 0, msg.ballot, NO_BALLOT))
            return
        if any(member != m.node_id and not m.alive(member, now) for member in value.ids):
            # not yet: a member we have not heard from has not admitted us either (or we it),
            # so its data to us would be dropped and the first collective would stall; the
            # proposer repeats its Accept until its round ends, and we may hear it by then
            return
        if self.locked is None:
            self.locked_until = now + 3 * m.config.round_timeout
        self.locked = (msg.lineage, peer)
        m.send(peer, Accepted(msg.lineage, 0, msg.ballot))

    def on_accepted(self, peer: str, msg: Accepted, now: float) -> None:
        p = self.proposal
        if p is not None and msg.lineage == p.value.lineage:
            p.acks.add(peer)
            self._check(now)

    def _check(self, now: float) -> None:
        p = self.proposal
        assert p is not None
        if p.acks >= set(p.value.ids):
            self.m.installer.decided(p.value, p.acks, p.ballot, now)

    def on_nack(self, peer: str, msg: Nack, now: float) -> None:
        p = self.proposal
        if p is not None and msg.lineage == p.value.lineage:
            self._release(now)

    def on_release(self, peer: str, msg: Release) -> None:
        if self.locked == (msg.lineage, peer):
            self.locked = None
