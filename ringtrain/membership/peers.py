"""What one node knows of the others: incarnations, endpoints, liveness, back-off.

Pure bookkeeping for ``protocol``: times are whatever clock the caller passes in (seconds).
Everything here is bounded: at most ``MAX_PEERS`` peers are remembered; when a new one comes,
the one heard from longest ago that is not protected (a member) is forgotten.
"""

from __future__ import annotations

from collections.abc import Callable, ItemsView, Iterator
from dataclasses import dataclass

MAX_PEERS = 512
BACKOFF_FIRST, BACKOFF_CAP = 1.0, 60.0  # seconds a repeatedly removed node waits to rejoin
FORGIVEN_AFTER = 30.0  # seconds of no removal after its wait: the next wait is the first again


@dataclass(slots=True)
class PeerState:
    """One peer, as this node last heard of it."""

    incarnation: int
    endpoint: str = ""
    last_heard: float = 0.0
    heard_view: bool = False  # a heartbeat of this incarnation said which view it runs
    lineage: str = ""  # of its view ("" none, or not yet heard: see heard_view)
    generation: int = 0  # of its view
    members: tuple[str, ...] = ()  # of its view
    in_view: bool = False  # it is a member of its view (not left out of a newer one)
    sequence: int = 0  # the collective it is at
    left: bool = False  # it said Leave
    leaving: bool = False  # it leaves after its current step (its heartbeat says so)
    hears: frozenset[str] = frozenset()  # the peers it heard from lately (its heartbeat)
    full: bool = False  # its view is at its --max-nodes (its heartbeat)
    removals: int = 0  # how often a view change removed it
    backoff_until: float = 0.0  # it may join again from then on

    @property
    def in_ring(self) -> bool:
        """Whether it is a member of a running ring (as it last said)."""
        return bool(self.lineage) and self.in_view

    def back_off(self, now: float) -> None:
        """One more removal: it may join again only after a doubling wait. A node that
        kept out of trouble for ``FORGIVEN_AFTER`` seconds after its last wait starts from
        the first again: a device restarted now and then (systemd, a laptop lid) is not
        kept waiting a minute for a crash loop it left long ago."""
        if self.removals and now - self.backoff_until >= FORGIVEN_AFTER:
            self.removals = 0
        self.removals += 1
        self.backoff_until = now + min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (self.removals - 1))


class Peers:
    """The table of peers, by node id."""

    def __init__(self) -> None:
        self._peers: dict[str, PeerState] = {}
        # get(node_id): the peer's state, or None (the dict's own get: the hottest call)
        self.get: Callable[[str], PeerState | None] = self._peers.get

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._peers

    def __iter__(self) -> Iterator[str]:
        return iter(self._peers)

    def __len__(self) -> int:
        return len(self._peers)

    def items(self) -> list[tuple[str, PeerState]]:
        """(node id, state) pairs, a copy."""
        return list(self._peers.items())

    def scan(self) -> ItemsView[str, PeerState]:
        """(node id, state) pairs, not a copy: for a loop that adds and forgets no peer
        (the protocol's hot paths; another thread must use :meth:`items`)."""
        return self._peers.items()

    def introduce(self, node_id: str, incarnation: int, endpoint: str, now: float,
                  protected: Callable[[str], bool]) -> tuple[PeerState, str | None]:
        """Record a HELLO. Returns the peer's state and, if this incarnation replaces an
        older one, "restarted". The caller has checked the incarnation is not older."""
        peer = self._peers.get(node_id)
        replaced = None
        if peer is None:
            self._make_room(protected)
            peer = self._peers[node_id] = PeerState(incarnation)
        elif incarnation > peer.incarnation:
            replaced = "restarted"
            fresh = PeerState(incarnation, removals=peer.removals,
                              backoff_until=peer.backoff_until)
            peer = self._peers[node_id] = fresh
        peer.endpoint = endpoint or peer.endpoint
        peer.left = peer.leaving = False
        peer.last_heard = now
        return peer, replaced

    def at_endpoint(self, endpoint: str, other_than: str) -> list[str]:
        """Peers last seen at ``endpoint``, other than ``other_than``."""
        return [p for p, s in self._peers.items() if endpoint and s.endpoint == endpoint
                and p != other_than]

    def forget(self, node_id: str) -> None:
        """Drop a peer (its endpoint went to another process)."""
        self._peers.pop(node_id, None)

    def _make_room(self, protected: Callable[[str], bool]) -> None:
        if len(self._peers) < MAX_PEERS:
            return
        candidates = [(s.last_heard, p) for p, s in self._peers.items() if not protected(p)]
        if candidates:
            del self._peers[min(candidates)[1]]
