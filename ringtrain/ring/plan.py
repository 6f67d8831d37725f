"""Ring math with no I/O: ring order, chunk bounds, segment bounds and the hop schedule.

Ring-allreduce over N members moves a flat buffer cut into N chunks in 2(N-1) hops. In every hop
each member sends one chunk to its successor and receives one from its predecessor:

* reduce-scatter, hops 0 .. N-2: rank r sends chunk (r + a - 1 - h) and receives chunk
  (r + a - 2 - h), adding it into its own copy. After N-1 hops rank r holds the complete
  reduction of chunk (r + a); ``a`` picks which chunk each rank ends up owning.
* all-gather, hops 0 .. N-2: rank r sends chunk (r + a - h) and receives chunk (r + a - h - 1),
  overwriting its copy. The chunk received in one hop is the chunk sent in the next.

All-reduce is reduce-scatter with a = 1 followed by all-gather with a = 1, so each member sends
2(N-1) chunks, i.e. 2(N-1)/N of the buffer, whatever N is. Each chunk travels as one or more
segments, so that receiving, reducing and forwarding a chunk overlap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import permutations


@dataclass(frozen=True)
class Hop:
    """One hop of a ring schedule, seen from one rank."""

    send_chunk: int  # chunk sent to the successor
    recv_chunk: int  # chunk received from the predecessor
    reduce: bool  # True: add the received chunk into ours; False: overwrite ours with it


def ring_order(member_ids: Sequence[str]) -> list[str]:
    """The ring order of a member set: sorted ids, so every member computes the same ring."""
    return sorted(member_ids)


BRUTE_FORCE_MAX = 8  # up to this many members every ring is tried (7! = 5040 orders)


def fastest_ring_order(member_ids: Sequence[str], bandwidth: Sequence[Sequence[float]],
                       margin: float = 0.0) -> list[str]:
    """The ring order whose slowest link is fastest, from measured pairwise bandwidth.

    A ring all-reduce sends the same bytes over every link in lockstep, so it runs at the
    pace of its slowest link: what matters is the bottleneck, then the next slowest link,
    and so on. Up to ``BRUTE_FORCE_MAX`` members every ring is compared on its link
    bandwidths sorted ascending (lexicographically largest wins, rates within ``margin`` of
    each other counting as equal; ties go to the order that sorts first, so every member
    that has the same matrix computes the same ring). Beyond that a greedy walk: from the
    lowest id, always to the fastest unvisited peer.

    Args:
        member_ids: the members, in any order.
        bandwidth: ``bandwidth[i][j]`` is the measured rate from ``sorted(member_ids)[i]`` to
            ``sorted(member_ids)[j]`` (any unit; the diagonal is ignored).
        margin: relative difference below which two rates count as equal (measurements are
            noisy: a ring must not win by the noise on its slowest link).

    Returns:
        the members in ring order, starting with the lowest id.

    Raises:
        ValueError: the matrix is not n x n, or holds a negative or non-finite rate.
    """
    ids = sorted(member_ids)
    n = len(ids)
    if len(bandwidth) != n or any(len(row) != n for row in bandwidth):
        raise ValueError(f"bandwidth must be a {n} x {n} matrix")
    for i, row in enumerate(bandwidth):
        for j, rate in enumerate(row):
            if i != j and not (rate >= 0 and rate != float("inf")):
                raise ValueError(f"bandwidth from {ids[i]} to {ids[j]} is {rate!r}")
    if n <= 2:
        return ids
    if n <= BRUTE_FORCE_MAX:
        best_key, best_order = None, None
        for rest in permutations(range(1, n)):
            order = (0, *rest)
            key = _link_rates(order, bandwidth)
            if best_key is None or _beats(key, best_key, margin):
                best_key, best_order = key, order
        assert best_order is not None
        return [ids[k] for k in best_order]
    order, left = [0], set(range(1, n))
    while left:
        here = order[-1]
        step = max(sorted(left), key=lambda j: bandwidth[here][j])  # first of equals wins
        order.append(step)
        left.remove(step)
    return [ids[k] for k in order]


ORDER_MARGIN = 0.1  # link rates within 10% of each other count as equal


def measured_ring_order(member_ids: Sequence[str], bandwidth: Sequence[Sequence[float]],
                        margin: float = ORDER_MARGIN) -> list[str]:
    """The ring to run on measured links: :func:`fastest_ring_order`, if it beats sorted order
    by more than ``margin``, else sorted order (rates measured on equal links differ by
    noise; reordering for that gains nothing). Rings compare as in
    :func:`fastest_ring_order`, on their link rates sorted ascending: the first pair that
    differs by more than ``margin`` decides. ``bandwidth`` is indexed as there.
    """
    ids = sorted(member_ids)
    fastest = fastest_ring_order(ids, bandwidth, margin)
    rank = {member: index for index, member in enumerate(ids)}
    if _beats(_link_rates([rank[m] for m in fastest], bandwidth),
              _link_rates(range(len(ids)), bandwidth), margin):
        return fastest
    return ids


def slow_links(order: Sequence[str], bandwidth: Sequence[Sequence[float]], fraction: float
               ) -> tuple[bool, ...]:
    """Which links of a ring are slow: entry k for the link from ``order[k]`` to its
    successor, slow when its rate is below ``fraction`` of the ring's fastest link.
    ``bandwidth`` is indexed as in :func:`fastest_ring_order`."""
    rank = {member: index for index, member in enumerate(sorted(order))}
    n = len(order)
    rates = [bandwidth[rank[order[k]]][rank[order[(k + 1) % n]]] for k in range(n)]
    return tuple(rate < fraction * max(rates) for rate in rates)


def _link_rates(order: Sequence[int], bandwidth: Sequence[Sequence[float]]) -> list[float]:
    """The rates of a ring's links, slowest first."""
    n = len(order)
    return sorted(bandwidth[order[k]][order[(k + 1) % n]] for k in range(n))


