"""Membership: who is in the ring, agreed with no leader, numbered by generation.

Protocol (every message a control message, see ``wire.MessageKind``):

1. HELLO. A node dials every candidate endpoint it knows (static ``--peer`` list or mDNS) and
   sends HELLO {id, job, protocol, endpoint, key, proof}. On a keyed ring ``key`` is the CURVE
   public key the connection was made with and ``proof`` an HMAC of (job, id, key) under the
   job key: the receiver admits that key for that id only if the proof holds and the key is
   the one CURVE authenticated. The receiver answers WELCOME on the same connection and,
   if it has no link to the sender yet, dials back the address the HELLO came from. A peer is
   *linked* once we have had its HELLO (it reaches us) and its WELCOME (we reach it).
2. PROPOSE. When the linked peers make a ring this node wants (for a static ring: every expected
   member), it proposes ``(generation, members)`` to each of them, where generation is one more
   than any generation it has installed or seen proposed. A node never proposes two different
   member sets under one generation number.
3. Install. A node installs view ``(g, M)`` once every member of M, itself included, has
   proposed exactly ``(g, M)`` to it. So two nodes that both run collectives in generation g
   ran them over the same member set: each of them saw the other propose it. Every message
   carries its generation, and messages of another generation are never combined with ours.

Ring order inside a view is ``ring.ring_order`` (sorted node ids): a deterministic function of
the members, so every member computes the same ranks.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import ring
from .errors import ProtocolError, TransportError
from .mailbox import Mailbox, Message
from .transport import Transport, normalize_endpoint
from .wire import PROTOCOL_VERSION, Header, MessageKind, decode_control, encode_control

log = logging.getLogger(__name__)

RESEND_INTERVAL = 0.2  # seconds between repeated HELLO / PROPOSE while forming
MAX_ID_LENGTH = 128


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
    """What this node knows about one peer while forming."""

    endpoint: str = ""
    heard: bool = False  # we received its HELLO
    welcomed: bool = False  # it answered our HELLO
    proposal: tuple[int, tuple[str, ...]] | None = None


@dataclass
class Formation:
    """Forms a ring with a fixed expected size from a list of candidate endpoints.

    Drive it with :meth:`tick` (periodic resends, proposals) and :meth:`handle` (control
    messages from the mailbox). :attr:`view` becomes set once a view is installed.
    """

    node_id: str
    job_name: str
    job: int
    transport: Transport
    mailbox: Mailbox
    expected_size: int
    peers: dict[str, PeerState] = field(default_factory=dict)
    view: View | None = None
    _probes: set[str] = field(default_factory=set)  # links named by endpoint, not yet identified
    _proposal: tuple[int, tuple[str, ...]] | None = None
    _proposed: dict[int, tuple[str, ...]] = field(default_factory=dict)  # every proposal made
    _delivered: set[str] = field(default_factory=set)  # members our proposal was queued to
    _highest_generation: int = 0
    _last_send: float = 0.0

    def add_candidates(self, endpoints: Iterable[str]) -> None:
        """Dial these endpoints and introduce ourselves there."""
        for endpoint in endpoints:
            endpoint = normalize_endpoint(endpoint)
            if endpoint == self.transport.endpoint or endpoint in self.transport.links():
                continue
            self.transport.connect(endpoint, endpoint)
            self._probes.add(endpoint)

    def state(self) -> dict[str, object]:
        """A printable summary, for hang diagnostics."""
        return {"expected": self.expected_size, "probes": sorted(self._probes),
                "proposal": self._proposal,
                "peers": {pid: {"endpoint": p.endpoint, "heard": p.heard,
                                "welcomed": p.welcomed, "proposal": p.proposal}
                          for pid, p in sorted(self.peers.items())}}

    # periodic work --------------------------------------------------------------------------

    def tick(self) -> None:
        """Resend what is not yet answered and propose when the ring is complete."""
        now = time.monotonic()
        if now - self._last_send < RESEND_INTERVAL:
            return
        self._last_send = now
        public_key = self.transport.public_key.decode()
        hello = self._control(MessageKind.HELLO, {"id": self.node_id, "job": self.job_name,
                                                  "protocol": PROTOCOL_VERSION,
                                                  "endpoint": self.transport.endpoint,
                                                  "key": public_key,
                                                  "proof": self._proof(self.node_id, public_key)})
        for link in list(self._probes) + [p for p, s in self.peers.items() if not s.welcomed]:
            if link in self.transport.links():
                self._send(link, hello)
        linked = sorted(p for p, s in self.peers.items() if s.heard and s.welcomed)
        if self.view is None and len(linked) + 1 >= self.expected_size:
            members = tuple(ring.ring_order([self.node_id, *linked[: self.expected_size - 1]]))
            if self._proposal is None or self._proposal[1] != members:
                # join a proposal of the same ring if there is one, so all settle on one number
                same = [p.proposal[0] for p in self.peers.values()
                        if p.proposal is not None and p.proposal[1] == members]
                generation = max(same) if same else self._highest_generation + 1
                if self._proposed.get(generation, members) != members:
                    generation = self._highest_generation + 1
                self._set_proposal(generation, members)
        self._send_proposal()

    def _set_proposal(self, generation: int, members: tuple[str, ...]) -> None:
        self._proposal = (generation, members)
        self._proposed[generation] = members
        self._highest_generation = max(self._highest_generation, generation)
        self._delivered = set()

    def _send_proposal(self) -> None:
        """Send our proposal to every member that has not queued it yet, then try to install."""
        if self._proposal is None or self.view is not None:
            return
        generation, members = self._proposal
        propose = self._control(MessageKind.PROPOSE, {"generation": generation,
                                                      "members": list(members)})
        for member in members:
            if member != self.node_id and member not in self._delivered:
                if self._send(member, propose):
                    self._delivered.add(member)
        self._maybe_install()

    # messages -------------------------------------------------------------------------------

    def handle(self, message: Message) -> None:
        """Act on one control message; bad ones raise ProtocolError (the caller drops them)."""
        kind = message.header.kind
        if kind is MessageKind.HELLO:
            self._on_hello(message)
        elif kind is MessageKind.WELCOME:
            self._on_welcome(message)
        elif kind is MessageKind.PROPOSE:
            self._on_propose(message)

    def _on_hello(self, message: Message) -> None:
        body = decode_control(message.payload, {"id": str, "job": str, "protocol": int,
                                                "endpoint": str, "key": str, "proof": str},
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
        if self.transport.key is not None:
            if body["key"] != message.user or not hmac.compare_digest(
                    body["proof"], self._proof(peer_id, body["key"])):
                raise ProtocolError("hello.proof", "proof of the job key for the connection's "
                                    "CURVE key", "a proof that does not verify", message.origin)
            if self.mailbox.admitted.get(peer_id) not in (None, message.user):
                log.info("%s came back with a new key: a new incarnation, the old one is fenced "
                         "off", peer_id)
            self.mailbox.admitted[peer_id] = message.user
        peer = self.peers.setdefault(peer_id, PeerState())
        peer.heard = True
        peer.endpoint = self._reachable_endpoint(body["endpoint"], message)
        self.transport.reply(message.origin, self._control(MessageKind.WELCOME,
                                                           {"id": self.node_id}))
        links = self.transport.links()
        if peer_id not in links:
            probe = next((p for p in self._probes if links.get(p) == peer.endpoint), None)
            if probe is not None:
                self._probes.discard(probe)
                self.transport.rename_link(probe, peer_id)
            else:
                self.transport.connect(peer_id, peer.endpoint)

    def _reachable_endpoint(self, declared: str, message: Message) -> str:
        """The endpoint to dial back: the declared port at the address the HELLO came from,
        so a peer with several interfaces is reached on the one that actually works."""
        endpoint = normalize_endpoint(declared)
        if endpoint.startswith("tcp://") and message.peer_address:
            port = endpoint.rpartition(":")[2]
            return f"tcp://{message.peer_address}:{port}"
        return endpoint

    def _on_welcome(self, message: Message) -> None:
        body = decode_control(message.payload, {"id": str}, message.origin, "welcome")
        peer_id = body["id"]
        if not message.on_link or not 0 < len(peer_id) <= MAX_ID_LENGTH:
            raise ProtocolError("welcome", "a reply on one of our links", message.origin)
        if peer_id == self.node_id:
            # we dialled ourselves (e.g. the same address under another name)
            self._probes.discard(message.origin)
            self.transport.disconnect(message.origin)
            return
        if message.origin in self._probes:
            self._probes.discard(message.origin)
            self.transport.rename_link(message.origin, peer_id)
        self.peers.setdefault(peer_id, PeerState()).welcomed = True

    def _on_propose(self, message: Message) -> None:
        body = decode_control(message.payload, {"generation": int, "members": list},
                              message.origin, "propose")
        members = tuple(body["members"])
        if not all(isinstance(m, str) for m in members) or message.origin not in members:
            raise ProtocolError("propose.members", "a list of ids including the sender",
                                body["members"], message.origin)
        generation = body["generation"]
        self._highest_generation = max(self._highest_generation, generation)
        peer = self.peers.setdefault(message.origin, PeerState())
        peer.proposal = (generation, members)
        mine = self._proposal
        if self.view is None and mine is not None and mine[1] == members and generation > mine[0]:
            self._set_proposal(generation, members)  # same ring, higher number: adopt it
        self._send_proposal()

    def _maybe_install(self) -> None:
        if self.view is not None or self._proposal is None:
            return
        generation, members = self._proposal
        for member in members:
            if member != self.node_id:
                peer = self.peers.get(member)
                if member not in self._delivered or peer is None or peer.proposal != self._proposal:
                    return
        self.view = View(generation, members, members.index(self.node_id))
        log.info("node %s installed generation %d: %s", self.node_id, generation,
                 ", ".join(members))

    # helpers --------------------------------------------------------------------------------

    def _control(self, kind: MessageKind, body: dict) -> list[bytes]:
        payload = encode_control(body)
        header = Header(kind=kind, job=self.job, generation=self._highest_generation,
                        sequence=0, nbytes=len(payload))
        return [header.pack(), payload]

    def _proof(self, node_id: str, public_key: str) -> str:
        if self.transport.key is None:
            return ""
        return self.transport.key.derive(f"hello:{self.job_name}:{node_id}:{public_key}").hex()

    def _send(self, link: str, frames: list[bytes]) -> bool:
        try:
            return self.transport.try_send(link, frames) is not False
        except TransportError as exc:
            log.debug("send to %s failed: %s", link, exc)
            return False

