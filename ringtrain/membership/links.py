"""Membership over the node's sockets: links, HELLO/WELCOME, and the wire form of the protocol.

:class:`Links` owns everything of membership that touches I/O, so that ``protocol`` stays a
pure state machine. Driven by the node's engine thread: call :meth:`Links.tick` often and
:meth:`Links.handle` for every control message. Dialling the candidates it learns is
:mod:`.dialling`'s.

Links. A node dials every candidate endpoint it learns (static ``--peer`` list or mDNS adverts)
and sends HELLO {id, job, protocol, endpoint, key, proof, schema, incarnation, host}. On a
keyed ring ``key`` is the CURVE public key of that connection and ``proof`` an HMAC of (job,
id, key, incarnation) under the job key; the receiver admits the key for that id only if the
proof holds and CURVE authenticated that key. The receiver answers WELCOME on the same
connection and dials back the address the HELLO came from (so a multi-homed peer is reached on
the interface that works, whatever it advertised), with the key the HELLO's handshake proved:
every node listens with its device key, so that link reaches only that device. The WELCOME
lists where the live peers it knows listen, each pinned to its device
(``FINGERPRINT@tcp://IP:PORT``), and the newcomer dials them too (candidates from that peer,
within the same budgets), so a node given one ``--peer`` reaches every member. A link named
after a peer always dials the device key membership admitted for it: a HELLO proving another
key replaces the link, and a WELCOME from a device its id does not belong to is refused.
``host`` names the sender's shared-memory beacon (``comm.shm``): a receiver that can read it
shares the host with the sender.

Incarnations. ``incarnation`` is the device's boot counter on keyed rings (``comm.identity``:
a clock step cannot fence a restart off), else the process's start time in nanoseconds: a
restart has a higher one. A HELLO with a lower one than already seen is refused (a stopped
old process that woke up); a higher one retires the old process at once (``protocol``), and
the link to it is closed and dialled anew, so nothing is ever sent to a replaced process over
an old connection.

Wire form. Heartbeats travel as HEARTBEAT, a leave as LEAVE, every agreement message as
PROPOSE; the JSON body is ``messages.to_body`` of the message.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Iterable

from ..comm.identity import derives_from, device_fingerprint, looks_derived
from ..comm.mailbox import Mailbox, Message
from ..comm.shm import SharedMemoryLanes
from ..comm.transport import Transport
from ..comm.wire import PROTOCOL_VERSION, Header, MessageKind, decode_control, encode_control
from ..discovery.candidates import STATIC, CandidateBook
from ..errors import ProtocolError, TransportError
from .dialling import CandidateDialler
from .messages import MAX_ID_LENGTH, MAX_MEMBERS, Heartbeat, Leave, from_body, to_body
from .protocol import Membership, MembershipConfig, View

log = logging.getLogger(__name__)

RESEND_INTERVAL = 0.1  # seconds between repeated HELLOs while unanswered

__all__ = ["Links", "View"]


class Links:
    """Membership of one node on its transport (module docstring).

    Args:
        node_id, job_name, job: who we are and which job (name and 64-bit id).
        transport, mailbox: the node's sockets and message sorting.
        config: sizes and timing of the protocol.
        schema: what members must share; a node with another schema is refused at HELLO.
        lanes: this node's shared-memory lanes, or None.
    """

    def __init__(self, node_id: str, job_name: str, job: int, transport: Transport,
                 mailbox: Mailbox, config: MembershipConfig, schema: str = "",
                 lanes: SharedMemoryLanes | None = None, incarnation: int | None = None):
        self.node_id = node_id
        self.job_name = job_name
        self.job = job
        self.transport = transport
        self.mailbox = mailbox
        self.schema = schema
        self.lanes = lanes
        self.incarnation = time.time_ns() if incarnation is None else incarnation
        self.protocol = Membership(node_id, self.incarnation, config)
        # candidates to dial, within budgets a stranger cannot exceed (discovery.candidates)
        self.dialler = CandidateDialler(node_id, transport)
        # the device check (``node.gate``): (node id, proven CURVE key) -> None, or why it
        # is refused; called for every HELLO whose job-key proof holds
        self.admit: Callable[[str, str], str | None] | None = None
        self.refusal = ""  # why a peer refused us (a schema mismatch): joining cannot succeed
        self._welcomed: set[str] = set()  # peers that answered our HELLO on our link
        self._last_resend = 0.0

    # what the node reads ---------------------------------------------------------------------

    @property
    def view(self) -> View | None:
        """The installed view (None before the first)."""
        return self.protocol.view

    @property
    def installs(self) -> int:
        """Grows with every view installed."""
        return self.protocol.installs

    def state(self) -> dict[str, object]:
        """A printable summary (plain data), for hang diagnostics and ``ringtrain peers``."""
        summary = self.protocol.state(time.monotonic())
        summary["probes"] = sorted(self.dialler.unidentified)
        summary["incarnation"] = self.incarnation
        return summary

    # inputs ----------------------------------------------------------------------------------

    @property
    def welcomed(self) -> set[str]:
        """Peers that answered our HELLO on our link to them."""
        return self._welcomed

    def add_candidates(self, endpoints: Iterable[str], source: str = STATIC) -> None:
        """Dial these endpoints and introduce ourselves there (see
        :meth:`CandidateDialler.add`)."""
        self.dialler.add(endpoints, source)

    @property
    def candidates(self) -> CandidateBook:
        """The candidates to dial and their budgets."""
        return self.dialler.book

    def alone(self) -> None:
        """Install a ring of this node alone (a job of one)."""
        self.protocol.start_alone(time.monotonic())

    def tick(self) -> None:
        """Protocol timers, then HELLOs to whoever has not answered yet."""
        now = time.monotonic()
        self.protocol.tick(now)
        self._flush()
        if now - self._last_resend >= RESEND_INTERVAL:
            self._last_resend = now
            self.dialler.dial_due()
            self._hello_unlinked()

    def handle(self, message: Message) -> None:
        """Act on one control message; bad ones raise ProtocolError (the caller drops them)."""
        kind = message.header.kind
        if kind is MessageKind.HELLO:
            self._on_hello(message)
        elif kind is MessageKind.WELCOME:
            self._on_welcome(message)
        else:
            state = self.protocol.peers.get(message.origin)
            if state is None:
                raise ProtocolError("sender", "a peer that said HELLO first", message.origin,
                                    message.origin)
            if kind is MessageKind.HEARTBEAT or kind is MessageKind.PROPOSE:
                body = decode_control(message.payload, {"type": str}, message.origin,
                                      "membership")
                decoded = from_body(body, message.origin)
                if isinstance(decoded, Heartbeat) != (kind is MessageKind.HEARTBEAT):
                    raise ProtocolError("membership.type", kind.name.lower(), body["type"],
                                        message.origin)
            elif kind is MessageKind.LEAVE:
                decoded = Leave()
            else:
                raise ProtocolError("kind", "a control message", kind.name, message.origin)
            self.protocol.receive(message.origin, state.incarnation, decoded, time.monotonic())
        self._flush()

    def prepare_leave(self) -> None:
        """Take no part in view changes from now on, and send the heartbeat saying so now."""
        self.protocol.prepare_leave()
        self.tick()

    def leave(self, outsiders_only: bool = False) -> None:
        """Tell every linked peer that we leave (best effort, before closing); only those
        outside our view with ``outsiders_only`` (:meth:`Membership.leave_outsiders`)."""
        (self.protocol.leave_outsiders if outsiders_only else self.protocol.leave)()
        self._flush()

    # the wire --------------------------------------------------------------------------------

    def _flush(self) -> None:
        """Send what the protocol wants sent; close links to replaced processes."""
        links = self.transport.links()
        for send in self.protocol.take_sends():
            if send.to not in links or send.to not in self._welcomed:
                # not dialled, or it has not admitted our HELLO yet (it would drop the message
                # as unauthenticated, and count it against us): the protocol repeats itself
                continue
            message = send.message
            kind = (MessageKind.HEARTBEAT if isinstance(message, Heartbeat) else
                    MessageKind.LEAVE if isinstance(message, Leave) else MessageKind.PROPOSE)
            body = {"id": self.node_id} if kind is MessageKind.LEAVE else to_body(message)
            self._send(send.to, self._control(kind, body))
        for peer in self.protocol.take_retired():
            # the process behind this id is gone: drop its link (and whatever it queues)
            # rather than let libzmq reconnect an old connection to whoever holds that port
            self.transport.disconnect(peer)
            self._welcomed.discard(peer)
            if self.lanes is not None:
                self.lanes.forget(peer)

    def _hello_unlinked(self) -> None:
        public_key = self.transport.public_key.decode()
        hello = self._control(MessageKind.HELLO, {
            "id": self.node_id, "job": self.job_name, "protocol": PROTOCOL_VERSION,
            "endpoint": self.transport.endpoint, "key": public_key,
            "proof": self._proof(self.node_id, public_key, self.incarnation),
            "schema": self.schema, "incarnation": self.incarnation,
            "host": self.lanes.beacon if self.lanes is not None else ""})
        for link in self.transport.links():
            if link in self.dialler.unidentified or link not in self._welcomed:
                self._send(link, hello)

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
                                               hmac.compare_digest(  # as bytes: any text
                                                   body["proof"].encode(), self._proof(
                                                       peer_id, body["key"],
                                                       incarnation).encode())):
            raise ProtocolError("hello.proof", "proof of the job key for the connection's "
                                "CURVE key", "a proof that does not verify", message.origin)
        # the device check, before anything of the peer's state changes (an impostor's HELLO
        # must not retire the incarnation of the device whose id it claims)
        refusal = self.admit(peer_id, message.user) \
            if self.admit is not None and self.transport.key is not None else None
        if refusal is not None:
            raise ProtocolError("hello.device", "an admitted device", refusal, message.origin)
        known = self.protocol.peers.get(peer_id)
        if known is not None and incarnation < known.incarnation:
            # an older process under a live id (say, one that was stopped and woke up)
            raise ProtocolError("hello.incarnation", f"at least {known.incarnation}: "
                                f"{peer_id} restarted and its old incarnation is fenced off",
                                incarnation, message.origin)
        if body["schema"] != self.schema:
            refusal = (f"node {self.node_id} refuses {peer_id}: it trains schema "
                       f"{body['schema'] or '(none)'}, this ring trains "
                       f"{self.schema or '(none)'} (different model, data or settings)")
            if self.transport.key is not None:
                self.mailbox.admitted[peer_id] = message.user  # so the refusal can be sent
            self.transport.reply(message.origin, self._control(MessageKind.WELCOME, {
                "id": self.node_id, "generation": 0, "members": [], "refused": refusal}))
            raise ProtocolError("hello.schema", self.schema or "(none)",
                                body["schema"] or "(none)", message.origin)
        restarted = known is not None and incarnation > known.incarnation
        if self.lanes is not None:
            if restarted:
                self.lanes.forget(peer_id)
            self.lanes.verify(peer_id, body["host"])
        if self.transport.key is not None:
            self.mailbox.admitted[peer_id] = message.user
        endpoint = self.dialler.reachable_endpoint(body["endpoint"], message)
        self.protocol.hello(peer_id, incarnation, endpoint, time.monotonic())
        view = self.protocol.view
        self.transport.reply(message.origin, self._control(MessageKind.WELCOME, {
            "id": self.node_id, "generation": view.generation if view else 0,
            "members": list(view.members) if view else [],
            "peers": self._peer_endpoints(peer_id)}))
        links = self.transport.links()
        if restarted or links.get(peer_id) != endpoint or \
                self.transport.link_key(peer_id) != message.user:
            probe = self.dialler.link_to(endpoint)
            if probe is not None and self.transport.link_key(probe) == message.user:
                self.dialler.answered(probe)
                self.transport.rename_link(probe, peer_id)
            else:
                # a fresh link for a fresh process: never reuse one that knew the old one
                self.transport.disconnect(peer_id)
                self.transport.connect(peer_id, endpoint, server_key=message.user or None)
            self._welcomed.discard(peer_id)

    def _peer_endpoints(self, other_than: str) -> list[str]:
        """Where the live peers we know listen (for a newcomer that knows only us: it dials
        them too, so that a ring whose members were given one ``--peer`` each is still a
        full mesh)."""
        now = time.monotonic()
        return [_pinned(state.endpoint, self.mailbox.admitted.get(peer))
                for peer, state in sorted(self.protocol.peers.items())
                if peer != other_than and state.endpoint
                and self.protocol.alive(peer, now)][:MAX_MEMBERS]

    def _on_welcome(self, message: Message) -> None:
        body = decode_control(message.payload, {"id": str, "generation": int, "members": list},
                              message.origin, "welcome")
        peer_id = body["id"]
        if not message.on_link or not 0 < len(peer_id) <= MAX_ID_LENGTH:
            raise ProtocolError("welcome", "a reply on one of our links", message.origin)
        if len(body["members"]) > MAX_MEMBERS:
            raise ProtocolError("welcome.members", f"at most {MAX_MEMBERS}",
                                len(body["members"]), message.origin)
        if peer_id == self.node_id:  # we dialled ourselves under another address
            self.dialler.answered(message.origin)
            self.transport.disconnect(message.origin)
            return
        refused = body.get("refused")
        if isinstance(refused, str) and refused:
            if self.refusal != refused:
                log.error("%s", refused)
            self.refusal = refused[:500]
            return
        key, bound = self.transport.link_key(message.origin), self.mailbox.admitted.get(peer_id)
        if key and (bound not in (None, key) or
                    (looks_derived(peer_id) and not derives_from(peer_id, key))):
            # a device answering under an id that is another device's
            raise ProtocolError("welcome.id", f"an id of device {device_fingerprint(key)}",
                                peer_id, message.origin)
        if message.origin in self.dialler.unidentified:
            self.dialler.answered(message.origin)
            if peer_id in self._welcomed and peer_id in self.transport.links():
                # another of its addresses answered first: keep that one
                self.transport.disconnect(message.origin)
                return
            self.transport.rename_link(message.origin, peer_id)
        elif message.origin != peer_id:
            return  # a reply on a link that has since been renamed or replaced
        self._welcomed.add(peer_id)
        peers = body.get("peers", [])
        if not isinstance(peers, list) or len(peers) > MAX_MEMBERS \
                or not all(isinstance(p, str) for p in peers):
            raise ProtocolError("welcome.peers", f"at most {MAX_MEMBERS} endpoints",
                                repr(peers)[:100], message.origin)
        if peers:
            self.add_candidates(peers, source=f"welcome from {peer_id}")

    def _control(self, kind: MessageKind, body: dict) -> list[bytes]:
        payload = encode_control(body)
        view = self.protocol.view
        header = Header(kind=kind, job=self.job, generation=view.generation if view else 0,
                        sequence=0, nbytes=len(payload))
        return [header.pack(), payload]

    def _proof(self, node_id: str, public_key: str, incarnation: int) -> str:
        if self.transport.key is None:
            return ""
        return self.transport.key.derive(
            f"hello:{self.job_name}:{node_id}:{public_key}:{incarnation}").hex()

    def _send(self, link: str, frames: list[bytes]) -> bool:
        """Queue a message on a link (best effort: delivery is for the protocol to learn
        from answers, never from a send that did not fail)."""
        try:
            return self.transport.try_send(link, frames) is not False
        except TransportError as exc:
            log.debug("send to %s failed: %s", link, exc)
            return False


def _pinned(endpoint: str, key: str | None) -> str:
    """``endpoint`` pinned to the device whose public key is ``key`` (as is without one)."""
    return f"{device_fingerprint(key)}@{endpoint}" if key else endpoint