def _beats(new: list[float], old: list[float], margin: float) -> bool:
    """Whether link rates ``new`` (slowest first) beat ``old``: the first pair that differs
    by more than ``margin`` decides."""
    for a, b in zip(new, old, strict=True):
        if a > (1 + margin) * b:
            return True
        if b > (1 + margin) * a:
            return False
    return False


def bottleneck(order: Sequence[int], bandwidth: Sequence[Sequence[float]]) -> float:
    """The slowest link of a ring given as indexes into ``bandwidth``."""
    n = len(order)
    return min(bandwidth[order[k]][order[(k + 1) % n]] for k in range(n))


def successor(rank: int, world_size: int) -> int:
    """The rank a node sends to."""
    return (rank + 1) % world_size


def predecessor(rank: int, world_size: int) -> int:
    """The rank a node receives from."""
    return (rank - 1) % world_size


def chunk_bounds(length: int, parts: int) -> list[tuple[int, int]]:
    """Split ``length`` elements into ``parts`` contiguous chunks, sizes differing by at most one.

    Chunks may be empty when ``length < parts``.
    """
    base, extra = divmod(length, parts)
    bounds = []
    start = 0
    for index in range(parts):
        stop = start + base + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def equal_chunk_bounds(chunk_length: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` chunks of exactly ``chunk_length`` elements each (for all-gather)."""
    return [(i * chunk_length, (i + 1) * chunk_length) for i in range(parts)]


def segment_bounds(start: int, stop: int, segment_elements: int) -> list[tuple[int, int]]:
    """Cut a chunk into segments of at most ``segment_elements``; an empty chunk is one empty
    segment, so every chunk costs at least one message and every hop is observable."""
    if stop <= start:
        return [(start, start)]
    return [(s, min(s + segment_elements, stop)) for s in range(start, stop, segment_elements)]


def reduce_scatter_hops(rank: int, world_size: int, owner_shift: int) -> list[Hop]:
    """Hops after which ``rank`` owns the complete reduction of chunk (rank + owner_shift)."""
    n = world_size
    return [Hop((rank + owner_shift - 1 - h) % n, (rank + owner_shift - 2 - h) % n, True)
            for h in range(n - 1)]


def all_gather_hops(rank: int, world_size: int, owner_shift: int) -> list[Hop]:
    """Hops that spread every rank's chunk (rank + owner_shift) to every other rank."""
    n = world_size
    return [Hop((rank + owner_shift - h) % n, (rank + owner_shift - h - 1) % n, False)
            for h in range(n - 1)]


def all_reduce_hops(rank: int, world_size: int) -> list[Hop]:
    """The 2(N-1) hops of ring-allreduce for ``rank``."""
    return reduce_scatter_hops(rank, world_size, 1) + all_gather_hops(rank, world_size, 1)


@dataclass(frozen=True)
class Transfer:
    """One message of a collective: a segment [start, stop) of the flat buffer."""

    hop: int
    chunk: int
    segment: int
    start: int
    stop: int


@dataclass(frozen=True)
class Receive:
    """A message a rank expects from its predecessor, in arrival order."""

    transfer: Transfer
    reduce: bool  # add into our buffer (True) or overwrite it (False)
    then: Transfer | None  # what to send to the successor once this one is processed


@dataclass(frozen=True)
class Plan:
    """Everything one rank sends and receives in one collective.

    ``first_sends`` go out at once; every other send is triggered by a receive (``then``).
    Messages from the predecessor arrive in exactly ``receives`` order, because each link is
    FIFO and every rank sends in this same order.
    """

    first_sends: tuple[Transfer, ...]
    receives: tuple[Receive, ...]

    def sent_messages(self) -> int:
        """How many messages this rank sends."""
        return len(self.first_sends) + sum(r.then is not None for r in self.receives)


def _segments(hop: int, chunk: int, bounds: tuple[int, int], segment_elements: int
              ) -> list[Transfer]:
    return [Transfer(hop, chunk, j, lo, hi)
            for j, (lo, hi) in enumerate(segment_bounds(*bounds, segment_elements))]


def _next_hop(t: Transfer) -> Transfer:
    return Transfer(t.hop + 1, t.chunk, t.segment, t.start, t.stop)


def _hop_plan(hops: list[Hop], bounds: list[tuple[int, int]], segment_elements: int) -> Plan:
    if not hops:
        return Plan((), ())
    first = tuple(_segments(0, hops[0].send_chunk, bounds[hops[0].send_chunk], segment_elements))
    receives = []
    for h, hop in enumerate(hops):
        last_hop = h + 1 == len(hops)
        for t in _segments(h, hop.recv_chunk, bounds[hop.recv_chunk], segment_elements):
            # the chunk received in hop h is the chunk sent in hop h+1: forward each segment
            # as soon as it is reduced, so receiving, reducing and sending overlap
            receives.append(Receive(t, hop.reduce, None if last_hop else _next_hop(t)))
    return Plan(first, tuple(receives))


def all_reduce_plan(rank: int, world_size: int, length: int, segment_elements: int) -> Plan:
    """Ring-allreduce of ``length`` elements: reduce-scatter then all-gather."""
    return _hop_plan(all_reduce_hops(rank, world_size), chunk_bounds(length, world_size),
                     segment_elements)


def reduce_scatter_plan(rank: int, world_size: int, length: int, segment_elements: int) -> Plan:
    """Reduce-scatter after which rank r holds the reduced chunk r of ``chunk_bounds``."""
    return _hop_plan(reduce_scatter_hops(rank, world_size, 0), chunk_bounds(length, world_size),
                     segment_elements)


def all_gather_plan(rank: int, world_size: int, chunk_length: int, segment_elements: int) -> Plan:
    """All-gather of equal chunks; rank r contributes chunk r."""
    return _hop_plan(all_gather_hops(rank, world_size, 0),
                     equal_chunk_bounds(chunk_length, world_size), segment_elements)


def broadcast_plan(rank: int, world_size: int, root: int, length: int, segment_elements: int
                   ) -> Plan:
    """Pipelined chain broadcast from ``root`` around the ring, opened by an empty check and
    closed by an empty token.

    Hop 0: every rank sends an empty check to its successor, so every rank sees its
    predecessor's descriptor (which holds the root) at once: ranks that disagree on the root
    raise a mismatch even when none of them believes it is the root and would send data.
    The data flows root → root+1 → ... → root-1 in hops 1 .. N-1, each rank forwarding every
    segment as it arrives. Then root-1 starts an empty token (hop N) that goes once around
    the whole ring, each rank passing it on. A rank returns only once the token has reached
    it, i.e. once every rank has accepted data from its predecessor: so no rank can succeed
    while another rejected the collective (say, for a shape mismatch).
    """
    n = world_size
    if n == 1:
        return Plan((), ())
    distance = (rank - root) % n
    first = (Transfer(0, 0, 0, 0, 0),)
    check = Receive(Transfer(0, 0, 0, 0, 0), False, None)
    data = _segments(1, 0, (0, length), segment_elements)
    if distance == 0:
        token = Transfer(n, 0, 0, 0, 0)
        return Plan(first + tuple(data), (check, Receive(token, False, _next_hop(token))))
    receives = [Receive(Transfer(distance, t.chunk, t.segment, t.start, t.stop), False,
                        Transfer(distance + 1, t.chunk, t.segment, t.start, t.stop)
                        if distance < n - 1 else None)
                for t in data]
    token = Transfer(n + distance, 0, 0, 0, 0)
    if distance == n - 1:
        # the last rank starts the token once all its data is in, and ends when it returns
        last = receives[-1]
        receives[-1] = Receive(last.transfer, False, Transfer(n, 0, 0, 0, 0))
        return Plan(first, (check, *receives, Receive(token, False, None)))
    return Plan(first, (check, *receives, Receive(token, False, _next_hop(token))))
