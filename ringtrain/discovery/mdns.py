"""Find the other nodes of a job on the LAN with mDNS / DNS-SD (python-zeroconf).

Each node announces one service of type ``_ringtrain._tcp.local.`` whose TXT record
carries its :class:`~ringtrain.discovery.advert.Advert` (job, node id, protocol version, key
fingerprint, generation and state), and browses for the others. An advert is only a
*candidate* (see :mod:`ringtrain.discovery.advert`); received records are checked to be well
formed and bounded.

This module and ``mdns_unicast`` are the only ones that import zeroconf; its errors become
:class:`~ringtrain.errors.TransportError` or :class:`~ringtrain.errors.ConfigError` here.

    with Discovery(["127.0.0.1"]) as discovery:
        discovery.announce(Advert("n1", "job", ("127.0.0.1",), 5555, 1, "", 0, "forming"))
        peers = discovery.browse(job="job").wait_for(2, "job", timeout=5.0)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, Literal

from zeroconf import (
    BadTypeInNameException,
    IPVersion,
    NamePartTooLongException,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
    current_time_millis,
)
from zeroconf import Error as ZeroconfError

from ..errors import ConfigError, MembershipError, TransportError
from .advert import Advert, advert_from_txt, check_job
from .interfaces import interface_networks, usable_ipv4_addresses

log = logging.getLogger(__name__)

SERVICE_TYPE = "_ringtrain._tcp.local."

# TTL of our SRV, TXT and A records. A node that died without a goodbye drops out of
# browsers once its SRV record is older than this (python-zeroconf raises any PTR TTL to
# at least 1125 s on receipt, so PTR expiry alone would keep a dead node ~19 minutes).
ADVERT_TTL_S = 60
# Announcers re-send their records this often, so two lost packets in a row do not
# expire a live node; one ~250-byte multicast packet per node per interval.
_REANNOUNCE_S = ADVERT_TTL_S / 3
# How often a browser checks its adverts' SRV records for expiry.
_SWEEP_S = 1.0
_TYPE_SRV = 33  # DNS record type and class numbers (RFC 1035, RFC 2782)
_CLASS_IN = 1

# A hostile LAN can announce any number of services; keep at most this many.
MAX_ADVERTS = 64
# Remember this many malformed sources to log each only once.
_MAX_LOGGED_SOURCES = 256

# zeroconf's own defaults, in seconds, plus headroom: register with probing takes
# ~1.3 s, announcements and goodbyes 0.25-0.45 s.
_REGISTER_TIMEOUT_S = 10.0
_UPDATE_TIMEOUT_S = 2.0
_UNREGISTER_TIMEOUT_S = 2.0
# How long the browser thread may wait for a service's SRV/TXT/A records when an
# announcement did not carry them all (our own announcements always do).
_RESOLVE_TIMEOUT_MS = 1000

Event = Literal["added", "updated", "removed"]


def parse_service_info(info: ServiceInfo) -> Advert:
    """Build an :class:`Advert` from a resolved zeroconf record, validating every field.

    Raises:
        ConfigError: a field is missing, too long or malformed.
    """
    txt: dict[str, str] = {}
    for key, value in info.properties.items():
        if value is None or len(key) > 16 or len(value) > 255:
            continue  # unknown or boolean keys carry nothing we use
        try:
            txt[key.decode("ascii")] = value.decode("ascii")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"TXT key {key!r} is not ASCII") from exc
    return advert_from_txt(txt, info.port, tuple(info.parsed_addresses(IPVersion.V4Only)),
                           info.name)



class Discovery:
    """One zeroconf instance shared by the announcers and browsers of this process.

    Args:
        interfaces: IPv4 addresses to send and receive mDNS on; None means
            :func:`usable_ipv4_addresses` ``(None)``.

    Raises:
        ConfigError: an address is not IPv4 text.
        TransportError: the mDNS sockets could not be opened.
    """

    def __init__(self, interfaces: Sequence[str] | None = None) -> None:
        chosen = list(usable_ipv4_addresses(None) if interfaces is None else interfaces)
        if not chosen:
            raise ConfigError("no IPv4 interface to run discovery on")
        for address in chosen:
            try:
                ipaddress.IPv4Address(address)
            except ipaddress.AddressValueError as exc:
                raise ConfigError(f"discovery interface must be IPv4 text, got {address!r}") \
                    from exc
        self.interfaces: tuple[str, ...] = tuple(chosen)
        self._networks = interface_networks(chosen)
        try:
            self._zc = Zeroconf(interfaces=chosen, ip_version=IPVersion.V4Only)
        except (OSError, ZeroconfError) as exc:
            raise TransportError(f"cannot open mDNS sockets on {chosen}: {exc}") from exc

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return bool(self._zc.done)

    def announce(self, advert: Advert, *, probe: bool = False) -> Announcer:
        """Register ``advert`` on this instance; see :class:`Announcer`."""
        return Announcer(advert, discovery=self, probe=probe)

    def browse(self, job: str | None = None,
               on_change: Callable[[Event, Advert], None] | None = None) -> Browser:
        """Browse for adverts on this instance; see :class:`Browser`."""
        return Browser(job, discovery=self, on_change=on_change)

    def close(self) -> None:
        """Send goodbyes for every advert still registered and close the sockets."""
        if self._zc.done:
            return
        try:
            self._zc.close()
        except (OSError, ZeroconfError, RuntimeError) as exc:
            log.warning("closing mDNS on %s: %s", self.interfaces, exc)

    def __enter__(self) -> Discovery:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _reachable_first(self, advert: Advert) -> Advert:
        """``advert`` with the addresses on one of our interfaces' subnets first.

        A peer with two interfaces advertises both addresses; the one on our LAN is
        the one to dial.
        """
        def remote(address: str) -> bool:
            ip = ipaddress.IPv4Address(address)
            return not any(ip in network for network in self._networks)

        return dataclasses.replace(advert, addresses=tuple(sorted(advert.addresses, key=remote)))

    def _start(self, coro: Coroutine[Any, Any, None]) -> concurrent.futures.Future[None]:
        """Run ``coro`` on zeroconf's event loop in the background; cancel the result to stop."""
        loop = self._zc.loop
        if self._zc.done or loop is None or not loop.is_running():
            coro.close()
            raise TransportError(f"discovery on {self.interfaces} is closed")
        return asyncio.run_coroutine_threadsafe(coro, loop)

    def _run(self, coro: Coroutine[Any, Any, Any], what: str, timeout: float) -> Any:
        """Run ``coro`` on zeroconf's event loop thread and wait at most ``timeout`` s."""
        loop = self._zc.loop
        if self._zc.done or loop is None or not loop.is_running():
            coro.close()
            raise TransportError(f"{what}: discovery on {self.interfaces} is closed")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise TransportError(f"{what}: no result within {timeout} s") from exc
        except (BadTypeInNameException, NamePartTooLongException) as exc:
            raise ConfigError(f"{what}: bad service name: {exc!r}") from exc
        except (ZeroconfError, OSError) as exc:
            raise TransportError(f"{what}: {exc!r}") from exc


