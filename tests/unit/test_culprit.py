"""Whom a node suspects when a collective stalls at it (``node.executor.culprit``)."""

from __future__ import annotations

from ringtrain.membership.peers import PeerState
from ringtrain.membership.protocol import View
from ringtrain.node.executor import culprit

VIEW = View(3, ("a", "b", "c", "d"), 0)
NOW, QUIET = 100.0, 0.75


def _peers(heard: dict[str, float], sequences: dict[str, int], generation: int = 3):
    states = {p: PeerState(1, last_heard=NOW - heard[p], generation=generation,
                           sequence=sequences.get(p, 48)) for p in heard}
    return states.get


def test_the_member_silent_past_the_bound_is_the_cause_not_the_live_one_blamed():
    # "a" waited on "d" (its predecessor, alive: heard 0.1 s ago) while "b" is dead (1.9 s)
    peers = _peers({"b": 1.9, "c": 0.2, "d": 0.1}, {})
    assert culprit(VIEW, "a", "d", peers, 48, NOW, QUIET) == "b"


def test_silence_within_the_bound_is_no_evidence():
    peers = _peers({"b": 0.5, "c": 0.2, "d": 0.1}, {})
    assert culprit(VIEW, "a", "d", peers, 48, NOW, QUIET) == "d"


def test_without_a_silent_member_the_one_furthest_behind_is_the_cause():
    # a live process that stopped calling collectives: it heartbeats, at an older sequence
    peers = _peers({"b": 0.1, "c": 0.2, "d": 0.1}, {"b": 46, "c": 47})
    assert culprit(VIEW, "a", "d", peers, 48, NOW, QUIET) == "b"


def test_a_sequence_of_another_generation_is_not_behind():
    peers = _peers({"b": 0.1, "c": 0.2, "d": 0.1}, {"b": 3}, generation=2)
    assert culprit(VIEW, "a", "d", peers, 48, NOW, QUIET) == "d"


def test_with_nobody_silent_or_behind_the_blamed_member_stays():
    peers = _peers({"b": 0.1, "c": 0.2, "d": 0.1}, {})
    assert culprit(VIEW, "a", "c", peers, 48, NOW, QUIET) == "c"
