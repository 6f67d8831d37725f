"""How long a node removed again and again waits before it may rejoin."""

from __future__ import annotations

from ringtrain.membership.peers import BACKOFF_CAP, FORGIVEN_AFTER, PeerState


def _waits(removed_at: list[float]) -> list[float]:
    peer = PeerState(incarnation=1)
    waits = []
    for now in removed_at:
        peer.back_off(now)
        waits.append(peer.backoff_until - now)
    return waits


def test_a_crash_loop_waits_twice_as_long_each_time_up_to_the_cap():
    # removed again as soon as each wait is over
    times, now = [], 0.0
    for _ in range(9):
        times.append(now)
        now += min(BACKOFF_CAP, 2 ** len(times)) + 1.0
    assert _waits(times) == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_a_node_that_kept_out_of_trouble_starts_from_the_first_wait_again():
    # the systemd case: killed, back 7 s later, killed again a minute after that
    assert _waits([0.0, 60.0, 120.0, 180.0]) == [1, 1, 1, 1]
    # removed again before it had been forgiven: the wait still doubles
    assert _waits([0.0, 1.0 + FORGIVEN_AFTER - 0.5]) == [1, 2]
    assert _waits([0.0, 1.0 + FORGIVEN_AFTER]) == [1, 1]
