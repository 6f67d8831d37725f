"""Membership: who is in the ring, agreed with no leader, numbered by generation.

Every message here is a control message (see ``wire.MessageKind``).

Links. A node dials every candidate endpoint it learns (static ``--peer`` list or mDNS adverts)
and sends HELLO {id, job, protocol, endpoint, key, proof}. On a keyed ring ``key`` is the CURVE
public key of that connection and ``proof`` an HMAC of (job, id, key) under the job key; the
receiver admits the key for that id only if the proof holds and CURVE authenticated that key.
The receiver answers WELCOME on the same connection and dials back the address the HELLO came
from (so a multi-homed peer is reached on the interface that works, whatever it advertised).
HELLO also carries ``schema``, ``incarnation`` and ``host``, the name of the sender's
shared-memory beacon (``shm.py``): a receiver that can read it shares the host with the sender.
A peer is *linked* once we have its HELLO (it reaches us) and its WELCOME (we reach it).

Liveness. Linked nodes send each other HEARTBEAT {generation, sequence, members} every
``heartbeat_interval``; any message counts as a sign of life. A peer silent for
``suspect_timeout`` is suspected; so is a peer a collective blamed for a failure.

Agreement. A node proposes ``(generation, members)`` to every proposed member:

* while forming (no view yet): itself and every live linked peer that has no view either,
  once there are at least ``min_size`` of them and the set has been stable for ``settle``
  seconds (or reached ``max_size``);
* to change a view (``reform``): the members it does not suspect, plus live joiners.

The generation is one more than any it has seen, unless a peer already proposed the same set
(then it takes that number, so everyone settles on one). It never proposes two different sets
under one number. Receiving a proposal from a member that leaves out some members, a node
adopts those suspicions (the intersection), so all survivors converge on one set. A node
installs ``(g, M)`` once it has delivered its own proposal of ``(g, M)`` to every member of
M and received exactly ``(g, M)`` from each. Hence two nodes that run collectives in
generation g run them over the same members: each saw the other propose that very set.

Quorum. A change from view V to M needs a strict majority of V in M, or exactly half of V
including V's lowest-ranked member. Two disjoint halves of a partition cannot both qualify,
so at most one side goes on; the other waits and, once healed, joins the survivors' ring as new
members (a node that sees a higher generation it is not part of knows it was evicted).

Ring order inside a view is ``ring.ring_order``: sorted node ids.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..comm.mailbox import Mailbox, Message
from ..comm.shm import SharedMemoryLanes
from ..comm.transport import Transport, normalize_endpoint, peer_endpoint
from ..discovery.candidates import STATIC, CandidateBook
from ..comm.wire import PROTOCOL_VERSION, Header, MessageKind, decode_control, encode_control
from ..errors import ConfigError, ProtocolError, TransportError
from ..ring import plan as ring

log = logging.getLogger(__name__)

RESEND_INTERVAL = 0.1  # seconds between repeated HELLO / PROPOSE while unanswered
MAX_ID_LENGTH = 64
MAX_MEMBERS = 256
BACKOFF_FIRST, BACKOFF_CAP = 1.0, 60.0  # seconds a repeatedly evicted node waits to rejoin


@dataclass(frozen=True)
class View:
    """One installed membership: a generation and its members in ring order."""

    generation: int
    members: tuple[str, ...]
    rank: int  # this node's rank in ``members``

    @property
    def world_size(self) -> int:
        """Number of members."""
        return len(self.members)


@dataclass
class PeerState:
    """What this node knows about one peer."""

    endpoint: str = ""
    heard: bool = False  # we received its HELLO
    welcomed: bool = False  # it answered our HELLO
    last_heard: float = 0.0  # time.monotonic() of its last message
    generation: int = 0  # the generation it last reported having installed (0: none)
    sequence: int = 0  # the collective it last reported being at
    members: tuple[str, ...] = ()  # the members of its installed view
    proposal: tuple[int, tuple[str, ...]] | None = None
    left: bool = False  # it said LEAVE
    evictions: int = 0
    backoff_until: float = 0.0


@dataclass
class Membership:
    """Links, liveness and agreement for one node. Driven by the node's engine thread: call
    :meth:`tick` often and :meth:`handle` for every control message.

    Args:
        node_id, job_name, job: who we are and which job.
        transport, mailbox: the node's sockets and message sorting.
        form_size: how many nodes the first ring waits for.
        min_size, max_size: bounds on the ring size later.
        settle: seconds the forming set must stay unchanged before it is proposed (0: propose
            as soon as ``form_size`` nodes are linked).
        heartbeat_interval, suspect_timeout: liveness timing.
        schema: what members must share (e.g. a hash of model and data); a node with another
            schema is refused at HELLO, and told why.
        lanes: this node's shared-memory lanes, or None: HELLO names its beacon, and a peer's
            beacon is checked to learn whether segments to it can go through shared memory.
    """

    node_id: str
    job_name: str
    job: int
    transport: Transport
    mailbox: Mailbox
    form_size: int
    min_size: int
    max_size: int
    settle: float
    heartbeat_interval: float
    suspect_timeout: float
    schema: str = ""
    lanes: SharedMemoryLanes | None = None
    refusal: str = ""  # why a peer refused us (a schema mismatch): joining cannot succeed
    peers: dict[str, PeerState] = field(default_factory=dict)
    view: View | None = None
    sequence: int = 0  # the collective this node is at (reported in heartbeats)
    reform_due: bool = False  # a suspect to drop or a joiner to admit (refreshed by tick)
    reforming: bool = False  # a view change is under way
    evicted: bool = False  # the others moved on without us: we must join as a new member
    joined: bool = False  # the installed view admitted us into a ring that was running
    leaving: bool = False  # we leave after the current step: take part in no view change
    suspects: set[str] = field(default_factory=set)
    reborn: set[str] = field(default_factory=set)  # members that restarted: joiners again
    _probes: set[str] = field(default_factory=set)  # links named by endpoint, not identified
    _proposal: tuple[int, tuple[str, ...]] | None = None
    _proposed: dict[int, tuple[str, ...]] = field(default_factory=dict)
    _delivered: set[str] = field(default_factory=set)
    _highest_generation: int = 0
    _forming_set: tuple[str, ...] = ()
    _forming_since: float = 0.0
    _last_resend: float = 0.0
    _last_heartbeat: float = 0.0
    _waiting_logged: str = ""
    _joining: bool = False  # our proposal is a running ring's offer to admit us
    incarnation: int = field(default_factory=time.time_ns)  # a restart has a higher one
    _incarnations: dict[str, int] = field(default_factory=dict)  # highest seen per peer id
    candidates: CandidateBook = field(default_factory=CandidateBook)
    # the device check (``node.gate``): (node id, proven CURVE key) -> None, or why it is
    # refused; called for every HELLO whose job-key proof holds
    admit: Callable[[str, str], str | None] | None = None
    refused_candidates: int = 0  # candidate endpoints refused as malformed

    # inputs ---------------------------------------------------------------------------------

    def add_candidates(self, endpoints: Iterable[str], source: str = STATIC) -> None:
        """Dial these endpoints and introduce ourselves there, within the candidate book's
        budgets (see ``discovery.candidates``). ``source``: who told us of them (an advert,
        a proposer); the user's own list by default. Endpoints that are not ``tcp://IP:PORT``
        are refused, unless the user gave them."""
        valid = []
        for endpoint in list(endpoints)[: 4 * self.candidates.max_per_source]:
            try:
                valid.append(normalize_endpoint(endpoint) if source == STATIC
                             else peer_endpoint(endpoint))
            except ConfigError as exc:
                self.refused_candidates += 1
                if self.refused_candidates <= 3:
                    log.warning("node %s: ignoring a candidate from %s: %s", self.node_id,
                                source, exc)
        self.candidates.offer(valid, source, time.monotonic())
        self._dial_due()

    def _dial_due(self) -> None:
        """Hang up expired probes; dial the candidates whose turn it is."""
        now = time.monotonic()
        for endpoint in self.candidates.expire(now):
            if endpoint in self._probes:
                self._probes.discard(endpoint)
                self.transport.disconnect(endpoint)
        known = set(self.transport.links().values())
        for endpoint in self.candidates.due(now):
            if endpoint == self.transport.endpoint or endpoint in known:
                self.candidates.answered(endpoint)
                continue
            self.transport.connect(endpoint, endpoint, watch=True)
            self._probes.add(endpoint)
            known.add(endpoint)

    def _probe_answered(self, probe: str) -> None:
        self._probes.discard(probe)
        self.candidates.answered(probe)

    def suspect(self, peer: str | None, reason: str) -> None:
        """Treat ``peer`` as failed from now on (until the ring has re-formed without it)."""
        if peer and peer != self.node_id and peer not in self.suspects:
            self.suspects.add(peer)
            log.warning("node %s suspects %s: %s", self.node_id, peer, reason)

    def start_reform(self) -> None:
        """Begin changing the view: drop suspects, admit live joiners."""
        self.reforming = True
        self._proposal = None

    def _reform_due(self) -> bool:
        if self.view is None:
            return False
        if self.evicted or (self.suspects | self.reborn) & set(self.view.members):
            return True
        return bool(self._joiners())

    def pending_members(self) -> tuple[str, ...] | None:
        """The member set of the view change under way: our proposal, else the newest one
        proposed to us; None if there is none yet."""
        if self._proposal is not None:
            return self._proposal[1]
        current = self.view.generation if self.view else 0
        offers = [p.proposal for p in self.peers.values()
                  if p.proposal is not None and p.proposal[0] > current]
        return max(offers)[1] if offers else None

    def newer_generation_seen(self) -> bool:
        """Whether some peer runs a generation above ours (installed, as its heartbeats say).
        A proposal above ours that includes us starts a reform instead (``_on_propose``); the
        numbers of proposals that lost to others must not abort anything."""
        current = self.view.generation if self.view else 0
        return any(peer.generation > current for peer in self.peers.values())

    def state(self) -> dict[str, object]:
        """A printable summary, for hang diagnostics and ``ringtrain peers``."""
        now = time.monotonic()
        return {"view": None if self.view is None else
                {"generation": self.view.generation, "members": list(self.view.members)},
                "reforming": self.reforming, "evicted": self.evicted,
                "suspects": sorted(self.suspects), "reborn": sorted(self.reborn),
                "proposal": self._proposal,
                "probes": sorted(self._probes),
                "peers": {pid: {"endpoint": p.endpoint, "heard": p.heard, "welcomed": p.welcomed,
                                "silent_s": round(now - p.last_heard, 2) if p.last_heard else None,
                                "generation": p.generation, "proposal": p.proposal,
                                "evictions": p.evictions,
                                "backoff_s": round(max(0.0, p.backoff_until - now), 2)}
                          for pid, p in sorted(self.peers.items())}}

    # periodic work --------------------------------------------------------------------------

    def tick(self) -> None:
        """Heartbeats, resends, suspicion by silence, proposals (which may install a view)."""
        now = time.monotonic()
        if now - self._last_heartbeat >= self.heartbeat_interval:
            self._last_heartbeat = now
            self._heartbeat()
        self._suspect_silent(now)
        self.reform_due = self._reform_due()
        if now - self._last_resend < RESEND_INTERVAL:
            return
        self._last_resend = now
        self._dial_due()
        self._hello_unlinked()
        if (self.view is None or self.reforming or self.evicted) and not self.leaving:
            self._agree()

    def _heartbeat(self) -> None:
        view = self.view
        body = {"generation": view.generation if view else 0, "sequence": self.sequence,
                "members": list(view.members) if view else []}
        frames = self._control(MessageKind.HEARTBEAT, body)
        for peer_id, peer in self.peers.items():
            if peer.heard and peer.welcomed and not peer.left:
                self._send(peer_id, frames)

    def _suspect_silent(self, now: float) -> None:
        if self.view is None or self.evicted:
            return  # an evicted node has no members to suspect: it is joining anew
        for member in self.view.members:
            peer = self.peers.get(member)
            if member != self.node_id and peer is not None and peer.last_heard \
                    and now - peer.last_heard > self.suspect_timeout:
                self.suspect(member, f"silent for {now - peer.last_heard:.1f} s")

    def _hello_unlinked(self) -> None:
        public_key = self.transport.public_key.decode()
        hello = self._control(MessageKind.HELLO, {
            "id": self.node_id, "job": self.job_name, "protocol": PROTOCOL_VERSION,
            "endpoint": self.transport.endpoint, "key": public_key,
            "proof": self._proof(self.node_id, public_key, self.incarnation),
            "schema": self.schema, "incarnation": self.incarnation,
            "host": self.lanes.beacon if self.lanes is not None else ""})
        links = self.transport.links()
        for link in list(self._probes) + [p for p, s in self.peers.items() if not s.welcomed]:
            if link in links:
                self._send(link, hello)

    def _alive(self, peer_id: str) -> bool:
        # a restarted member is suspected as the member it was, not as the joiner it is now
        peer = self.peers.get(peer_id)
        return (peer is not None and peer.heard and peer.welcomed and not peer.left
                and (peer_id not in self.suspects or peer_id in self.reborn)
                and time.monotonic() - peer.last_heard <= self.suspect_timeout)

    def _joiners(self) -> list[str]:
        """Live linked peers that are not members (or restarted since) and may join now."""
        if self.view is None:
            return []
        now = time.monotonic()
        return sorted(p for p, s in self.peers.items()
                      if (p not in self.view.members or p in self.reborn) and self._alive(p)
                      and now >= s.backoff_until and s.generation < self.view.generation)

    def _wanted(self) -> tuple[str, ...] | None:
        """The member set this node wants to propose now, or None to wait."""
        if self.view is None or self.evicted:
            return self._wanted_forming()
        survivors = [m for m in self.view.members if m == self.node_id or (
            m not in self.suspects and m not in self.reborn and self._alive(m))]
        room = max(0, self.max_size - len(survivors))
        wanted = tuple(ring.ring_order([*survivors, *self._joiners()[:room]]))
        if len(wanted) < self.min_size:
            self._log_waiting(f"waiting for nodes: {len(wanted)} alive, the job needs at least "
                              f"{self.min_size}")
            return None
        if not has_quorum(self.view.members, tuple(survivors)):
            # a restarted member is not its old incarnation: only survivors make a majority
            # (else a stopped old incarnation, woken, could form a second ring)
            self._log_waiting(f"waiting for a majority: {len(survivors)} of the "
                              f"{self.view.world_size} members of generation "
                              f"{self.view.generation} reachable")
            return None
        return wanted

    def _wanted_forming(self) -> tuple[str, ...] | None:
        """Forming a first ring: ourselves and the live peers not in a ring, once stable."""
        if self.evicted or any(self._alive(p) and s.generation > 0 for p, s in self.peers.items()):
            self._log_waiting("a ring of this job is running: waiting to be admitted")
            return None
        now = time.monotonic()
        candidates = [p for p in self.peers if self._alive(p)]
        wanted = tuple(ring.ring_order([self.node_id, *candidates])[: self.max_size])
        if wanted != self._forming_set:
            self._forming_set, self._forming_since = wanted, now
        if len(wanted) < self.form_size:
            self._log_waiting(f"waiting for nodes: {len(wanted)} of {self.form_size} found")
            return None
        if len(wanted) < self.max_size and now - self._forming_since < self.settle:
            return None
        return wanted

    def _agree(self) -> None:
        if (self.view is None or self.evicted) and not self._joining and not self.leaving:
            offer = self._pending_offer()
            if offer is not None:
                self._consider_offer(*offer, from_ring=True)
        if self._proposal is not None:
            members = self._proposal[1]
            if any(m != self.node_id and ((m in self.suspects and m not in self.reborn)
                                          or not self._alive(m)) for m in members):
                self._proposal = None  # someone in it failed meanwhile: propose again
            elif (self.view is None and not self._joining
                  and self._wanted_forming() not in (None, members)):
                self._proposal = None  # more nodes showed up before the ring formed
        if self._proposal is None:
            wanted = self._wanted()
            if wanted is None:
                return
            same = [p.proposal[0] for p in self.peers.values()
                    if p.proposal is not None and p.proposal[1] == wanted
                    and p.proposal[0] > (self.view.generation if self.view else 0)]
            generation = max(same) if same else self._highest_generation + 1
            if self._proposed.get(generation, wanted) != wanted:
                generation = self._highest_generation + 1
            self._set_proposal(generation, wanted)
        self._send_proposal()

    def _set_proposal(self, generation: int, members: tuple[str, ...]) -> None:
        self._proposal = (generation, members)
        self._proposed[generation] = members
        self._highest_generation = max(self._highest_generation, generation)
        self._delivered = set()

    def _send_proposal(self) -> None:
        """Send our proposal to every member that has not queued it yet, then try to install."""
        if self._proposal is None:
            return
        generation, members = self._proposal
        propose = self._control(MessageKind.PROPOSE, {
            "generation": generation,
            "members": [[m, self.peers[m].endpoint if m in self.peers else
                         self.transport.endpoint] for m in members]})
        for member in members:
            if member != self.node_id and member not in self._delivered:
                if self._send(member, propose):
                    self._delivered.add(member)
        self._maybe_install()

    def _maybe_install(self) -> None:
        generation, members = self._proposal
        for member in members:
            if member != self.node_id:
                peer = self.peers.get(member)
                if member not in self._delivered or peer is None or peer.proposal != self._proposal:
                    return
        old = self.view
        self.view = View(generation, members, members.index(self.node_id))
        self.joined = self._joining
        self.reforming = self.evicted = self._joining = False
        self._proposal = None
        self._waiting_logged = ""
        self.sequence = 0
        for member in old.members if old else ():
            if member not in members and member in self.peers and member not in self.reborn:
                self._back_off(self.peers[member])
        # every member proposed this view as the incarnation it is now (a restart forgets
        # the peer's proposal): whoever restarted before it is a member like the others
        self.suspects -= self.reborn
        self.reborn.clear()
        if self.joined:
            self.suspects.clear()  # suspicions from before we joined are void
        self.suspects -= set(old.members if old else ()) - set(members)
        self.suspects &= set(members)
        log.info("node %s installed generation %d: %s", self.node_id, generation,
                 ", ".join(members))

    # messages -------------------------------------------------------------------------------

    def handle(self, message: Message) -> None:
        """Act on one control message; bad ones raise ProtocolError (the caller drops them)."""
        kind = message.header.kind
        if kind is MessageKind.HELLO:
            self._on_hello(message)
            return
        if kind is MessageKind.WELCOME:
            self._on_welcome(message)
            return
        peer = self.peers.get(message.origin)
        if peer is None or not peer.heard:
            raise ProtocolError("sender", "a peer that said HELLO first", message.origin,
                                message.origin)
        peer.last_heard = time.monotonic()
        if kind is MessageKind.PROPOSE:
            self._on_propose(message, peer)
        elif kind is MessageKind.HEARTBEAT:
            self._on_heartbeat(message, peer)
        elif kind is MessageKind.LEAVE:
            peer.left = True
            self.suspect(message.origin, "it left the ring")

    def _on_hello(self, message: Message) -> None:
        body = decode_control(message.payload, {"id": str, "job": str, "protocol": int,
                                                "endpoint": str, "key": str, "proof": str,
                                                "schema": str, "incarnation": int,
                                                "host": str},
                              message.origin, "hello")
        peer_id = body["id"]
        if peer_id != message.origin or not 0 < len(peer_id) <= MAX_ID_LENGTH:
            raise ProtocolError("hello.id", f"the sender's routing id {message.origin!r}",
                                peer_id, message.origin)
        if body["job"] != self.job_name:
            raise ProtocolError("hello.job", self.job_name, body["job"], message.origin)
        if body["protocol"] != PROTOCOL_VERSION:
            raise ProtocolError("hello.protocol", PROTOCOL_VERSION, body["protocol"],
                                message.origin)
        incarnation = body["incarnation"]
        if self.transport.key is not None and (body["key"] != message.user or not
                                               hmac.compare_digest(body["proof"], self._proof(
                                                   peer_id, body["key"], incarnation))):
            raise ProtocolError("hello.proof", "proof of the job key for the connection's "
                                "CURVE key", "a proof that does not verify", message.origin)
        # the device check, before anything of the peer's state changes (an impostor's HELLO
        # must not fence off the incarnation of the device whose id it claims)
        refusal = self.admit(peer_id, message.user) \
            if self.admit is not None and self.transport.key is not None else None
        if refusal is not None:
            raise ProtocolError("hello.device", "an admitted device", refusal, message.origin)
        known = self._incarnations.get(peer_id, 0)
        if incarnation < known:
            # an older process under a live id (say, one that was stopped and woke up)
            raise ProtocolError("hello.incarnation", f"at least {known}: {peer_id} restarted "
                                f"and its old incarnation is fenced off", incarnation,
                                message.origin)
        previous = self.mailbox.admitted.get(peer_id)
        if (known and incarnation > known) or previous not in (None, message.user):
            log.info("%s came back as a new incarnation; the old one is fenced off", peer_id)
            self._forget_incarnation(peer_id)
        self._incarnations[peer_id] = incarnation
        if self.lanes is not None:
            self.lanes.verify(peer_id, body["host"])
        if self.transport.key is not None:
            self.mailbox.admitted[peer_id] = message.user
        if body["schema"] != self.schema:
            refusal = (f"node {self.node_id} refuses {peer_id}: it trains schema "
                       f"{body['schema'] or '(none)'}, this ring trains "
                       f"{self.schema or '(none)'} (different model, data or settings)")
            self.transport.reply(message.origin, self._control(MessageKind.WELCOME, {
                "id": self.node_id, "generation": 0, "members": [], "refused": refusal}))
            raise ProtocolError("hello.schema", self.schema or "(none)",
                                body["schema"] or "(none)", message.origin)
        peer = self.peers.setdefault(peer_id, PeerState())
        peer.heard = True
        peer.left = False
        peer.last_heard = time.monotonic()
        peer.endpoint = self._reachable_endpoint(body["endpoint"], message)
        view = self.view
        self.transport.reply(message.origin, self._control(MessageKind.WELCOME, {
            "id": self.node_id, "generation": view.generation if view else 0,
            "members": list(view.members) if view else []}))
        links = self.transport.links()
        if links.get(peer_id) != peer.endpoint:
            probe = next((p for p in self._probes if links.get(p) == peer.endpoint), None)
            if probe is not None:
                self._probe_answered(probe)
                self.transport.rename_link(probe, peer_id)
            else:
                self.transport.connect(peer_id, peer.endpoint)
                peer.welcomed = False

    def _forget_incarnation(self, peer_id: str) -> None:
        """A peer restarted under the same id: its old state (and membership) is void, but
        not its record of failures, so a node that keeps crashing is backed off."""
        old = self.peers.pop(peer_id, None)
        fresh = self.peers[peer_id] = PeerState()
        if self.lanes is not None:
            self.lanes.forget(peer_id)
        if old is not None:
            fresh.evictions, fresh.backoff_until = old.evictions, old.backoff_until
        if self.view is not None and peer_id in self.view.members and not self.evicted:
            # The old incarnation failed as a member: drop it and admit the new one as a
            # joiner, in one view change (and even if the ring could not change without it,
            # e.g. below min_size). Its crash counts as an eviction.
            self.suspect(peer_id, "it restarted (a new incarnation)")
            if peer_id not in self.reborn:
                self.reborn.add(peer_id)
                self._back_off(fresh)

    @staticmethod
    def _back_off(peer: PeerState) -> None:
        """One more failure of ``peer``: it may join again only after a doubling wait."""
        peer.evictions += 1
        peer.backoff_until = time.monotonic() + min(
            BACKOFF_CAP, BACKOFF_FIRST * 2 ** (peer.evictions - 1))

    def _reachable_endpoint(self, declared: str, message: Message) -> str:
        try:
            endpoint = peer_endpoint(declared)
        except ConfigError as exc:
            raise ProtocolError("hello.endpoint", "tcp://IP:PORT", str(exc),
                                message.origin) from None
        if endpoint.startswith("tcp://") and message.peer_address:
            return f"tcp://{message.peer_address}:{endpoint.rpartition(':')[2]}"
        return endpoint

    def _on_welcome(self, message: Message) -> None:
        body = decode_control(message.payload, {"id": str, "generation": int, "members": list},
                              message.origin, "welcome")
        peer_id = body["id"]
        if not message.on_link or not 0 < len(peer_id) <= MAX_ID_LENGTH:
            raise ProtocolError("welcome", "a reply on one of our links", message.origin)
        if peer_id == self.node_id:  # we dialled ourselves under another address
            self._probe_answered(message.origin)
            self.transport.disconnect(message.origin)
            return
        refused = body.get("refused")
        if isinstance(refused, str) and refused:
            if self.refusal != refused:
                log.error("%s", refused)
            self.refusal = refused[:500]
            return
        if message.origin in self._probes:
            self._probe_answered(message.origin)
            if self.peers.get(peer_id, PeerState()).welcomed and peer_id in self.transport.links():
                # another of its addresses answered first: keep that one
                self.transport.disconnect(message.origin)
                return
            self.transport.rename_link(message.origin, peer_id)
        elif message.origin != peer_id:
            return  # a reply on a link that has since been renamed or replaced
        peer = self.peers.setdefault(peer_id, PeerState())
        peer.welcomed = True
        self._note_view(peer_id, peer, body["generation"], body["members"])

    def _on_heartbeat(self, message: Message, peer: PeerState) -> None:
        body = decode_control(message.payload, {"generation": int, "sequence": int,
                                                "members": list}, message.origin, "heartbeat")
        peer.sequence = body["sequence"]
        self._note_view(message.origin, peer, body["generation"], body["members"])

    def _note_view(self, peer_id: str, peer: PeerState, generation: int, members: list) -> None:
        if not all(isinstance(m, str) for m in members) or len(members) > MAX_MEMBERS:
            raise ProtocolError("members", "a list of node ids", members, peer_id)
        peer.generation, peer.members = generation, tuple(members)
        self._highest_generation = max(self._highest_generation, generation)
        mine = self.view
        if mine is not None and generation > mine.generation and self.node_id not in members:
            if not self.evicted:
                log.warning("node %s was left out of generation %d by %s: it will rejoin as a "
                            "new member", self.node_id, generation, peer_id)
                # Suspicions belong to the view we were evicted from. Kept, they would make
                # the running ring's members look dead to us (a node that was stopped
                # suspects everyone on waking up) and we would refuse every offer to admit us.
                self.suspects.clear()
                self._proposal = None
            self.evicted = True

    def _on_propose(self, message: Message, peer: PeerState) -> None:
        body = decode_control(message.payload, {"generation": int, "members": list},
                              message.origin, "propose")
        entries = body["members"]
        if (len(entries) > MAX_MEMBERS or not all(
                isinstance(e, list) and len(e) == 2 and all(isinstance(x, str) for x in e)
                for e in entries)):
            raise ProtocolError("propose.members", "a list of [id, endpoint] pairs", entries,
                                message.origin)
        members = tuple(e[0] for e in entries)
        generation = body["generation"]
        if message.origin not in members or members != tuple(ring.ring_order(members)):
            raise ProtocolError("propose.members", "ids in ring order including the sender",
                                members, message.origin)
        self._highest_generation = max(self._highest_generation, generation)
        peer.proposal = (generation, members)
        if self.leaving:
            # Agreeing now would put us in a view we are about to leave: the others would
            # install it and fail their next collective. Unanswered, they wait for our
            # LEAVE (or our silence) and propose again without us.
            return
        current = self.view.generation if self.view else 0
        if generation <= current or self.node_id not in members:
            return  # stale, or a ring without us (we learn of it by heartbeats)
        # dial members we have not met (a joiner learns the ring this way)
        self.add_candidates([endpoint for member_id, endpoint in entries
                             if member_id != self.node_id and member_id not in self.peers
                             and endpoint], source=f"proposal:{message.origin}")
        mine = self._proposal
        if self.view is None or self.evicted:
            self._consider_offer(generation, members, from_ring=peer.generation > 0)
        else:
            if not self.reforming:
                self.start_reform()
            if mine is not None and mine[1] == members and generation > mine[0]:
                self._set_proposal(generation, members)  # same ring, higher number: adopt it
            elif mine is not None and mine[1] != members:
                # the proposer cannot see some members we include: adopt its suspicions
                for member in set(mine[1]) - set(members):
                    if member in self.view.members:
                        self.suspect(member, f"{message.origin} left it out of its proposal")
                self._proposal = None
        self._send_proposal()

    def _consider_offer(self, generation: int, members: tuple[str, ...], from_ring: bool
                        ) -> None:
        """Not in a ring: a running ring's offer to admit us is taken as it is, if we reach
        all of its members; among forming nodes only the number of an equal set is taken."""
        mine = self._proposal
        if (from_ring and all(m == self.node_id or self._alive(m) for m in members)) \
                or (mine is not None and mine[1] == members and generation > mine[0]):
            self.reforming = True
            self._joining = from_ring
            if self._proposed.get(generation, members) != members:
                generation = self._highest_generation + 1
            if mine != (generation, members):
                self._set_proposal(generation, members)

    def _pending_offer(self) -> tuple[int, tuple[str, ...]] | None:
        """The newest offer to admit us that a running ring made: it may have come before we
        could take it (before its members' WELCOMEs), and it is not sent twice."""
        current = self.view.generation if self.view else 0
        offers = [p.proposal for p in self.peers.values()
                  if p.generation > 0 and p.proposal is not None
                  and p.proposal[0] > current and self.node_id in p.proposal[1]]
        return max(offers) if offers else None

    # helpers --------------------------------------------------------------------------------

    def _log_waiting(self, text: str) -> None:
        if text != self._waiting_logged:
            self._waiting_logged = text
            # waiting is expected while a first ring forms; a running ring stuck is news
            log.log(logging.WARNING if self.view else logging.INFO, "node %s: %s",
                    self.node_id, text)

    def _control(self, kind: MessageKind, body: dict) -> list[bytes]:
        payload = encode_control(body)
        header = Header(kind=kind, job=self.job, generation=self._highest_generation,
                        sequence=0, nbytes=len(payload))
        return [header.pack(), payload]

    def _proof(self, node_id: str, public_key: str, incarnation: int) -> str:
        if self.transport.key is None:
            return ""
        return self.transport.key.derive(
            f"hello:{self.job_name}:{node_id}:{public_key}:{incarnation}").hex()

    def _send(self, link: str, frames: list[bytes]) -> bool:
        try:
            return self.transport.try_send(link, frames) is not False
        except TransportError as exc:
            log.debug("send to %s failed: %s", link, exc)
            return False

    def leave(self) -> None:
        """Tell every linked peer that we leave (best effort, before closing)."""
        frames = self._control(MessageKind.LEAVE, {"id": self.node_id})
        for peer_id, peer in self.peers.items():
            if peer.heard and peer.welcomed:
                self._send(peer_id, frames)


def has_quorum(previous: tuple[str, ...], proposed: tuple[str, ...]) -> bool:
    """Whether ``proposed`` may succeed ``previous``: a strict majority of the previous
    members, or exactly half of them including the previous lowest-ranked member."""
    kept = len(set(previous) & set(proposed))
    if 2 * kept > len(previous):
        return True
    return 2 * kept == len(previous) and min(previous) in proposed
