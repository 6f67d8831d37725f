"""Installing decided views, telling them to whoever is behind, and leaving views.

A node installs a view only on a quorum of ACCEPTED messages it received (``agreement``
calls :meth:`Installer.decided`) or on a DECIDE from one who did (:meth:`Installer.on_decide`):
a message queued is not a message delivered. Members send DECIDE to whoever they see behind
(:meth:`Installer.catch_up`).

Merging. Two lineages of one job that meet (a split start): the lower lineage id (its first
proposer started earlier) wins. Its members admit the other lineage's nodes as joiners; such
a node installs the winner's view when a DECIDE including it comes, and says so loudly. The
training layer then gives every member the state of the member furthest ahead.

Leaving. A node stops running its view (``Membership.evicted``) when a newer view of its
lineage leaves it out, when the view can no longer change (its lost members leave it no
quorum), or when it has no quorum within reach while another ring of the job runs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .agreement import Genesis, Instance, has_quorum
from .messages import Decide, Decision
from .views import View, other_ring

if TYPE_CHECKING:
    from .heartbeats import Heartbeats
    from .protocol import Membership

log = logging.getLogger(f"{__package__}.protocol")  # the state machine's one logger name


class Installer:
    """Installs decided views and leaves views this node can no longer run."""

    def __init__(self, membership: Membership, instance: Instance, genesis: Genesis,
                 heartbeats: Heartbeats):
        self.m = membership
        self.instance = instance
        self.genesis = genesis
        self.heartbeats = heartbeats

    def start_alone(self, now: float) -> None:
        """Install a first view of this node alone (a job of one, no agreement needed)."""
        m = self.m
        lineage = f"{m.incarnation:020d}.0.{m.node_id}"
        self._install(Decision(1, lineage, ((m.node_id, m.incarnation),)), now, joined=False)

    def decided(self, value: Decision, voters: set[str], ballot: tuple[int, str],
                now: float) -> None:
        """An instance this node ran decided ``value``: install it, tell everyone in it."""
        m = self.m
        view = m.view
        old = view.members if view is not None and not m.evicted else ()
        evidence = (view.lineage if old else value.lineage, view.generation if old else 0,
                    ballot, frozenset(voters))
        for peer in sorted(set(old) | set(value.ids)):
            if peer != m.node_id:
                m.send(peer, Decide(value))
        if value.includes(m.node_id, m.incarnation):
            self._install(value, now, joined=False, evidence=evidence)
        else:  # a value another proposer chose, bound on us by Paxos: it leaves us out
            m.decision = value
            self.left_out(f"the view decided for generation {value.generation} leaves it out")

    def on_decide(self, peer: str, msg: Decide, now: float) -> None:
        """A DECIDE from ``peer``: install its view if it is newer and names us."""
        m = self.m
        value, view = msg.value, m.view
        current = view.generation if view else 0
        if not value.includes(m.node_id, m.incarnation):
            if view is not None and not m.evicted and value.lineage == view.lineage \
                    and value.generation > view.generation:
                self.left_out(f"{peer} sent generation {value.generation} without it")
            return
        if value.generation <= current:
            return
        if m.forming:
            accepted = self.genesis.locked is not None and \
                self.genesis.locked[0] == value.lineage
            self._install(value, now, joined=not accepted)
        elif value.lineage == view.lineage:
            self._install(value, now, joined=False)
        elif value.lineage < view.lineage:
            log.warning("node %s: two rings of this job met; ring %s (generation %d) joins "
                        "ring %s (generation %d, %d members), whose first view is older; the "
                        "merged ring continues from the state of the member furthest ahead",
                        m.node_id, view.lineage, view.generation, value.lineage,
                        value.generation, len(value.members))
            self._install(value, now, joined=True)

    def catch_up(self, peer: str) -> None:
        """``peer`` speaks of an older view than ours: send it ours if it is a member."""
        m = self.m
        view, decision = m.view, m.decision
        if view is not None and decision is not None and \
                decision.includes(peer, m.known_peer(peer).incarnation):
            m.send(peer, Decide(decision))

    def abandon_dead_view(self, lost_to_view: set[str]) -> None:
        """Leave a view whose lost members (restarted, or their endpoint taken by another
        process: they will never vote again) leave no quorum: it can neither train nor change,
        so this node forms a new ring with the others (never on mere silence: a silent
        majority may be alive across a partition, and moving on)."""
        m = self.m
        view = m.view
        if view is None or m.evicted:
            return
        gone = [p for p in view.members if p in lost_to_view]
        if gone and not has_quorum(view.members, [p for p in view.members if p not in gone]):
            log.warning("node %s: %s of the %d members of generation %d restarted, were "
                        "replaced or run another ring: this ring can no longer change; "
                        "forming a new one",
                        m.node_id, ", ".join(gone), view.world_size, view.generation)
            self._leave_view()

    def leave_for_running_ring(self, lost_to_view: set[str], now: float) -> None:
        """Leave a view that cannot change now for another ring of this job within reach
        (``views.other_ring``: why this is safe, and needed)."""
        m = self.m
        view = m.view
        assert view is not None
        if not m.suspects and not lost_to_view:
            return  # (the usual case, on every tick: a member silent long enough is suspected)
        live = [p for p in view.members if p == m.node_id or (
            p not in lost_to_view and p not in m.suspects and m.alive(p, now))]
        ring = None if has_quorum(view.members, live) else other_ring(
            view, m.peers.scan(), lambda p: m.alive(p, now))
        if ring is None:
            return
        log.warning("node %s: generation %d has no quorum within reach (%d of %d members) "
                    "while %s runs another ring of this job: leaving it to join that one",
                    m.node_id, view.generation, len(live), view.world_size, ring)
        self._leave_view()

    def left_out(self, why: str) -> None:
        """A newer view of our lineage leaves us out: we join anew."""
        log.warning("node %s was left out of its ring (%s): it will rejoin as a new member",
                    self.m.node_id, why)
        self._leave_view()

    def _leave_view(self) -> None:
        """Stop running our view (evicted): no votes in it; we join or form a ring anew."""
        m = self.m
        m.evicted = True
        m.suspects.clear()
        self.heartbeats.silent.clear()
        m.reforming = False
        self.instance.reset()

    def _install(self, value: Decision, now: float, joined: bool,
                 evidence: tuple | None = None) -> None:
        m = self.m
        old = m.view
        m.evidence = evidence
        ids = value.ids
        if old is not None and old.lineage and old.lineage != value.lineage:
            met = tuple(i for i in ids if i not in old.members)  # we joined their ring
        else:  # joiners that last said they run another ring: ours wins over theirs
            met = tuple(i for i in ids if i != m.node_id and (old is None or i not in
                        old.members) and (s := m.peers.get(i)) is not None
                        and s.in_view and s.lineage not in ("", value.lineage))
        m.view = View(value.generation, ids, ids.index(m.node_id), value.lineage,
                      tuple(i for _, i in value.members), met)
        m.incarnations = dict(value.members)  # member -> incarnation, for lookups
        m.decision = value
        m.installs += 1
        m.joined = joined
        m.evicted = m.reforming = False
        self.instance.reset()
        self.genesis.clear()
        m.waiting = ""
        m.sequence = 0
        m.installed_at = now
        if old is not None:
            for member, incarnation in zip(old.members, old.incarnations, strict=True):
                state = m.peers.get(member)
                # a member that said it leaves (Ctrl-C) is not flapping: no back-off, so
                # the device restarted after a graceful leave rejoins at once
                if member not in ids and state is not None and state.incarnation == incarnation \
                        and not (state.left or state.leaving):
                    state.back_off(now)
        m.suspects = {s: why for s, why in m.suspects.items()
                      if s in ids and not m.alive(s, now)}
        self.heartbeats.silent &= set(m.suspects)
        log.info("node %s installed generation %d: %s", m.node_id, value.generation,
                 ", ".join(ids))
