"""Dialling the candidate endpoints a node learns (``--peer``, adverts, WELCOMEs), within
budgets a stranger cannot exceed (:class:`~ringtrain.discovery.candidates.CandidateBook`).

A link dialled to a candidate is named by its endpoint, *unidentified*, until the node behind
it answers (its HELLO or WELCOME): then membership renames it to the peer's id or hangs it up.
A candidate unanswered for too long is hung up and backs off. A peer that said HELLO is dialled
back at the address it was seen at (:meth:`CandidateDialler.reachable_endpoint`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from ..comm.endpoints import normalize_endpoint, peer_endpoint
from ..comm.mailbox import Message
from ..comm.transport import Transport
from ..discovery.candidates import STATIC, CandidateBook
from ..errors import ConfigError, ProtocolError

log = logging.getLogger(__name__)


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

    def add(self, endpoints: Iterable[str], source: str = STATIC) -> None:
        """Dial these endpoints, within the book's budgets. ``source``: who told us of them
        (an advert, say); the user's own list by default. Endpoints that are not
        ``tcp://IP:PORT`` are refused, unless the user gave them."""
        valid = []
        for endpoint in list(endpoints)[: 4 * self.book.max_per_source]:
            try:
                valid.append(normalize_endpoint(endpoint) if source == STATIC
                             else peer_endpoint(endpoint))
            except ConfigError as exc:
                self.refused += 1
                if self.refused <= 3:
                    log.warning("node %s: ignoring a candidate from %s: %s", self.node_id,
                                source, exc)
        self.book.offer(valid, source, time.monotonic())
        self.dial_due()

    def dial_due(self) -> None:
        """Hang up expired unidentified links; dial the candidates whose turn it is."""
        now = time.monotonic()
        for endpoint in self.book.expire(now):
            if endpoint in self.unidentified:
                self.unidentified.discard(endpoint)
                self.transport.disconnect(endpoint)
        known = set(self.transport.links().values())
        for endpoint in self.book.due(now):
            if endpoint == self.transport.endpoint or endpoint in known:
                self.book.answered(endpoint)
                continue
            self.transport.connect(endpoint, endpoint, watch=True)
            self.unidentified.add(endpoint)
            known.add(endpoint)

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
