"""The membership protocol under the deterministic simulator (``tests/sim/world.py``).

``SCHEDULES`` seeded schedules of 2-9 devices with every fault kind run in CI, over every
core; a failure names its seed and the command that replays it. The soak is a command:
``python -m tests.sim --schedules 1000000``.
"""

from __future__ import annotations

import os

from tests.sim.__main__ import run_many
from tests.sim.world import World

# schedules run in CI: issue 13 asks for at least 5,000 within 2 minutes on 2 cores (about
# 20 ms of CPU each here: ~55 s on 2 idle cores); RINGTRAIN_SIM_SCHEDULES changes it
SCHEDULES = int(os.environ.get("RINGTRAIN_SIM_SCHEDULES", "5000"))


def test_seeded_schedules_keep_every_invariant():
    failures = run_many(0, SCHEDULES, workers=os.cpu_count() or 1)
    assert not failures, "\n\n".join(f"seed {seed}:\n{text}" for seed, text in failures[:3])


def test_one_seed_replays_one_schedule_exactly():
    first, second = World(7), World(7)
    first.run()
    second.run()
    assert first.log == second.log and first.decided == second.decided


def test_a_peer_known_by_its_hello_alone_is_no_joiner_until_its_heartbeat():
    """Two rings of a split start meet: the ring whose first view is newer must not propose
    a node of the older ring before that node's heartbeat says which ring it runs (it did:
    each ring admitted a node of the other, lab-restart scenario C)."""
    from ringtrain.membership.messages import Heartbeat
    from ringtrain.membership.protocol import Membership, MembershipConfig

    newer = Membership("b", 2, MembershipConfig())
    newer.start_alone(0.0)
    assert newer.hello("a", 1, "10.0.0.1:7077", 0.1)
    newer.tick(0.2)
    assert not newer.reform_due  # HELLO only: which ring "a" runs is not known yet
    older_lineage = f"{1:020d}.0.a"  # "a" started first: its ring wins
    assert older_lineage < newer.view.lineage
    newer.receive("a", 1, Heartbeat(older_lineage, 1, ("a",), True, 0, hears=("b",)), 0.3)
    newer.tick(0.4)
    assert not newer.reform_due  # a node of the winning ring never joins ours
    newer.receive("a", 1, Heartbeat("", 0, (), False, 0), 0.5)
    newer.tick(0.6)
    assert not newer.reform_due  # in no ring, but it does not hear us yet
    newer.receive("a", 1, Heartbeat("", 0, (), False, 0, hears=("b",)), 0.7)
    newer.tick(0.8)
    assert newer.reform_due  # a node in no ring that hears every member does


def test_a_full_ring_says_so_in_its_heartbeats_and_a_node_outside_learns_whose_ring_it_is():
    """A member whose view has --max-nodes members marks its heartbeats full; a node in no
    ring that hears such a heartbeat (a ring without it) knows it waits for a member to leave
    (``full_ring``), and forgets it once that ring has room again."""
    from ringtrain.membership.messages import Heartbeat
    from ringtrain.membership.protocol import Membership, MembershipConfig

    member = Membership("a", 1, MembershipConfig(max_size=1))
    member.start_alone(0.0)
    assert member.hello("c", 1, "10.0.0.3:7077", 0.1)
    member.take_sends()
    member.tick(0.3)
    beats = [s.message for s in member.take_sends() if isinstance(s.message, Heartbeat)]
    assert beats and all(beat.full for beat in beats)
    assert member.turned_away == ()  # "c" is not a joiner before its heartbeat says so

    outside = Membership("c", 1, MembershipConfig())
    assert outside.hello("a", 1, "10.0.0.1:7077", 0.1)
    outside.receive("a", 1, beats[0], 0.2)
    outside.tick(0.3)
    assert outside.full_ring == ("a",)
    outside.receive("a", 1, Heartbeat(beats[0].lineage, 1, ("a",), True, 0), 0.4)
    outside.tick(0.5)
    assert outside.full_ring == ()
