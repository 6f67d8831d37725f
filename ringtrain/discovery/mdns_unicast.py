"""Ask one host's mDNS responder directly, by unicast: the doctor's test for multicast dropped
on the way ("why can't I see my peer").
"""

from __future__ import annotations

import socket
import time

from zeroconf import DNSIncoming, DNSOutgoing, DNSPointer, DNSQuestion
from zeroconf.const import _CLASS_IN as _DNS_CLASS_IN
from zeroconf.const import _FLAGS_QR_QUERY, _TYPE_PTR

from ..errors import TransportError
from .mdns import MAX_ADVERTS, SERVICE_TYPE


def unicast_query(address: str, timeout: float, port: int = 5353) -> list[str]:
    """Ask the mDNS responder at ``address`` directly, by unicast (a "legacy unicast" query
    from an ephemeral port, RFC 6762 section 6.7), which ringtrain services it has: their
    instance names. An answer here while multicast brings nothing means multicast is
    dropped on the way (a firewall, or a Wi-Fi access point isolating its clients).

    Raises:
        TransportError: the query could not be sent (no route to ``address``).
    """
    query = DNSOutgoing(_FLAGS_QR_QUERY)
    query.add_question(DNSQuestion(SERVICE_TYPE, _TYPE_PTR, _DNS_CLASS_IN))
    names: list[str] = []
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(query.packets()[0], (address, port))
        except OSError as exc:
            raise TransportError(f"cannot send an mDNS query to {address}:{port}: {exc}") \
                from exc
        while time.monotonic() < deadline and not names:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data, _ = sock.recvfrom(9000)
            except (TimeoutError, OSError):
                break
            try:
                message = DNSIncoming(data)
            except Exception:  # noqa: BLE001 - hostile input: ignore what does not parse
                continue
            names += [r.alias for r in message.answers()
                      if isinstance(r, DNSPointer) and r.name.lower() == SERVICE_TYPE.lower()]
    return names[:MAX_ADVERTS]