def _owned_or_shared(discovery: Discovery | None,
                     interfaces: Sequence[str] | None) -> tuple[Discovery, bool]:
    if discovery is not None:
        if interfaces is not None:
            raise ConfigError("pass either interfaces or discovery, not both")
        return discovery, False
    return Discovery(interfaces), True


class Announcer:
    """Announces one :class:`Advert` until closed.

    The instance name is ``<job>-<node_id>``; on a name conflict zeroconf
    appends ``-2``, ``-3``, ... (the name is never an identity).

    Args:
        advert: what to announce (its ``instance_name`` is ignored).
        interfaces: addresses for a private :class:`Discovery`; or
        discovery: a shared one (not closed by :meth:`close`).
        probe: probe for name conflicts before announcing (RFC 6762 section 8.1).
            It costs ~1.3 s; the default skips it because node ids are unique and
            the key handshake, not the name, proves identity.

    Raises:
        ConfigError: bad arguments.
        TransportError: zeroconf failed to register.
    """

    def __init__(self, advert: Advert, interfaces: Sequence[str] | None = None, *,
                 discovery: Discovery | None = None, probe: bool = False) -> None:
        if not isinstance(advert, Advert):
            raise ConfigError(f"advert must be an Advert, got {type(advert).__name__}")
        self._discovery, self._owned = _owned_or_shared(discovery, interfaces)
        self._lock = threading.Lock()
        self._closed = False
        name = f"{advert.job}-{advert.node_id}.{SERVICE_TYPE}"
        self._info = self._service_info(advert, name)
        zc = self._discovery._zc

        async def register() -> None:
            # Returns once probing is done and the record is served; the three
            # announcements go on in the background, so we do not wait ~0.45 s for them.
            await zc.async_register_service(self._info, allow_name_change=True,
                                            cooperating_responders=not probe)

        started = time.monotonic()
        try:
            self._discovery._run(register(), f"announcing node {advert.node_id}",
                                 _REGISTER_TIMEOUT_S)
        except BaseException:
            if self._owned:
                self._discovery.close()
            raise
        self._advert = dataclasses.replace(advert, instance_name=self._info.name)
        self._refresher = self._discovery._start(self._reannounce())
        log.debug("announced %s as %s in %.3f s", advert.node_id, self._info.name,
                  time.monotonic() - started)

    @property
    def advert(self) -> Advert:
        """The advert as currently announced, with its final ``instance_name``."""
        return self._advert

    async def _reannounce(self) -> None:
        """Runs on zeroconf's loop: keep the records fresh in every browser's cache."""
        zc = self._discovery._zc
        while True:
            await asyncio.sleep(_REANNOUNCE_S)
            zc.async_send(zc.generate_service_broadcast(self._info, None))

    def update(self, *, generation: int | None = None, state: str | None = None) -> Advert:
        """Re-announce with a new generation and/or state.

        Returns:
            The new advert.

        Raises:
            ConfigError: a value is invalid.
            TransportError: the announcer is closed or zeroconf failed.
        """
        with self._lock:
            if self._closed:
                raise TransportError(f"node {self._advert.node_id}: update after close")
            changes: dict[str, Any] = {}
            if generation is not None:
                changes["generation"] = generation
            if state is not None:
                changes["state"] = state
            advert = dataclasses.replace(self._advert, **changes)
            info = self._service_info(advert, self._info.name)
            zc = self._discovery._zc

            async def update() -> None:
                await zc.async_update_service(info)

            self._discovery._run(update(), f"updating node {advert.node_id}", _UPDATE_TIMEOUT_S)
            self._info = info
            self._advert = advert
            return advert

    def close(self) -> None:
        """Send goodbyes (waits ~0.25 s, at most a few seconds) and stop announcing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._refresher.cancel()
        if self._owned:
            self._discovery.close()  # its close sends the goodbyes
            return
        zc = self._discovery._zc
        if not zc.done:
            async def unregister() -> None:
                goodbyes = await zc.async_unregister_service(self._info)
                await goodbyes

            try:
                self._discovery._run(unregister(), f"withdrawing node {self._advert.node_id}",
                                     _UNREGISTER_TIMEOUT_S)
            except TransportError as exc:
                log.warning("%s", exc)

    def __enter__(self) -> Announcer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @staticmethod
    def _service_info(advert: Advert, name: str) -> ServiceInfo:
        return ServiceInfo(
            SERVICE_TYPE,
            name,
            port=advert.port,
            properties=advert.txt(),
            parsed_addresses=list(advert.addresses),
            server=f"{advert.job}-{advert.node_id}.local.",
            host_ttl=ADVERT_TTL_S,
            other_ttl=ADVERT_TTL_S,
        )


class Browser:
    """Keeps the current adverts of ``_ringtrain._tcp`` on the LAN, keyed by node id.

    Records are validated; malformed ones are dropped with one warning per service
    name. An advert goes away on its goodbye or when its records expire
    (:data:`ADVERT_TTL_S`). At most :data:`MAX_ADVERTS` are kept.

    Args:
        job: keep only adverts of this job; None keeps all.
        interfaces: addresses for a private :class:`Discovery`; or
        discovery: a shared one (not closed by :meth:`close`).
        on_change: called as ``on_change(event, advert)`` with event "added",
            "updated" or "removed", on discovery's thread; it must not block, and
            its exceptions are logged.

    Raises:
        ConfigError: bad arguments.
        TransportError: zeroconf failed to start browsing.
    """

    def __init__(self, job: str | None = None, interfaces: Sequence[str] | None = None, *,
                 discovery: Discovery | None = None,
                 on_change: Callable[[Event, Advert], None] | None = None) -> None:
        if job is not None:
            check_job(job)
        self.job = job
        self._on_change = on_change
        self._discovery, self._owned = _owned_or_shared(discovery, interfaces)
        self._changed = threading.Condition()
        self._adverts: dict[str, tuple[Advert, float]] = {}
        self._logged_sources: set[str] = set()
        self._stop = threading.Event()
        try:
            self._browser = ServiceBrowser(self._discovery._zc, SERVICE_TYPE,
                                                    handlers=[self._on_state_change])
        except (OSError, RuntimeError, ZeroconfError) as exc:
            if self._owned:
                self._discovery.close()
            raise TransportError(f"cannot browse {SERVICE_TYPE} on "
                                 f"{self._discovery.interfaces}: {exc!r}") from exc
        self._sweeper = threading.Thread(target=self._sweep, daemon=True,
                                         name=f"ringtrain-browser-sweep-{job}")
        self._sweeper.start()

    def adverts(self, job: str | None = None) -> list[Advert]:
        """Current adverts, sorted by node id; only those of ``job`` when given."""
        with self._changed:
            found = [advert for advert, _ in self._adverts.values()]
        return sorted((a for a in found if job is None or a.job == job), key=lambda a: a.node_id)

    def last_seen(self, node_id: str) -> float | None:
        """``time.monotonic()`` when ``node_id``'s records last arrived, or None.

        A live node re-sends them every ``ADVERT_TTL_S / 3`` s; this view is updated
        about once a second.
        """
        with self._changed:
            entry = self._adverts.get(node_id)
        return None if entry is None else entry[1]

    def wait_for(self, count: int, job: str | None = None, timeout: float = 10.0) -> list[Advert]:
        """Wait until at least ``count`` adverts (of ``job``, when given) are present.

        Returns:
            All current matching adverts, sorted by node id.

        Raises:
            ConfigError: count < 0 or timeout <= 0.
            MembershipError: the deadline passed first; the message lists who was found.
        """
        if count < 0 or not timeout > 0:
            raise ConfigError(f"wait_for needs count >= 0 and timeout > 0, "
                              f"got {count}, {timeout}")
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = self.adverts(job)
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = ", ".join(f"{a.node_id}@{','.join(a.addresses)}:{a.port}"
                                      for a in found) or "none"
                    raise MembershipError(
                        f"found {len(found)} of {count} nodes of job {job!r} within "
                        f"{timeout} s on {self._discovery.interfaces}: {names}")
                self._changed.wait(remaining)

    def close(self) -> None:
        """Stop browsing (bounded by the record resolution timeout)."""
        self._stop.set()
        if self._sweeper is not threading.current_thread():
            self._sweeper.join(_SWEEP_S + 1.0)
        if self._browser.is_alive():
            try:
                self._browser.cancel()
            except RuntimeError as exc:  # the loop already stopped under us
                log.debug("cancelling browser: %s", exc)
        if self._owned:
            self._discovery.close()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _on_state_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                         state_change: ServiceStateChange) -> None:
        """Runs on the ServiceBrowser thread for every added, updated or removed name.

        zeroconf passes the arguments by these keywords.
        """
        if state_change is ServiceStateChange.Removed:
            self._remove(name)
            return
        advert = self._resolve(name)
        if advert is None:
            self._remove(name)  # a record that turned malformed replaces a good one
            return
        if self.job is not None and advert.job != self.job:
            return
        with self._changed:
            previous = self._adverts.get(advert.node_id)
            if previous is None and len(self._adverts) >= MAX_ADVERTS:
                self._warn_once(name, f"more than {MAX_ADVERTS} adverts; ignoring {name!r}")
                return
            self._adverts[advert.node_id] = (advert, time.monotonic())
            self._changed.notify_all()
        if previous is None:
            self._notify("added", advert)
        elif previous[0] != advert:
            self._notify("updated", advert)

    def _sweep(self) -> None:
        """Thread: drop adverts whose SRV record expired (the node went without a goodbye)."""
        cache = self._discovery._zc.cache
        while not self._stop.wait(_SWEEP_S):
            now = current_time_millis()
            with self._changed:
                names = [advert.instance_name for advert, _ in self._adverts.values()]
            for name in names:
                srv = cache.get_by_details(name, _TYPE_SRV, _CLASS_IN)
                if srv is None or srv.is_expired(now):
                    log.info("advert %s expired: no refresh for %d s", name, ADVERT_TTL_S)
                    self._remove(name)
                    continue
                with self._changed:  # zeroconf's clock is time.monotonic() in ms
                    for node_id, (advert, seen) in list(self._adverts.items()):
                        if advert.instance_name == name:
                            self._adverts[node_id] = (advert, max(seen, srv.created / 1000))

    def _resolve(self, name: str) -> Advert | None:
        zc = self._discovery._zc
        try:
            info = ServiceInfo(SERVICE_TYPE, name)
            if not info.load_from_cache(zc) and not info.request(zc, _RESOLVE_TIMEOUT_MS):
                self._warn_once(name, f"could not resolve {name!r} within "
                                      f"{_RESOLVE_TIMEOUT_MS} ms; ignoring it")
                return None
            return self._discovery._reachable_first(parse_service_info(info))
        except ConfigError as exc:
            self._warn_once(name, f"dropping malformed advert {name!r}: {exc}")
        except Exception as exc:  # noqa: BLE001 - hostile input must not kill the browser
            self._warn_once(name, f"dropping undecodable advert {name!r}: {exc!r}")
        return None

    def _remove(self, name: str) -> None:
        with self._changed:
            node_ids = [node_id for node_id, (advert, _) in self._adverts.items()
                        if advert.instance_name.lower() == name.lower()]
            removed = [self._adverts.pop(node_id)[0] for node_id in node_ids]
            if removed:
                self._changed.notify_all()
        for advert in removed:
            self._notify("removed", advert)

    def _notify(self, event: Event, advert: Advert) -> None:
        log.debug("%s %s", event, advert)
        if self._on_change is None:
            return
        try:
            self._on_change(event, advert)
        except Exception:  # noqa: BLE001 - a user callback must not stop discovery
            log.exception("on_change callback failed for %s of node %s", event, advert.node_id)

    def _warn_once(self, source: str, message: str) -> None:
        if source in self._logged_sources:
            return
        if len(self._logged_sources) < _MAX_LOGGED_SOURCES:
            self._logged_sources.add(source)
            log.warning("%s", message)
