"""Find the other nodes of a job in DNS: the records of one name, read again as they change.

Where multicast does not pass (a Kubernetes pod network, a cloud VPC, a VPN), a name can list
the peers instead: a Kubernetes headless Service answers an A query for its name with the
address of every pod behind it, and an SRV query for ``_<port>._tcp.<name>`` with one record
(target and port) per pod. :class:`DnsPeers` asks again every few seconds, so pods that come
and go are seen without a restart; it reports the endpoints that appeared since the last
answer. Like an mDNS advert, an answer is only a list of addresses to dial: the key handshake
decides who is a peer, so a wrong or spoofed answer costs at most failed connections.

This is the only module that imports dnspython (the ``dns`` extra); its errors become
:class:`~ringtrain.errors.TransportError` or :class:`~ringtrain.errors.ConfigError` here. We
use dnspython rather than the C library's ``getaddrinfo``: that gives A records only (no SRV,
so no per-pod ports), no TTL to pace the next lookup by, and no bound on how long one lookup
blocks; dnspython gives all three, and tells "no such name" from "no server answered", so
the user is told which.

    peers = DnsPeers("ringtrain.default.svc.cluster.local", 7077, node.add_candidates)
    ...
    peers.close()
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from ringtrain.errors import ConfigError, TransportError

try:
    import dns.exception
    import dns.rdatatype
    import dns.resolver
except ImportError:  # the optional extra is missing: DnsPeers says how to install it
    dns = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

MAX_PEERS = 256
"""Endpoints kept from one answer; a larger answer is cut (and logged once)."""
DEFAULT_INTERVAL_S = 5.0
"""Longest wait between lookups (CoreDNS serves Kubernetes records with a 5 s TTL)."""
MIN_INTERVAL_S = 1.0
"""Shortest wait between lookups, whatever TTL the server gives."""
LOOKUP_TIMEOUT_S = 3.0
"""Longest one lookup (every server and retry of it) may take."""

_LABEL_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?")


@dataclass(frozen=True)
class Answer:
    """One lookup: the endpoints found, sorted, and how long the server said they hold."""

    endpoints: tuple[str, ...]
    ttl: float


def check_name(name: str) -> str:
    """``name`` if it is a DNS name ringtrain can look up (labels of letters, digits, ``-``
    and ``_``, at most 253 characters), without a trailing dot.

    Raises:
        ConfigError: it is not.
    """
    if not isinstance(name, str):
        raise ConfigError(f"a DNS name must be text, got {name!r}")
    bare = name[:-1] if name.endswith(".") else name
    if not 0 < len(bare) <= 253 or not all(_LABEL_RE.fullmatch(part)
                                           for part in bare.split(".")):
        raise ConfigError(f"{name!r} is not a DNS name (like ringtrain.default.svc.cluster.local"
                          f" or _ringtrain._tcp.ringtrain)")
    return bare


def _resolver(timeout: float) -> dns.resolver.Resolver:
    if dns is None:
        raise ConfigError("peers from DNS need dnspython: pip install 'ringtrain[dns]'")
    try:
        resolver = dns.resolver.Resolver(configure=True)  # /etc/resolv.conf: servers, search
    except (dns.exception.DNSException, OSError) as exc:
        raise ConfigError(f"cannot read the resolver configuration: {exc}") from exc
    resolver.lifetime = timeout
    return resolver


def lookup(name: str, port: int, resolver: dns.resolver.Resolver) -> Answer:
    """The endpoints ``name`` lists now.

    A name whose first label starts with ``_`` (``_ringtrain._tcp.ringtrain``) is asked for
    SRV records, each target's address joined with the record's port; any other name for A
    records, each joined with ``port``. The resolver's search list applies (a short Service
    name works inside its namespace, as in a pod's ``/etc/resolv.conf``).

    Returns:
        The endpoints (``host:port``, IPv4) and the answer's TTL. A name that does not exist
        (yet) or has no records gives no endpoints.

    Raises:
        TransportError: no server answered in time, or every server failed; the message
            names the servers.
    """
    srv = name.split(".", 1)[0].startswith("_")
    try:
        if not srv:
            answer = resolver.resolve(name, "A", search=True)
            return Answer(_capped(name, {f"{r.address}:{port}" for r in answer}),
                          float(answer.rrset.ttl))
        answer = resolver.resolve(name, "SRV", search=True)
        ttl = float(answer.rrset.ttl)
        glue = _glue(answer.response)
        endpoints: set[str] = set()
        for record in list(answer)[:MAX_PEERS]:
            target = record.target.to_text()
            addresses = glue.get(target.lower())
            if addresses is None:  # not in the additional section: ask for it
                try:
                    found = resolver.resolve(target, "A", search=False)
                except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                    continue  # a pod that just went away
                addresses = [r.address for r in found]
                ttl = min(ttl, float(found.rrset.ttl))
            endpoints.update(f"{address}:{record.port}" for address in addresses)
        return Answer(_capped(name, endpoints), ttl)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return Answer((), 0.0)
    except (dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout,
            dns.exception.DNSException) as exc:
        raise TransportError(f"DNS lookup of {name!r} via {', '.join(resolver.nameservers)} "
                             f"failed: {exc}") from exc


def _glue(response: object) -> dict[str, list[str]]:
    """A records of the additional section by owner name (lower case, with the dot)."""
    glue: dict[str, list[str]] = {}
    for rrset in getattr(response, "additional", []):
        if rrset.rdtype == dns.rdatatype.A:
            glue.setdefault(rrset.name.to_text().lower(), []).extend(r.address for r in rrset)
    return glue


def _capped(name: str, endpoints: set[str]) -> tuple[str, ...]:
    good = sorted(e for e in endpoints if _unicast(e.rpartition(":")[0]))
    if len(good) > MAX_PEERS:
        log.warning("DNS name %s lists %d endpoints; keeping the first %d", name, len(good),
                    MAX_PEERS)
    return tuple(good[:MAX_PEERS])


def _unicast(address: str) -> bool:
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        return False
    return not (ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address(
        "255.255.255.255"))


class DnsPeers:
    """Looks ``name`` up every few seconds and reports endpoints that appeared.

    Args:
        name: the DNS name (see :func:`lookup` for A and SRV names).
        port: the port of every peer found by an A record.
        on_found: called, on this object's thread, with the endpoints (``host:port``) that
            were not in the previous answer (an endpoint that went away and came back is
            reported again); its exceptions are logged.
        interval: longest wait between lookups; a shorter TTL shortens it, down to
            :data:`MIN_INTERVAL_S`.
        timeout: longest one lookup may take.

    Raises:
        ConfigError: a bad name, port or interval; dnspython is not installed; no resolver
            configuration.
    """

    def __init__(self, name: str, port: int, on_found: Callable[[list[str]], None], *,
                 interval: float = DEFAULT_INTERVAL_S, timeout: float = LOOKUP_TIMEOUT_S
                 ) -> None:
        self.name = check_name(name)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(f"port must be in 1..65535, got {port!r}")
        if not interval >= MIN_INTERVAL_S or not timeout > 0:
            raise ConfigError(f"need interval >= {MIN_INTERVAL_S} s and timeout > 0, got "
                              f"{interval!r} and {timeout!r}")
        self.port = port
        self.interval = interval
        self._resolver = _resolver(timeout)
        self._on_found = on_found
        self._current: tuple[str, ...] = ()
        self._lookups = 0
        self._problem = ""  # the last failure, logged once until it changes
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"ringtrain-dns-{self.name}")
        self._thread.start()

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The endpoints of the latest answer, sorted."""
        with self._changed:
            return self._current

    def wait_for(self, predicate: Callable[[tuple[str, ...]], bool], timeout: float
                 ) -> tuple[str, ...]:
        """Wait until a lookup's endpoints satisfy ``predicate``; returns them.

        Raises:
            TransportError: not within ``timeout`` seconds (the message has the last answer).
        """
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self._current), timeout):
                raise TransportError(f"DNS name {self.name}: after {self._lookups} lookups in "
                                     f"{timeout} s the answer is still {list(self._current)}"
                                     f"{'; ' + self._problem if self._problem else ''}")
            return self._current

    def close(self) -> None:
        """Stop looking up (waits for a lookup under way, at most its timeout)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(self._resolver.lifetime + 1.0)

    def __enter__(self) -> DnsPeers:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self.interval
            try:
                answer = lookup(self.name, self.port, self._resolver)
            except TransportError as exc:
                self._report(f"{exc}; trying again every {self.interval:g} s")
            else:
                self._update(answer.endpoints)
                if answer.ttl:
                    wait = min(self.interval, max(MIN_INTERVAL_S, answer.ttl))
            with self._changed:
                self._lookups += 1
                self._changed.notify_all()
            self._stop.wait(wait)

    def _update(self, endpoints: tuple[str, ...]) -> None:
        with self._changed:
            previous, self._current = self._current, endpoints
        if not endpoints:
            self._report(f"DNS name {self.name} lists no peers yet (no such name or no "
                         f"records); looking again every {self.interval:g} s")
            return
        self._problem = ""
        added = [e for e in endpoints if e not in previous]
        gone = [e for e in previous if e not in endpoints]
        if added or gone:
            log.info("DNS name %s lists %d peers%s%s", self.name, len(endpoints),
                     f", new: {', '.join(added)}" if added else "",
                     f", gone: {', '.join(gone)}" if gone else "")
        if added:
            try:
                self._on_found(added)
            except Exception:  # noqa: BLE001 - a callback must not stop the lookups
                log.exception("handling peers %s found in DNS name %s failed", added, self.name)

    def _report(self, problem: str) -> None:
        if problem != self._problem:
            self._problem = problem
            log.warning("%s", problem)
