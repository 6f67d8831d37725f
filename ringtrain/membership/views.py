"""An installed view, and who stands where towards it: who is lost to it, who may join it.

Pure functions of a view and of what peers last said (``peers.PeerState``); ``choice`` and
``installing`` apply them to the node's own state on every tick. The rules are liveness
rules: they decide whom a node waits for and whom the next view names, never what a quorum
is (``agreement``), so no choice here can make two views of one (lineage, generation) differ.
What they must get right is that nobody waits for a node that will not act, and nobody is
named in a view it cannot install (docs/design.md, Membership, "Why it converges"; the
simulator checks the bound).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .peers import PeerState


@dataclass(frozen=True)
class View:
    """One installed membership: a generation and its members in ring order."""

    generation: int
    members: tuple[str, ...]
    rank: int  # this node's rank in ``members``
    lineage: str = ""
    incarnations: tuple[int, ...] = ()
    met: tuple[str, ...] = ()  # members that ran another ring of this job just before

    @property
    def world_size(self) -> int:
        """Number of members."""
        return len(self.members)


def lost(view: View, incarnation: int | None, state: PeerState | None) -> bool:
    """Whether a member of ``view`` (``incarnation``: the one the view names) will never
    vote in the instance that changes it, as far as its last words (``state``) tell:

    * its process restarted or was replaced, or it said Leave: that process never votes;
    * it left this very view (its heartbeat says (our lineage, our generation, not in
      view)): it was evicted or abandoned the view as dead, reset its instance and installs
      only newer views, so it never votes in ours again. Counting it as a voter left the
      others waiting for it while it waited to be admitted (seed 523 and 20 more of the
      first 5,000 schedules);
    * it runs a view of another lineage that it cannot leave for ours: the lineage that
      wins over ours (lower id), or a generation no lower than ours (it ignores a DECIDE
      that is not newer than its view).

    A member behind in our lineage is not lost (it is sent our DECIDE), nor one ahead (its
    heartbeat or DECIDE moves us on). Being lost is only ever used to stop waiting (the dead
    view rule) and to name the member again as a joiner; a lost member that does vote after
    all breaks nothing: Paxos is safe whoever votes.
    """
    if state is None:
        return True
    if state.incarnation != incarnation or state.left:
        return True
    if state.lineage == view.lineage:
        return state.generation == view.generation and not state.in_view
    return state.lineage != "" and (
        (state.in_view and state.lineage < view.lineage)
        or state.generation >= view.generation)


def lost_members(view: View, me: str, incarnations: dict[str, int],
                 peer: Callable[[str], PeerState | None]) -> set[str]:
    """The members of ``view`` but ``me`` that are lost to it (:func:`lost`)."""
    return {m for m in view.members
            if m != me and lost(view, incarnations.get(m), peer(m))}


def joiners(view: View, incarnations: dict[str, int], lost_to_view: set[str],
            staying: set[str], peers: Iterable[tuple[str, PeerState]], now: float,
            timeout: float) -> list[str]:
    """Live peers (heard within ``timeout``, not left, not backed off) that the next view
    should name besides the surviving members:

    * nodes that are not members of ``view``: in no ring, or in a lineage ours wins over
      (a split start merging, rule 6);
    * members lost to ``view`` that are in no ring: they left it, or never installed it.
      Before, only non-members could join, so such a member was neither a voter nor a
      joiner: under a strict least ring size it was waited for for ever (seed 2237). The
      next view names it at a generation above its own (``ViewChoice.wanted``), which it
      can install.

    Each only once its heartbeat said which view it runs (a peer known by its HELLO alone
    may run a ring that wins over ours: two halves of a split start meeting, and naming it
    made each ring admit a node of the other), and once it hears every member ``staying``
    (each of them then admitted its HELLO and it theirs: a joiner only the proposer knows
    would have its first data dropped as unauthenticated, a stall and a false suspicion).
    """
    return sorted(p for p, s in peers
                  if not s.left and s.last_heard > 0 and now - s.last_heard <= timeout
                  and s.heard_view and staying - {p} <= s.hears
                  and now >= s.backoff_until
                  and (incarnations.get(p) != s.incarnation or p in lost_to_view)
                  and (not s.in_ring or (s.lineage != view.lineage
                                         and s.lineage > view.lineage)))


def other_ring(view: View, peers: Iterable[tuple[str, PeerState]],
               alive: Callable[[str], bool]) -> str | None:
    """A live peer running a ring of another lineage of this job, if any: called when the
    members of ``view`` within reach (alive, not suspected, not lost) are no quorum, so the
    view cannot change now. The caller then leaves ``view`` and joins that ring.

    Safe: leaving a view only ends this node's votes in it (Paxos is safe whoever stops
    voting), and joining a ring that already runs adds no group that trains (every ring is
    at least ``min_size``, so the strict per-job rule is untouched). Needed: a member that
    vanished without a trace (its Leave lost in a partition, its device back under another
    id and endpoint) is silent for ever but never lost, and it held the last member of the
    winning lineage, which no other ring joins (seed 24730). Not done without another ring
    in sight: forming a new one on silence alone would split a job whose silent majority
    is alive across a partition and moving on (seed 11118 waits for that reason).
    """
    return next((p for p, s in peers
                 if s.in_ring and s.lineage != view.lineage and alive(p)), None)
