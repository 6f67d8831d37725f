"""Where a node hears of peers besides the addresses it was given: mDNS / DNS-SD adverts (it
announces itself too), a DNS name looked up again and again, and the peers it was given by
host name, resolved again and again. What they find are candidates to dial
only: the key handshake decides who is a peer."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..comm.identity import device_fingerprint
from ..comm.wire import PROTOCOL_VERSION
from ..discovery.advert import Advert
from ..discovery.candidates import STATIC
from ..discovery.dns import DnsPeers
from ..discovery.interfaces import usable_ipv4_addresses
from ..discovery.mdns import Announcer, Browser, Discovery
from ..discovery.names import NamedPeers
from ..membership.protocol import View
from .wrong_key import WrongKeyDetector

AddCandidates = Callable[..., None]  # Node.add_candidates(endpoints, source=...)


class PeerSources:
    """A node's mDNS discovery and DNS lookups, started on request and closed together."""

    def __init__(self, node_id: str, job: str, endpoint: str, add_candidates: AddCandidates):
        self.node_id = node_id
        self.job = job
        self.port = int(endpoint.rpartition(":")[2])
        self.add_candidates = add_candidates
        self._dns: DnsPeers | None = None
        self._names: NamedPeers | None = None
        self._discovery: Discovery | None = None
        self._announcer: Announcer | None = None
        self._browser: Browser | None = None
        self._closed = False

    def discover(self, interface: str | None, fingerprint: str,
                 wrong_key: WrongKeyDetector | None,
                 on_view_change: Callable[[Callable[[View], None]], None],
                 device_key: str = "") -> None:
        """Announce ourselves (with our ``device_key``) and dial every advert of our job that
        carries our key's ``fingerprint``, pinned to the device it names (adverts are hints;
        the door and the handshake decide). Adverts under another fingerprint are evidence
        for ``wrong_key``."""
        addresses = usable_ipv4_addresses(interface)
        self._discovery = Discovery(addresses)

        def on_change(event: str, advert: Advert) -> None:
            if (event != "removed" and wrong_key is not None and advert.job == self.job
                    and advert.protocol == PROTOCOL_VERSION and advert.node_id != self.node_id):
                wrong_key.saw_advert(advert.node_id, advert.addresses, advert.port,
                                     advert.key_fingerprint, time.monotonic())
            if (event != "removed" and advert.node_id != self.node_id
                    and advert.key_fingerprint == fingerprint
                    and advert.protocol == PROTOCOL_VERSION):
                pin = f"{device_fingerprint(advert.device_key)}@" if advert.device_key else ""
                self.add_candidates([f"{pin}{address}:{advert.port}"
                                     for address in advert.addresses],
                                    source=f"advert:{advert.node_id}")

        self._browser = self._discovery.browse(job=self.job, on_change=on_change)
        self._announcer = self._discovery.announce(Advert(
            self.node_id, self.job, tuple(addresses), self.port, PROTOCOL_VERSION, fingerprint,
            0, "forming", device_key=device_key))

        def advertise(view: View) -> None:
            if self._announcer is not None and not self._closed:
                self._announcer.update(generation=view.generation, state="training")

        on_view_change(advertise)

    def look_up(self, name: str, interval: float) -> None:
        """Dial the peers DNS lists under ``name``, looked up every ``interval`` seconds
        (:mod:`ringtrain.discovery.dns`)."""
        self._dns = DnsPeers(name, self.port, self.add_candidates, interval=interval)

    def resolve(self, names: list[tuple[str, int]]) -> None:
        """Dial the addresses of the peers the user gave by host name (``--peer node1:7077``),
        as the user's own list (:mod:`ringtrain.discovery.names`)."""
        self._names = NamedPeers(names, lambda endpoints: self.add_candidates(
            endpoints, source=STATIC))

    def dns_endpoints(self) -> list[str] | None:
        """The endpoints DNS listed last (None: no DNS name to look up)."""
        return None if self._dns is None else list(self._dns.endpoints)

    def close(self) -> None:
        """Stop looking up and browsing, and say goodbye for our advert."""
        self._closed = True
        if self._names is not None:
            self._names.close()
        if self._dns is not None:
            self._dns.close()
        if self._discovery is not None:
            if self._announcer is not None:
                self._announcer.close()  # says goodbye for our advert
            if self._browser is not None:
                self._browser.close()
            self._discovery.close()
