"""Which candidate endpoints to dial, and when: a bounded, rate-limited book of probes.

Candidates come from places a stranger controls (mDNS adverts, endpoints in a peer's
proposal) and from the user (``--peer``). Dialling every one at once lets a stranger with a
public key fingerprint make a node open thousands of sockets, so the book bounds it:

* at most ``max_probes`` probes (dialled, not yet answered) in flight, and at most
  ``per_source`` of them for one source (one advert, one proposer, or the user's list);
* a probe unanswered after ``probe_timeout`` seconds expires: the caller hangs it up, and
  its endpoint may be dialled again only after a back-off that doubles on every expiry
  (``retry_first`` to ``retry_cap``), so an advert refreshed with new ports costs at most
  ``per_source`` probes per ``probe_timeout``, and a dead address less and less;
* at most ``max_known`` endpoints are remembered (the oldest not in flight is forgotten),
  at most ``max_per_source`` for one source (an advert lists at most 16 addresses).

Sources take turns for the free probe slots (round robin), so a flood of adverts delays a
genuine one by a few probe timeouts at most, and the user's own ``--peer`` list (source
``STATIC``) goes first and never expires: the user bounds it.

Pure: no sockets, no clock (times are passed in, from ``time.monotonic()``), so it is tested
without a network.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

STATIC = "static"  # the source of the user's own --peer endpoints


@dataclass
class _Entry:
    source: str
    due: float = 0.0  # monotonic time from which it may be dialled
    dialled_at: float | None = None  # in flight since, or None
    expiries: int = 0


class CandidateBook:
    """Endpoints to dial, by source, within budgets (see the module docstring).

    Args:
        max_probes: probes in flight at once.
        per_source: probes in flight for one source.
        probe_timeout: seconds before an unanswered probe expires.
        retry_first, retry_cap: back-off after the first expiry, and its cap (seconds).
        max_known: endpoints remembered in all.
        max_per_source: endpoints remembered for one source.
    """

    def __init__(self, max_probes: int = 32, per_source: int = 2, probe_timeout: float = 4.0,
                 retry_first: float = 2.0, retry_cap: float = 60.0, max_known: int = 1024,
                 max_per_source: int = 16):
        self.max_probes = max_probes
        self.per_source = per_source
        self.probe_timeout = probe_timeout
        self.retry_first = retry_first
        self.retry_cap = retry_cap
        self.max_known = max_known
        self.max_per_source = max_per_source
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._turn = 0  # round-robin position over sources
        self.expired_total = 0
        self.forgotten_total = 0

    def offer(self, endpoints: list[str], source: str, now: float) -> None:
        """Remember ``endpoints`` (already validated) as candidates from ``source``."""
        for endpoint in endpoints if source == STATIC else endpoints[: self.max_per_source]:
            entry = self._entries.get(endpoint)
            if entry is not None:
                if source == STATIC:
                    entry.source = STATIC
                continue
            if not self._trim_source(source):
                continue  # this source's endpoints are all in flight
            if len(self._entries) >= self.max_known and not self._forget_one():
                return  # every remembered endpoint is in flight: drop the newcomer
            self._entries[endpoint] = _Entry(source, due=now)

    def due(self, now: float) -> list[str]:
        """Endpoints to dial now (each is then in flight until :meth:`answered`,
        :meth:`expire` or :meth:`forget`)."""
        # the user's own endpoints are bounded by the user: they take no probe slot
        flying = sum(1 for e in self._entries.values()
                     if e.dialled_at is not None and e.source != STATIC)
        by_source: dict[str, list[str]] = {}
        busy: dict[str, int] = {}
        for endpoint, entry in self._entries.items():
            if entry.dialled_at is not None:
                busy[entry.source] = busy.get(entry.source, 0) + 1
            elif entry.due <= now:
                by_source.setdefault(entry.source, []).append(endpoint)
        chosen: list[str] = []
        others = sorted(s for s in by_source if s != STATIC)
        start = self._turn % len(others) if others else 0
        order = ([STATIC] if STATIC in by_source else []) + others[start:] + others[:start]
        self._turn += 1
        for endpoint in by_source.pop(STATIC, []):
            self._entries[endpoint].dialled_at = now
            chosen.append(endpoint)
        if STATIC in order:
            order.remove(STATIC)
        dialled = 0
        progress = True
        while progress and flying + dialled < self.max_probes:
            progress = False
            for source in order:
                waiting = by_source[source]
                if waiting and busy.get(source, 0) < self.per_source:
                    endpoint = waiting.pop(0)
                    self._entries[endpoint].dialled_at = now
                    busy[source] = busy.get(source, 0) + 1
                    chosen.append(endpoint)
                    dialled += 1
                    progress = True
                    if flying + dialled >= self.max_probes:
                        break
        return chosen

    def expire(self, now: float) -> list[str]:
        """Probes unanswered for ``probe_timeout``: hang them up. Each is dialled again after
        its back-off (the user's own endpoints stay in flight: they never expire)."""
        expired = []
        for endpoint, entry in self._entries.items():
            if entry.dialled_at is None or entry.source == STATIC:
                continue
            if now - entry.dialled_at >= self.probe_timeout:
                entry.dialled_at = None
                entry.expiries += 1
                entry.due = now + min(self.retry_cap,
                                      self.retry_first * 2 ** (entry.expiries - 1))
                expired.append(endpoint)
        self.expired_total += len(expired)
        return expired

    def answered(self, endpoint: str) -> None:
        """A probe got its answer (the peer is known now): stop tracking it."""
        self._entries.pop(endpoint, None)

    def forget(self, endpoint: str) -> None:
        """Stop tracking ``endpoint`` (hung up for another reason)."""
        self._entries.pop(endpoint, None)

    def in_flight(self) -> int:
        """Probes dialled and not yet answered or expired."""
        return sum(1 for e in self._entries.values() if e.dialled_at is not None)

    def is_probe(self, endpoint: str) -> bool:
        """Whether ``endpoint`` is in flight."""
        entry = self._entries.get(endpoint)
        return entry is not None and entry.dialled_at is not None

    def __len__(self) -> int:
        return len(self._entries)

    def state(self) -> dict[str, int]:
        """Counts, for diagnostics."""
        return {"known": len(self._entries), "in_flight": self.in_flight(),
                "expired": self.expired_total, "forgotten": self.forgotten_total}

    def _trim_source(self, source: str) -> bool:
        """Make room for one more endpoint of ``source`` (its oldest idle one goes); False
        if there is none to make."""
        if source == STATIC:
            return True
        mine = [e for e, entry in self._entries.items() if entry.source == source]
        if len(mine) < self.max_per_source:
            return True
        idle = [e for e in mine if self._entries[e].dialled_at is None]
        if not idle:
            return False
        del self._entries[idle[0]]
        self.forgotten_total += 1
        return True

    def _forget_one(self) -> bool:
        for endpoint, entry in self._entries.items():
            if entry.dialled_at is None and entry.source != STATIC:
                del self._entries[endpoint]
                self.forgotten_total += 1
                return True
        return False
