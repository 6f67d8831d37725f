"""Heartbeats: what this node tells its peers every ``heartbeat_interval``, what it learns
from theirs, and suspicion of members that fall silent.

A heartbeat says which view its sender runs (lineage, generation, members, whether it is
still in it), the collective it is at, whether it leaves after its current step and which
peers it heard lately. ``views`` reads these (who is lost, who may join) and
``installing`` acts on them (a newer view without us, a peer behind).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .messages import MAX_MEMBERS, Heartbeat
from .peers import PeerState
from .views import View

if TYPE_CHECKING:
    from .protocol import Membership


class Heartbeats:
    """Heartbeats sent and heard, and suspicion by silence."""

    def __init__(self, membership: Membership):
        self.m = membership
        self.last_sent = -math.inf
        self.silent: set[str] = set()  # suspects charged with silence only

    def tick(self, now: float) -> None:
        """Send a heartbeat if one is due."""
        if now - self.last_sent >= self.m.config.heartbeat_interval:
            self.last_sent = now
            self._send(now)

    def send_at_next_tick(self) -> None:
        """Make a heartbeat due now (it says something new)."""
        self.last_sent = -math.inf

    def _send(self, now: float) -> None:
        m = self.m
        view = m.view
        in_view = view is not None and not m.evicted
        beat = Heartbeat(view.lineage if view else "", view.generation if view else 0,
                         view.members if view else (), in_view, m.sequence, m.leaving,
                         tuple(sorted(p for p, s in m.peers.items()
                                      if m.alive(p, now)))[:MAX_MEMBERS],
                         in_view and view.world_size >= m.config.max_size)
        recent = 10 * m.config.suspect_timeout
        members, send = view.members if view else (), m.send
        for peer, state in m.peers.scan():
            if not state.left and (now - state.last_heard <= recent or peer in members):
                send(peer, beat)

    def on_heartbeat(self, peer: str, state: PeerState, beat: Heartbeat) -> None:
        """Record what ``peer`` (whose state is ``state``) said, and act on its view."""
        state.heard_view = True
        state.lineage, state.generation, state.members = beat.lineage, beat.generation, \
            beat.members
        state.in_view, state.sequence, state.leaving = beat.in_view, beat.sequence, \
            beat.leaving
        state.hears, state.full = frozenset(beat.hears), beat.full
        m = self.m
        view = m.view
        if view is None or m.evicted:
            return
        # a newer view of our lineage without us: we are left out, whether or not its sender
        # still runs it (a view was decided to get there; it may have abandoned it since, and
        # then nobody else may be left to tell us)
        if (beat.lineage == view.lineage and beat.generation > view.generation
                and m.node_id not in beat.members):
            m.installer.left_out(f"{peer} installed generation {beat.generation} without it")
        elif beat.lineage != view.lineage or beat.generation < view.generation:
            m.installer.catch_up(peer)

    def suspect_silent(self, view: View, now: float) -> None:
        """Suspect the members of ``view`` not heard from within ``suspect_timeout`` (since
        it was installed, at least); lift the suspicion of those heard again."""
        m = self.m
        timeout = m.config.suspect_timeout
        for member in view.members:
            if member == m.node_id:
                continue
            state = m.peers.get(member)
            last = max(state.last_heard if state else 0.0, m.installed_at)
            if now - last > timeout:
                if member not in m.suspects:
                    self.silent.add(member)
                    m.suspect(member, f"silent for {now - last:.1f} s")
            elif member in self.silent:
                # heard again (a partition healed, a pause ended): silence was the only
                # charge, so it is lifted (else two healed halves could suspect each
                # other for ever, and neither would find a majority)
                self.silent.discard(member)
                m.suspects.pop(member, None)
