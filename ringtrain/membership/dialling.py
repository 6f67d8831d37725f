"""Dialling the candidate endpoints a node learns (``--peer``, adverts, WELCOMEs), within
budgets a stranger cannot exceed (:class:`~ringtrain.discovery.candidates.CandidateBook`).

On a keyed ring every node listens with its own device key, so a candidate is dialled only
once its key is known: its door (``comm.door``) is asked first, and the key it answers is
checked against the device the candidate was pinned to (``FINGERPRINT@IP:PORT``: by the user,
an advert or a WELCOME) and against the revoked devices. A link dialled to a candidate is
named by its endpoint, *unidentified*, until the node behind it answers (its HELLO or
WELCOME): then membership renames it to the peer's id or hangs it up. A candidate unanswered
for too long (door or link) is hung up and backs off. A peer that said HELLO is dialled back
at the address it was seen at (:meth:`CandidateDialler.reachable_endpoint`), with the key its
handshake proved.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from ..comm.door import DoorClient, DoorReply
from ..comm.endpoints import normalize_endpoint, peer_endpoint, split_pin
from ..comm.identity import device_fingerprint
from ..comm.mailbox import Message
from ..comm.transport import Transport
from ..discovery.candidates import STATIC, CandidateBook
from ..errors import ConfigError, ProtocolError

log = logging.getLogger(__name__)

ASK_AGAIN_S = 1.0  # a door unanswered this long is asked again (UDP may lose an ask)
WRONG_ANSWER_S = 5.0  # a door that answered wrongly is asked again this much later (if the
# probe has not expired by then: the user's own endpoints never do)
MAX_PINS = 4  # devices pinned to one endpoint by sources other than the user
MAX_NEWS = 64  # endpoints whose door said something wrong, kept for ``node.wrong_key``


class CandidateDialler:
    """The candidates of one node and the unidentified links dialled to them.

    Args:
        node_id: this node's id (for logs).
        transport: the node's sockets.
    """

    def __init__(self, node_id: str, transport: Transport):
        self.node_id = node_id
        self.transport = transport
        self.book = CandidateBook()
        self.refused = 0  # candidate endpoints refused as malformed
        self.unidentified: set[str] = set()  # links named by endpoint, not identified yet
        self.door = (DoorClient(transport.key, transport.public_key)
                     if transport.key is not None else None)
        self.asking: dict[str, float] = {}  # endpoint -> when its door was last asked
        self.pins: dict[str, set[str]] = {}  # endpoint -> device fingerprints allowed there
        self.strict: set[str] = set()  # endpoints the user pinned: only the user's pin holds
        # endpoint -> ("job", their job key fingerprint) or ("device", "wanted found")
        self.news: dict[str, tuple[str, str]] = {}
        self._logged: set[str] = set()

    def add(self, endpoints: Iterable[str], source: str = STATIC) -> None:
        """Dial these endpoints, within the book's budgets. ``source``: who told us of them
        (an advert, say); the user's own list by default. Endpoints that are not
        ``tcp://IP:PORT`` are refused, unless the user gave them; ``FINGERPRINT@`` before
        one pins the device that must listen there."""
        valid = []
        for text in list(endpoints)[: 4 * self.book.max_per_source]:
            try:
                pin, endpoint = split_pin(text)
                endpoint = (normalize_endpoint(endpoint) if source == STATIC
                            else peer_endpoint(endpoint))
                self._pin(endpoint, pin, source)
                valid.append(endpoint)
            except ConfigError as exc:
                self.refused += 1
                if self.refused <= 3:
                    log.warning("node %s: ignoring a candidate from %s: %s", self.node_id,
                                source, exc)
        self.book.offer(valid, source, time.monotonic())
        self.dial_due()

    def _pin(self, endpoint: str, pin: str, source: str) -> None:
        if source == STATIC:
            self.strict.discard(endpoint)
            self.pins.pop(endpoint, None)
            if pin:
                self.strict.add(endpoint)
                self.pins[endpoint] = {pin}
        elif pin and endpoint not in self.strict and len(self.pins) < self.book.max_known:
            pins = self.pins.setdefault(endpoint, set())
            if len(pins) < MAX_PINS:
                pins.add(pin)

    def dial_due(self) -> None:
        """Hang up expired probes; dial the candidates whose door answered; ask the doors of
        the candidates whose turn it is (or dial them at once on an insecure ring)."""
        now = time.monotonic()
        for endpoint in self.book.expire(now):
            if self.asking.pop(endpoint, None) is not None and self.door is not None:
                self.door.forget(endpoint)
            if endpoint in self.unidentified:
                self.unidentified.discard(endpoint)
                self.transport.disconnect(endpoint)
        if self.door is not None:
            for reply in self.door.replies():
                if reply.endpoint in self.asking and not self._on_reply(reply):
                    self.asking[reply.endpoint] = now + WRONG_ANSWER_S - ASK_AGAIN_S
            for endpoint, asked in self.asking.items():
                if now - asked >= ASK_AGAIN_S:
                    self.asking[endpoint] = now
                    self.door.ask(endpoint)
        known = set(self.transport.links().values())
        for endpoint in self.book.due(now):
            if endpoint == self.transport.endpoint or endpoint in known:
                self.book.answered(endpoint)
            elif self.door is None:
                self._dial(endpoint, "")
                known.add(endpoint)
            elif self.door.ask(endpoint):
                self.asking[endpoint] = now
            else:
                self._note(endpoint, f"{endpoint} has no key door (not tcp://IP:PORT): "
                           f"a keyed node cannot dial it")

    def _dial(self, endpoint: str, key: str) -> None:
        self.transport.connect(endpoint, endpoint, watch=True, server_key=key or None)
        self.unidentified.add(endpoint)

    def _on_reply(self, reply: DoorReply) -> bool:
        """A door answered: dial the device it named. Returns False if it refused us, or named
        a revoked device or another than the one pinned there (then the probe expires and
        backs off, or the door is asked again later)."""
        endpoint = reply.endpoint
        if not reply.key:
            self._tell(endpoint, ("job", reply.other_job))
            return False
        found = device_fingerprint(reply.key)
        pins = self.pins.get(endpoint)
        if found in self.transport.revoked_fingerprints:
            self._note(endpoint, f"node {self.node_id}: {endpoint} answers as device {found}, "
                       f"which is revoked: not dialling it")
            return False
        if pins and found not in pins:
            wanted = "/".join(sorted(pins))
            self._tell(endpoint, ("device", f"{wanted} {found}"))
            self._note(endpoint, f"node {self.node_id}: {endpoint} answers as device {found}, "
                       f"not {wanted} as {'given' if endpoint in self.strict else 'announced'}: "
                       f"not dialling it")
            return False
        del self.asking[endpoint]
        if endpoint in self.transport.links().values():
            self.book.answered(endpoint)  # linked meanwhile (it dialled us, we dialled back)
        else:
            self.transport.introduce(reply.key)  # so that it may dial us back
            self._dial(endpoint, reply.key)
        return True

    def _tell(self, endpoint: str, news: tuple[str, str]) -> None:
        if endpoint in self.news or len(self.news) < MAX_NEWS:
            self.news[endpoint] = news

    def _note(self, endpoint: str, text: str) -> None:
        if endpoint not in self._logged and len(self._logged) < MAX_NEWS:
            self._logged.add(endpoint)
            log.warning("%s", text)

    def close(self) -> None:
        """Close the door client's sockets."""
        if self.door is not None:
            self.door.close()

    def answered(self, link: str) -> None:
        """The node behind unidentified link ``link`` answered: the link is the caller's to
        rename or hang up, and the candidate is done."""
        self.unidentified.discard(link)
        self.book.answered(link)

    def link_to(self, endpoint: str) -> str | None:
        """The unidentified link dialled to ``endpoint``, if there is one."""
        links = self.transport.links()
        return next((link for link in self.unidentified if links.get(link) == endpoint), None)

    def reachable_endpoint(self, declared: str, message: Message) -> str:
        """Where to dial a peer that said HELLO: the port it declared, at the address it was
        seen at. A peer listening on every address declares 0.0.0.0 (``ringtrain node`` with
        discovery), so the unspecified address passes here; a message that came back over a
        link we dialled was seen at that link's address.

        Raises:
            ProtocolError: the declared endpoint is not ``tcp://IP:PORT``.
        """
        seen = message.peer_address
        if not seen and message.on_link:
            dialled = self.transport.links().get(message.origin, "")
            seen = dialled.removeprefix("tcp://").rpartition(":")[0]
        try:
            endpoint = peer_endpoint(declared, allow_unspecified=True)
        except ConfigError as exc:
            raise ProtocolError("hello.endpoint", "tcp://IP:PORT", str(exc),
                                message.origin) from None
        if endpoint.startswith("tcp://") and seen:
            return f"tcp://{seen}:{endpoint.rpartition(':')[2]}"
        return endpoint
