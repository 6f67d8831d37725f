"""The gate: which devices a node admits, and spreading revocations to every member.

Membership calls :meth:`Gate.admit` at one point, for every HELLO whose job-key proof and
CURVE key held: the device ledger (``comm.ledger``) decides. The node passes LEDGER messages
to :meth:`Gate.handle` and calls :meth:`Gate.tick` on every membership turn, which

* reloads the ledger file when ``ringtrain revoke`` changed it on this device;
* tells every linked peer the ledger's revocations and admissions, when they change, when a
  peer is newly linked, and every ``GOSSIP_INTERVAL`` seconds (so a member that was away
  learns them);
* acts on a revocation: the device's key is refused at the handshake from then on, a member
  holding it loses its admission and is suspected, so the ring re-forms without it at the
  next step, and a node that learns its own device was revoked stops with that cause.
"""

from __future__ import annotations

import logging
import time

from ..comm.identity import DeviceIdentity, device_fingerprint
from ..comm.ledger import Ledger
from ..comm.mailbox import Mailbox, Message
from ..comm.transport import Transport
from ..comm.wire import Header, MessageKind, decode_control, encode_control
from ..errors import SecurityError, TransportError
from ..membership.links import Links

log = logging.getLogger(__name__)

GOSSIP_INTERVAL = 5.0  # seconds between ledger messages to every linked peer
RELOAD_INTERVAL = 0.5  # seconds between looks at the ledger file


class Gate:
    """Admission and revocation for one node (see the module docstring).

    Args:
        device: this node's device identity.
        ledger: this node's device ledger of the job.
        transport, mailbox, membership: the node's parts it acts through.
        job: the job name (in messages).
    """

    def __init__(self, device: DeviceIdentity, ledger: Ledger, transport: Transport,
                 mailbox: Mailbox, membership: Links, job: str):
        self.device = device
        self.ledger = ledger
        self.transport = transport
        self.mailbox = mailbox
        self.membership = membership
        self.job = job
        self.node_id = membership.node_id
        self.refused: dict[str, int] = {}  # reason kind -> count of refused HELLOs
        self.revoked_self = False
        self._told: set[str] = set()  # peers told the current ledger
        self._last_gossip = 0.0
        self._last_reload = 0.0
        self._digest = ""
        transport.revoked_fingerprints.update(ledger.revoked)

    def admit(self, peer_id: str, public_key: str) -> str | None:
        """Membership's hook: None to admit device ``public_key`` as ``peer_id``, else why
        not (counted by kind, logged once per device and reason)."""
        refusal = self.ledger.check(peer_id, public_key)
        if refusal is not None:
            kind = refusal.split(" ", 1)[0] if "revoked" not in refusal else "revoked"
            kind = "id claimed" if "belongs to" in refusal else kind
            kind = "closed" if "closed" in refusal else kind
            self.refused[kind] = self.refused.get(kind, 0) + 1
        return refusal

    def handle(self, message: Message) -> None:
        """A LEDGER message from a member: take its revocations and admissions.

        Raises:
            ProtocolError: a malformed one (the caller counts it as the sender's offence).
        """
        body = decode_control(message.payload, {"revoked": list, "admitted": list},
                              message.origin, "ledger")
        news = self.ledger.merge(body["revoked"], body["admitted"])
        if news:
            log.warning("node %s: member %s says device(s) %s were revoked from job %r; "
                        "refusing them from now on", self.node_id, message.origin,
                        ", ".join(sorted(news)), self.job)
            self._apply(news)

    def tick(self) -> None:
        """Reload, spread and apply the ledger (see the module docstring).

        Raises:
            SecurityError: this device was revoked.
        """
        now = time.monotonic()
        if now - self._last_reload >= RELOAD_INTERVAL:
            self._last_reload = now
            if self.ledger.changed_on_disk():
                news = self.ledger.reload()
                if news:
                    log.warning("node %s: device(s) %s revoked on this device; telling every "
                                "member", self.node_id, ", ".join(sorted(news)))
                    self._apply(news)
        digest = repr(self.ledger.gossip())
        if digest != self._digest:
            self._digest, self._told = digest, set()
        if now - self._last_gossip >= GOSSIP_INTERVAL:
            self._last_gossip, self._told = now, set()
        peers = self.membership.protocol.peers
        linked = [p for p in sorted(self.membership.welcomed)
                  if p in peers and p in self.mailbox.admitted and p not in self._told]
        if linked and (self.ledger.revoked or self.ledger.admitted):
            frames = self._frames()
            for peer in linked:
                try:
                    if self.transport.try_send(peer, frames) is not False:
                        self._told.add(peer)
                except TransportError:
                    pass
        if self.revoked_self:
            raise self.revoked_error()

    def revoked_error(self) -> SecurityError:
        """Why this node stops: its own device was revoked."""
        return SecurityError(f"this device ({self.device.fingerprint}) was revoked from job "
                             f"{self.job!r}; a new device key is refused too while the job "
                             f"stays closed: ask a member to run `ringtrain revoke --admit "
                             f"<fingerprint>`")

    def _apply(self, news: set[str]) -> None:
        """Refuse the newly revoked devices everywhere."""
        self.transport.revoked_fingerprints.update(news)
        if self.device.fingerprint in news:
            self.revoked_self = True
        frames = self._frames()
        for member, key in list(self.mailbox.admitted.items()):
            if device_fingerprint(key) in news:
                del self.mailbox.admitted[member]
                # its messages are refused from now on (not admitted); the next view drops it
                self.membership.protocol.suspect(member, "its device was revoked")
                try:  # tell it too, so that it stops with the cause
                    self.transport.try_send(member, frames)
                except TransportError:
                    pass

    def _frames(self) -> list[bytes]:
        payload = encode_control(self.ledger.gossip())
        header = Header(kind=MessageKind.LEDGER, job=self.mailbox.job, generation=0,
                        sequence=0, nbytes=len(payload))
        return [header.pack(), payload]

    def state(self) -> dict[str, object]:
        """For diagnostics."""
        return {"device": self.device.fingerprint, "incarnation": self.device.incarnation,
                "revoked": sorted(self.ledger.revoked), "closed": self.ledger.closed,
                "refused": dict(self.refused)}


def is_ledger(message: Message) -> bool:
    """Whether a control message is the gate's."""
    return message.header.kind is MessageKind.LEDGER

