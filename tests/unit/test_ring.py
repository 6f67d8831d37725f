"""The ring schedule, executed in memory for every rank at once: no sockets, no sleeps.

Each rank's :class:`ringtrain.ring.plan.Plan` is run against FIFO queues that stand for the links
rank r -> rank r+1, exactly as ``runner.RingRunner`` runs it over ZeroMQ: send
``first_sends``, then take the receives in plan order, reduce (``np.add``) or copy, and send
``then``. The results are checked against numpy and every message is counted.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringtrain.ring import plan as ring

WORLD_SIZES = range(1, 9)
LENGTHS = (0, 1, 3, 7, 11, 257, 300)  # 0, 1, < N for most N, odd, a few hundred
SEGMENTS = (1, 3, 1 << 20)  # one element per message, a few, one segment per chunk


@dataclass
class Wire:
    """What went over the simulated links."""

    sent: list[int]  # messages sent by each rank
    received: list[int]  # messages taken in by each rank
    log: list[tuple[int, int, ring.Transfer]] = field(default_factory=list)  # (src, dst, what)


def simulate(plans: list[ring.Plan], buffers: list[np.ndarray], combine=np.add, *,
             zero_copy: bool = False, rng: random.Random | None = None) -> Wire:
    """Run every rank's plan until nothing moves; raise if a message comes out of order.

    Every message goes to the sender's successor (the only destination a plan has). With
    ``zero_copy`` a message carries a view of the sender's buffer that is read only when it is
    received, the most pessimistic model of sending without a copy: it fails if a rank writes a
    region that is still on its way to the successor. ``rng`` picks which rank moves next.
    """
    n = len(plans)
    links: list[deque] = [deque() for _ in range(n)]  # links[r]: messages to rank r
    wire = Wire([0] * n, [0] * n)

    def send(src: int, transfer: ring.Transfer) -> None:
        region = buffers[src][transfer.start:transfer.stop]
        payload = region if zero_copy else region.copy()
        dst = ring.successor(src, n)
        links[dst].append((src, transfer, payload))
        wire.sent[src] += 1
        wire.log.append((src, dst, transfer))

    for rank, plan in enumerate(plans):
        for transfer in plan.first_sends:
            send(rank, transfer)
    position = [0] * n
    while True:
        ready = [r for r in range(n) if links[r] and position[r] < len(plans[r].receives)]
        if not ready:
            break
        order = ready if rng is None else rng.sample(ready, len(ready))
        for rank in order[:1] if rng is not None else order:
            src, transfer, payload = links[rank].popleft()
            expected = plans[rank].receives[position[rank]]
            assert src == ring.predecessor(rank, n), f"rank {rank} got data from rank {src}"
            assert transfer == expected.transfer, (
                f"rank {rank} receive #{position[rank]}: got {transfer}, "
                f"its plan expects {expected.transfer}")
            region = buffers[rank][transfer.start:transfer.stop]
            if expected.reduce:
                combine(region, payload, out=region)
            else:
                region[...] = payload
            position[rank] += 1
            wire.received[rank] += 1
            if expected.then is not None:
                send(rank, expected.then)
    for rank in range(n):
        assert position[rank] == len(plans[rank].receives), (
            f"rank {rank} stalled after {position[rank]}/{len(plans[rank].receives)} receives")
        assert not links[rank], f"{len(links[rank])} messages to rank {rank} were never taken"
    return wire


def inputs(n: int, length: int, seed: int = 0) -> list[np.ndarray]:
    """Integer-valued float64 inputs, so sums are exact whatever the order."""
    rng = np.random.default_rng(seed)
    return [rng.integers(-1000, 1000, size=length).astype(np.float64) for _ in range(n)]


def sends_of(plan_sends: list[tuple[int, int]], segment_elements: int) -> int:
    """Messages needed to send these chunk bounds in segments."""
    return sum(len(ring.segment_bounds(lo, hi, segment_elements)) for lo, hi in plan_sends)


# all-reduce -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", WORLD_SIZES)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("segment", SEGMENTS)
def test_all_reduce_equals_numpy_sum(n, length, segment):
    data = inputs(n, length, seed=n * 1000 + length)
    buffers = [x.copy() for x in data]
    plans = [ring.all_reduce_plan(r, n, length, segment) for r in range(n)]
    wire = simulate(plans, buffers)
    expected = np.sum(data, axis=0)
    for rank in range(n):
        np.testing.assert_array_equal(buffers[rank], expected, err_msg=f"rank {rank}")
    # every rank sends 2(N-1) hops' worth of segments, and the plan knows how many
    bounds = ring.chunk_bounds(length, n)
    for rank in range(n):
        hops = ring.all_reduce_hops(rank, n)
        assert len(hops) == 2 * (n - 1)
        assert wire.sent[rank] == sends_of([bounds[h.send_chunk] for h in hops], segment)
        assert wire.sent[rank] == plans[rank].sent_messages()
        assert wire.received[rank] == len(plans[rank].receives)


@pytest.mark.parametrize("n", WORLD_SIZES)
@pytest.mark.parametrize("length", (0, 1, 5, 64, 301))
def test_all_reduce_one_segment_per_chunk_sends_exactly_2_n_minus_1_messages(n, length):
    plans = [ring.all_reduce_plan(r, n, length, max(1, length)) for r in range(n)]
    wire = simulate(plans, inputs(n, length))
    for rank in range(n):
        assert wire.sent[rank] == 2 * (n - 1), f"rank {rank} sent {wire.sent[rank]}"
        assert wire.received[rank] == 2 * (n - 1)
    # ... all of them to the successor
    assert all(dst == ring.successor(src, n) for src, dst, _ in wire.log)
    assert len(wire.log) == 2 * n * (n - 1)


@pytest.mark.parametrize("n", (2, 3, 5, 8))
@pytest.mark.parametrize("segment", (1, 4))
def test_all_reduce_uniform_segments_send_2_n_minus_1_times_segments(n, segment):
    length = n * segment * 3  # every chunk is exactly 3 segments
    plans = [ring.all_reduce_plan(r, n, length, segment) for r in range(n)]
    wire = simulate(plans, inputs(n, length))
    assert wire.sent == [2 * (n - 1) * 3] * n


@pytest.mark.parametrize("n", (2, 3, 4, 7))
@pytest.mark.parametrize("seed", range(5))
def test_all_reduce_any_interleaving_even_when_payloads_are_read_late(n, seed):
    """The runner sends big segments without copying: a region must not change while it is
    on its way. Reading every payload only when it is received, in a random interleaving of
    ranks, still gives the exact sum."""
    length = 97
    data = inputs(n, length, seed)
    buffers = [x.copy() for x in data]
    plans = [ring.all_reduce_plan(r, n, length, 5) for r in range(n)]
    simulate(plans, buffers, zero_copy=True, rng=random.Random(seed))
    for rank in range(n):
        np.testing.assert_array_equal(buffers[rank], np.sum(data, axis=0))


@pytest.mark.parametrize("n", WORLD_SIZES)
def test_all_reduce_max_min(n):
    data = inputs(n, 50, seed=7)
    for combine, reference in ((np.maximum, np.max), (np.minimum, np.min)):
        buffers = [x.copy() for x in data]
        simulate([ring.all_reduce_plan(r, n, 50, 3) for r in range(n)], buffers, combine)
        for buffer in buffers:
            np.testing.assert_array_equal(buffer, reference(data, axis=0))


# reduce-scatter, all-gather, broadcast ---------------------------------------------------------

@pytest.mark.parametrize("n", WORLD_SIZES)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("segment", SEGMENTS)
def test_reduce_scatter_rank_r_holds_chunk_r(n, length, segment):
    data = inputs(n, length, seed=length)
    buffers = [x.copy() for x in data]
    plans = [ring.reduce_scatter_plan(r, n, length, segment) for r in range(n)]
    wire = simulate(plans, buffers)
    expected = np.sum(data, axis=0)
    bounds = ring.chunk_bounds(length, n)
    for rank, (lo, hi) in enumerate(bounds):
        np.testing.assert_array_equal(buffers[rank][lo:hi], expected[lo:hi],
                                      err_msg=f"rank {rank}")
        hops = ring.reduce_scatter_hops(rank, n, 0)
        assert len(hops) == n - 1
        assert wire.sent[rank] == sends_of([bounds[h.send_chunk] for h in hops], segment)
        assert wire.sent[rank] == plans[rank].sent_messages()
    if segment >= length:
        assert wire.sent == [n - 1] * n


@pytest.mark.parametrize("n", WORLD_SIZES)
@pytest.mark.parametrize("chunk_length", (0, 1, 2, 7, 100))
@pytest.mark.parametrize("segment", SEGMENTS)
def test_all_gather_stacks_in_rank_order(n, chunk_length, segment):
    own = inputs(n, chunk_length, seed=chunk_length)
    buffers = []
    for rank in range(n):
        buffer = np.full(n * chunk_length, np.nan)
        buffer[rank * chunk_length:(rank + 1) * chunk_length] = own[rank]
        buffers.append(buffer)
    plans = [ring.all_gather_plan(r, n, chunk_length, segment) for r in range(n)]
    wire = simulate(plans, buffers)
    expected = np.concatenate(own) if own else np.zeros(0)
    for rank in range(n):
        np.testing.assert_array_equal(buffers[rank], expected, err_msg=f"rank {rank}")
    segments = len(ring.segment_bounds(0, chunk_length, segment))
    assert wire.sent == [(n - 1) * segments] * n


@pytest.mark.parametrize("n", WORLD_SIZES)
@pytest.mark.parametrize("length", (0, 1, 3, 11, 300))
@pytest.mark.parametrize("segment", SEGMENTS)
def test_broadcast_from_every_root(n, length, segment):
    for root in range(n):
        data = inputs(n, length, seed=root)
        buffers = [x.copy() for x in data]
        plans = [ring.broadcast_plan(r, n, root, length, segment) for r in range(n)]
        wire = simulate(plans, buffers)
        for rank in range(n):
            np.testing.assert_array_equal(buffers[rank], data[root],
                                          err_msg=f"rank {rank}, root {root}")
        if n == 1:
            assert wire.sent == [0]
            continue
        # every rank sends an empty check; N-1 links carry every data segment once; then one
        # empty token goes round the ring
        segments = len(ring.segment_bounds(0, length, segment))
        assert sum(wire.sent) == (n - 1) * segments + 2 * n
        last = (root - 1) % n
        assert wire.sent[last] == 2
        assert all(wire.sent[r] == segments + 2 for r in range(n) if r != last)
        assert all(plan.first_sends[0] == ring.Transfer(0, 0, 0, 0, 0) for plan in plans)
        assert all(dst == ring.successor(src, n) for src, dst, _ in wire.log)


@pytest.mark.parametrize("n", range(2, 9))
def test_broadcast_no_rank_finishes_before_every_rank_received_its_data(n):
    """The token closes the broadcast: each rank's last receive is the token, which is sent
    only after the last rank took in all its data."""
    for root in range(n):
        plans = [ring.broadcast_plan(r, n, root, 10, 3) for r in range(n)]
        for rank, plan in enumerate(plans):
            token = plan.receives[-1].transfer
            assert (token.start, token.stop) == (0, 0)
            assert token.hop >= n, f"rank {rank} ends on a data hop"
            check = plan.receives[0].transfer
            assert (check.hop, check.start, check.stop) == (0, 0, 0), "no check first"


# plan shapes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", WORLD_SIZES)
def test_hops_send_what_the_successor_receives(n):
    for hops_of in (lambda r: ring.all_reduce_hops(r, n),
                    lambda r: ring.reduce_scatter_hops(r, n, 0),
                    lambda r: ring.all_gather_hops(r, n, 0)):
        for rank in range(n):
            mine, theirs = hops_of(rank), hops_of(ring.successor(rank, n))
            assert [h.send_chunk for h in mine] == [h.recv_chunk for h in theirs]
            # the chunk received in one hop is the chunk sent in the next (within a phase)
            for this, following in zip(mine, mine[1:], strict=False):
                if this.reduce == following.reduce:
                    assert following.send_chunk == this.recv_chunk


def test_single_rank_plans_are_empty():
    for plan in (ring.all_reduce_plan(0, 1, 10, 3), ring.reduce_scatter_plan(0, 1, 10, 3),
                 ring.all_gather_plan(0, 1, 10, 3), ring.broadcast_plan(0, 1, 0, 10, 3)):
        assert plan.first_sends == () and plan.receives == () and plan.sent_messages() == 0


def test_ring_order_is_a_function_of_the_member_set():
    ids = ["node-b", "node-a", "c", "node-10", "node-9"]
    expected = ring.ring_order(ids)
    assert expected == sorted(ids)
    for seed in range(5):
        shuffled = ids[:]
        random.Random(seed).shuffle(shuffled)
        assert ring.ring_order(shuffled) == expected


@pytest.mark.parametrize("n", WORLD_SIZES)
def test_successor_and_predecessor_make_one_cycle(n):
    seen, rank = [], 0
    for _ in range(n):
        seen.append(rank)
        assert ring.predecessor(ring.successor(rank, n), n) == rank
        rank = ring.successor(rank, n)
    assert rank == 0 and sorted(seen) == list(range(n))


# chunk and segment bounds -----------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(length=st.integers(0, 10_000), parts=st.integers(1, 64))
def test_chunk_bounds_cover_contiguously_with_sizes_differing_by_at_most_one(length, parts):
    bounds = ring.chunk_bounds(length, parts)
    assert len(bounds) == parts
    assert bounds[0][0] == 0 and bounds[-1][1] == length
    for (_, stop), (start, _) in zip(bounds, bounds[1:], strict=False):
        assert stop == start
    sizes = [hi - lo for lo, hi in bounds]
    assert min(sizes) >= 0 and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the larger chunks come first
    assert sum(sizes) == length


@settings(max_examples=300, deadline=None)
@given(start=st.integers(0, 1000), size=st.integers(0, 2000), segment=st.integers(1, 500))
def test_segment_bounds_cover_the_chunk_in_bounded_pieces(start, size, segment):
    stop = start + size
    bounds = ring.segment_bounds(start, stop, segment)
    if size == 0:
        assert bounds == [(start, start)]  # an empty chunk still costs one message
        return
    assert bounds[0][0] == start and bounds[-1][1] == stop
    for (_, hi), (lo, _) in zip(bounds, bounds[1:], strict=False):
        assert hi == lo
    assert all(0 < hi - lo <= segment for lo, hi in bounds)
    assert len(bounds) == -(-size // segment)


def test_equal_chunk_bounds():
    assert ring.equal_chunk_bounds(3, 4) == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert ring.equal_chunk_bounds(0, 3) == [(0, 0)] * 3


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 8), length=st.integers(0, 60), segment=st.integers(1, 9),
       seed=st.integers(0, 2**16))
def test_all_reduce_property(n, length, segment, seed):
    data = inputs(n, length, seed)
    buffers = [x.copy() for x in data]
    simulate([ring.all_reduce_plan(r, n, length, segment) for r in range(n)], buffers,
             zero_copy=True, rng=random.Random(seed))
    for buffer in buffers:
        np.testing.assert_array_equal(buffer, np.sum(data, axis=0))


# ring order from measured bandwidth -----------------------------------------------------------

def _matrix(n, rate=1000.0):
    return [[0.0 if i == j else rate for j in range(n)] for i in range(n)]


def test_fastest_ring_order_avoids_a_slow_pair():
    # a and c are joined by a slow link both ways: the sorted ring a-b-c-d-a does not use
    # it either, but a-c-b-d-a would; and a slow b->c forces b and c apart in that direction
    bw = _matrix(4)
    bw[1][2] = 100.0  # b -> c is slow
    order = ring.fastest_ring_order(["d", "c", "b", "a"], bw)
    assert order[0] == "a"
    links = list(zip(order, order[1:] + order[:1], strict=False))
    assert ("b", "c") not in links
    index = {m: i for i, m in enumerate("abcd")}
    assert ring.bottleneck([index[m] for m in order], bw) == 1000.0


def test_fastest_ring_order_two_sites():
    # two sites of three machines each, fast inside a site, slow between them: the best ring
    # crosses between sites exactly twice (any ring must cross at least twice)
    sites = [0, 0, 0, 1, 1, 1]
    bw = [[0.0 if i == j else (1000.0 if sites[i] == sites[j] else 50.0) for j in range(6)]
          for i in range(6)]
    bw[3][0] = bw[0][3] = 80.0  # one cross link is a little better
    ids = [f"n{i}" for i in range(6)]
    order = ring.fastest_ring_order(ids, bw)
    idx = [ids.index(m) for m in order]
    crossings = sum(sites[idx[k]] != sites[idx[(k + 1) % 6]] for k in range(6))
    assert crossings == 2
    assert ring.bottleneck(idx, bw) == 50.0  # the two crossings: 80 is used, 50 unavoidable
    links = list(zip(idx, idx[1:] + idx[:1], strict=True))
    assert (0, 3) in links or (3, 0) in links


def test_fastest_ring_order_is_deterministic_and_checks_its_input():
    bw = _matrix(5)
    assert ring.fastest_ring_order(list("edcba"), bw) == list("abcde")  # ties: sorted order
    assert ring.fastest_ring_order(["x"], [[0.0]]) == ["x"]
    with pytest.raises(ValueError):
        ring.fastest_ring_order(["a", "b"], [[0.0]])
    with pytest.raises(ValueError):
        ring.fastest_ring_order(["a", "b"], [[0.0, -1.0], [1.0, 0.0]])


def test_fastest_ring_order_greedy_for_many_members():
    n = 12
    bw = _matrix(n)
    for j in range(n):
        bw[0][j] = 10.0 if j else 0.0  # node 0 sends slowly to everyone but node 5
    bw[0][5] = 900.0
    order = ring.fastest_ring_order([f"m{i:02d}" for i in range(n)], bw)
    assert order[:2] == ["m00", "m05"] and sorted(order) == [f"m{i:02d}" for i in range(n)]


def _two_sites(sites, inside=950.0, across=480.0):
    n = len(sites)
    return [[0.0 if i == j else (inside if sites[i] == sites[j] else across) for j in range(n)]
            for i in range(n)]


def test_measured_ring_order_crosses_between_sites_twice():
    # sites alternate in id order, so the sorted ring crosses on every link
    ids = ["n0", "n1", "n2", "n3"]
    sites = [0, 1, 0, 1]
    order = ring.measured_ring_order(ids, _two_sites(sites))
    idx = [ids.index(m) for m in order]
    assert order[0] == "n0"
    assert sum(sites[idx[k]] != sites[idx[(k + 1) % 4]] for k in range(4)) == 2


def test_measured_ring_order_keeps_sorted_order_on_equal_links():
    rng = random.Random(7)
    for _ in range(50):  # rates within +-4% of each other: noise, not topology
        bw = [[0.0 if i == j else 1000.0 * rng.uniform(0.96, 1.04) for j in range(5)]
              for i in range(5)]
        assert ring.measured_ring_order(list("edcba"), bw) == list("abcde")


def test_measured_ring_order_keeps_sorted_order_when_it_is_as_good():
    # sites already contiguous in id order: sorted order crosses twice, nothing beats it
    assert ring.measured_ring_order(["a", "b", "c", "d"], _two_sites([0, 0, 1, 1])) == \
        ["a", "b", "c", "d"]


def test_measured_ring_order_checks_its_input():
    bw = _two_sites([0, 1, 0])
    bw[1][2] = float("nan")
    with pytest.raises(ValueError, match="from b to c"):
        ring.measured_ring_order(["a", "b", "c"], bw)


def test_measured_ring_order_is_not_fooled_by_noise_on_the_slowest_links():
    # as measured through a shared 200 Mbit/s uplink: every crossing is slow and noisy, so a
    # ring that crosses on all four links can have the highest slowest link by noise alone
    ids = ["n0", "n1", "n2", "n3"]
    sites = [0, 1, 0, 1]
    rng = random.Random(3)
    for _ in range(200):
        bw = [[0.0 if i == j else rng.uniform(480, 560) if sites[i] == sites[j]
               else rng.uniform(50, 56) for j in range(4)] for i in range(4)]
        order = ring.measured_ring_order(ids, bw)
        idx = [ids.index(m) for m in order]
        assert sum(sites[idx[k]] != sites[idx[(k + 1) % 4]] for k in range(4)) == 2, bw
