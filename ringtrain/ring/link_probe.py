"""Link probes: measure the rate of the link from this node to the member ``shift`` ranks on,
under the load a ring puts on its links (every member sends one stream and receives one), so
the members can order the ring around slow links (``Settings.link_probe_bytes``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ..comm.mailbox import Message
from ..comm.shm import LANE_POLL
from ..comm.wire import FLAG_SHM
from ..errors import CollectiveTimeout, PeerFailedError, TransportError
from ..membership.protocol import View
from . import plan as ring
from . import segments
from .collectives import NO_PLAN, Collective

if TYPE_CHECKING:
    from .runner import RingRunner

PROBE_SEGMENT_BYTES = 256 * 1024  # a link probe's segments: this size, or segment_bytes if less


def measure_link(runner: RingRunner, view: View, sequence: int, deadline: float, nbytes: int,
                 shift: int) -> float:
    """Measure the link from this node to the member ``shift`` ranks on.

    Every member streams ``nbytes`` to rank + ``shift`` and answers the stream of rank -
    ``shift`` with an empty acknowledgement once all of it is in: so every member sends
    one stream and receives one, the load a ring puts on its links. The rate is
    ``nbytes`` over the time from the first segment sent to the acknowledgement (one
    round trip more than the transfer, which on a LAN is noise).

    Returns:
        bytes per second.
    """
    n, rank = view.world_size, view.rank
    target, source = view.members[(rank + shift) % n], view.members[(rank - shift) % n]
    segment = min(PROBE_SEGMENT_BYTES, runner.transport.settings.segment_bytes)
    collective = Collective("link_probe", {"collective": "link_probe", "bytes": nbytes,
                                           "shift": shift},
                            np.zeros(min(nbytes, segment), dtype=np.uint8),
                            NO_PLAN, None, lambda result: None)
    bounds = ring.segment_bounds(0, nbytes, segment)
    where = f"link probe #{sequence} of generation {view.generation}"
    sent = received = 0
    answered, rate = False, 0.0
    started = time.monotonic()
    progress_deadline = started + runner.progress_timeout
    while True:
        while sent < len(bounds):
            lo, hi = bounds[sent]
            header = segments.data_header(collective, view, runner.job, sequence, 0,
                                          ring.Transfer(shift, 0, sent, lo, hi), sent == 0)
            frames = [header.pack(), collective.buffer[:hi - lo]]
            if sent == 0:
                frames.append(collective.descriptor_frame)
            if _probe_send(runner, target, frames, where, view, sequence, door=False) is False:
                break
            sent += 1
        if received == len(bounds) and not answered:
            ack = segments.data_header(collective, view, runner.job, sequence, 0,
                                       ring.Transfer(shift, 1, 0, 0, 0), False)
            answered = _probe_send(runner, source, [ack.pack(), b""], where, view,
                                   sequence) is not False
        while (message := runner.mailbox.next_data(view.generation, sequence)) is not None:
            progress_deadline = time.monotonic() + runner.progress_timeout
            if _accept_probe(runner, collective, view, sequence, message, bounds, received,
                                  sent == len(bounds) and not rate, target, source):
                rate = nbytes / max(time.monotonic() - started, 1e-9)
            else:
                received += 1
        if answered and rate:
            break
        runner.check_abandoned(view, sequence, where)
        if runner.mailbox.has_data(view.generation, sequence):
            continue
        now = time.monotonic()
        if now >= min(deadline, progress_deadline):
            error = CollectiveTimeout if now >= deadline else PeerFailedError
            culprit = source if received < len(bounds) else target
            raise error(f"{where}: {received}/{len(bounds)} segments in from {source}, "
                        f"{sent}/{len(bounds)} out to {target}"
                        + ("" if rate else ", not acknowledged"), generation=view.generation,
                        collective=sequence, **({} if error is CollectiveTimeout
                                                else {"peer": culprit}))
        runner.stage = (f"{where}: {sent}/{len(bounds)} segments to {target}, "
                        f"{received}/{len(bounds)} from {source}")
        runner.mailbox.pump(min(deadline, progress_deadline, now + LANE_POLL) - now)
    return rate


def _probe_send(runner: RingRunner, peer: str, frames: list, where: str, view: View,
                sequence: int, door: bool = True) -> Any:
    try:
        return runner.send(peer, frames, door=door)
    except TransportError as exc:
        raise PeerFailedError(f"{where}: cannot send to {peer}: {exc}", peer=peer,
                              generation=view.generation, collective=sequence) from exc


def _accept_probe(runner: RingRunner, collective: Collective, view: View, sequence: int,
                  message: Message, bounds: list[tuple[int, int]], received: int,
                  acknowledgeable: bool, target: str, source: str) -> bool:
    """Check one message of a link probe: the next segment of ``source``'s stream, or
    (when ``acknowledgeable``) ``target``'s acknowledgement of ours (returns True)."""
    header, origin = message.header, message.origin
    runner.check_digest(collective, view, sequence, message)
    n = view.world_size
    shift = (view.members.index(target) - view.rank) % n
    acknowledgement = header.chunk == 1
    got = (origin, header.sender, header.hop, header.chunk, header.segment, header.nbytes)
    if acknowledgement:
        want = (target, view.members.index(target), shift, 1, 0, 0)
        ok = acknowledgeable
    else:
        lo, hi = bounds[min(received, len(bounds) - 1)]
        want = (source, view.members.index(source), shift, 0, received, hi - lo)
        ok = received < len(bounds)
    if not ok or got != want or header.flags & FLAG_SHM:
        raise PeerFailedError(f"{collective.name} #{sequence} of generation "
                              f"{view.generation}: {origin} sent (origin, sender, hop, chunk, "
                              f"segment, nbytes) = {got}, expected {want}", peer=origin,
                              generation=view.generation, collective=sequence)
    return acknowledgement

