"""Peers the user named by host name (``--peer node1:7077``, ``localhost:7078``), resolved to
addresses by the system's resolver (hosts file, DNS) on a thread of their own, again and
again: a name may not resolve yet (a container still starting) and may move.

Only addresses are dialled. A peer dialled by its name and, once it said HELLO, by the
address it was seen at was two candidates for one node: the two links raced to carry its
name, a WELCOME came back over the link just replaced, and in 1 of 10 tries three nodes
named ``localhost:PORT`` never formed a ring (in containers, peers by name re-formed every
half second).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

RETRY_S = 0.5  # until a name resolves
REFRESH_S = 10.0  # once it did: to follow a peer that moved


def resolve(host: str, port: int) -> list[str]:
    """The IPv4 endpoints (``IP:port``) ``host`` resolves to, sorted; [] if none.

    Raises:
        OSError: the resolver failed (no such name, no answer).
    """
    infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    return sorted({f"{info[4][0]}:{port}" for info in infos})


class NamedPeers:
    """Resolves ``names`` every few seconds and reports endpoints not reported before.

    Args:
        names: ``(host, port)`` of each named peer.
        on_found: called, on this object's thread, with new ``IP:port`` endpoints; its
            exceptions are logged.
        resolver: how a name becomes endpoints (:func:`resolve`).
    """

    def __init__(self, names: list[tuple[str, int]], on_found: Callable[[list[str]], None],
                 resolver: Callable[[str, int], list[str]] = resolve):
        self.names = list(names)
        self._on_found = on_found
        self._resolve = resolver
        self._reported: set[str] = set()
        self._unresolved = {name for name, _ in self.names}
        self._logged: set[str] = set()  # names whose failure was logged (once each)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="ringtrain-peer-names")
        self._thread.start()

    def close(self) -> None:
        """Stop resolving (a lookup under way finishes on its own)."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            found = []
            for host, port in self.names:
                try:
                    endpoints = self._resolve(host, port)
                except OSError as exc:
                    self._failed(host, f"cannot resolve it ({exc})")
                    continue
                if not endpoints:
                    self._failed(host, "it has no IPv4 address")
                    continue
                self._unresolved.discard(host)
                found += [e for e in endpoints if e not in self._reported]
            if found:
                self._reported.update(found)
                try:
                    self._on_found(found)
                except Exception:  # noqa: BLE001 - the node may be closing; keep resolving
                    log.exception("peer names: passing on %s failed", found)
            self._stop.wait(RETRY_S if self._unresolved else REFRESH_S)

    def _failed(self, host: str, why: str) -> None:
        if host not in self._logged:
            self._logged.add(host)
            log.warning("peer %s: %s; trying again every %g s", host, why, RETRY_S)
