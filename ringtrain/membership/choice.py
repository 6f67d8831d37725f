"""Which view this node would propose: the successor of its view, or a first view.

:class:`ViewChoice` applies the rules of ``views`` to this node's own state (its view, its
suspects, what its peers last said). Like those, they are liveness rules: they decide whom a
proposer waits for and whom the next view names, never what a quorum is (``agreement``), so
no choice here can make two views of one (lineage, generation) differ. ``agreement`` asks for
a value when it may propose (:meth:`ViewChoice.wanted`, :meth:`ViewChoice.first_view`);
``protocol`` asks who is lost, who survives and who joins on every tick (``reform_due``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .agreement import has_quorum
from .messages import Decision
from .views import joiners, lost, lost_members

if TYPE_CHECKING:
    from .protocol import Membership

log = logging.getLogger(f"{__package__}.protocol")  # the state machine's one logger name
LEFT_NAMED = 4  # peers that left named in a waiting line, at most


class ViewChoice:
    """The view this node wants next, and who survives or joins its view."""

    def __init__(self, membership: Membership):
        self.m = membership
        self.forming: tuple[str, ...] = ()  # the candidates of a first view, as last seen
        self.forming_since = 0.0  # when they last changed

    def wanted(self, now: float) -> Decision | None:
        """The view this node would propose to follow its own, or None to wait."""
        m = self.m
        view = m.view
        assert view is not None
        survivors = [p for p in view.members if p == m.node_id or self.survives(p, now)]
        if not has_quorum(view.members, survivors):
            return self._wait(f"waiting for a majority: {len(survivors)} of the "
                              f"{view.world_size} members of generation {view.generation} "
                              f"reachable")
        joining = self.joiners(now)[:max(0, m.config.max_size - len(survivors))]
        ids = sorted(survivors + joining)
        if len(ids) < m.config.min_size:
            return self._wait(f"waiting for nodes: {len(ids)} alive, the job needs at least "
                              f"{m.config.min_size}{self._left()}")
        generation = max([view.generation] + [m.known_peer(j).generation for j in joining]) + 1
        m.waiting = ""
        return Decision(generation, view.lineage, self._pairs(ids))

    def first_view(self, now: float, round_: int) -> Decision | None:
        """A first view to propose (we are the lowest of enough settled candidates)."""
        m = self.m
        if any(s.in_ring and m.alive(p, now) for p, s in m.peers.scan()):
            return self._wait("a ring of this job is running: waiting to be admitted")
        candidates = tuple(sorted([m.node_id] + [
            p for p, s in m.peers.scan() if not s.in_ring and m.alive(p, now)
        ])[:m.config.max_size])
        if candidates != self.forming:
            self.forming, self.forming_since = candidates, now
        if len(candidates) < m.config.form_size:
            return self._wait(f"waiting for nodes: {len(candidates)} of "
                              f"{m.config.form_size} found{self._left()}")
        if len(candidates) < m.config.max_size and \
                now - self.forming_since < m.config.settle:
            return None
        if candidates[0] != m.node_id:
            return None  # the lowest candidate proposes
        generation = max([m.view.generation if m.view else 0] + [
            m.known_peer(p).generation for p in candidates if p != m.node_id]) + 1
        m.waiting = ""
        lineage = f"{m.incarnation:020d}.{round_}.{m.node_id}"
        return Decision(generation, lineage, self._pairs(candidates))

    def lost_members(self) -> set[str]:
        """The members of our view (but us) that will never vote in our instance."""
        m = self.m
        view = m.view
        if view is None:
            return set()
        return lost_members(view, m.node_id, m.incarnations, m.peers.get)

    def survives(self, member: str, now: float) -> bool:
        """A member of our view that is still itself, alive, not suspected and able to
        take part in our next view."""
        m = self.m
        return member not in m.suspects and m.alive(member, now) and not lost(
            m.view, m.incarnations.get(member), m.peers.get(member)) \
            and not m.known_peer(member).leaving

    def joiners(self, now: float, lost_to_view: set[str] | None = None) -> list[str]:
        """Live peers the next view should name besides the survivors (``views.joiners``;
        ``lost_to_view``: the lost members, if the caller has them)."""
        m = self.m
        view = m.view
        if view is None:
            return []
        if lost_to_view is None:
            lost_to_view = self.lost_members()
        staying = {p for p in view.members if p == m.node_id or self.survives(p, now)}
        return joiners(view, m.incarnations, lost_to_view, staying, m.peers.scan(),
                       now, m.config.suspect_timeout)

    def _pairs(self, ids: list[str] | tuple[str, ...]) -> tuple[tuple[str, int], ...]:
        m = self.m
        return tuple((i, m.incarnation if i == m.node_id else m.known_peer(i).incarnation)
                     for i in ids)

    def _left(self) -> str:
        """Who said they left, for a line saying why we wait: " (a, b left)", or ""."""
        gone = sorted(p for p, s in self.m.peers.scan() if s.left)
        if not gone:
            return ""
        more = f" and {len(gone) - LEFT_NAMED} more" if len(gone) > LEFT_NAMED else ""
        return f" ({', '.join(gone[:LEFT_NAMED])}{more} left)"

    def _wait(self, why: str) -> None:
        m = self.m
        if why != m.waiting:
            m.waiting = why
            log.log(logging.WARNING if m.view else logging.INFO, "node %s: %s",
                    m.node_id, why)
        return None
