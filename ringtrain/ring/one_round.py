"""A small all-reduce in one round: every member sends its whole buffer to every other, takes
one buffer from each, and adds them all in rank order, so every member computes the very same
sum. Latency is one hop instead of the ring's 2(N-1) (``Collective.direct``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from ..comm.mailbox import Message
from ..comm.shm import LANE_POLL
from ..comm.wire import FLAG_SHM, dtype_code
from ..errors import CollectiveTimeout, PeerFailedError, TransportError
from ..membership.protocol import View
from . import plan as ring
from . import segments
from .collectives import Collective

if TYPE_CHECKING:
    from .runner import RingRunner


def exchange(runner: RingRunner, collective: Collective, view: View, sequence: int,
             deadline: float, step: int) -> None:
    """A small all-reduce in one round: send the whole buffer to every other member, take
    one buffer from each, and add them all in rank order, so every member computes the
    very same sum. Latency is one hop instead of 2(N-1)."""
    buffer = collective.buffer
    where = segments.where(collective, view, sequence)
    whole = ring.Transfer(0, view.rank, 0, 0, buffer.size)
    header = segments.data_header(collective, view, runner.job, sequence, step, whole, True)
    frames = [header.pack(), buffer.tobytes(), collective.descriptor_frame]
    unsent = [m for m in view.members if m != runner.node_id]
    contributions: dict[int, np.ndarray] = {view.rank: buffer}  # unchanged until the end
    progress_deadline = time.monotonic() + runner.progress_timeout
    same_host = all(runner.local(m) for m in unsent)
    spin_until = time.monotonic() + runner.transport.settings.spin_seconds \
        if same_host else 0.0
    while unsent or len(contributions) < view.world_size:
        for member in list(unsent):
            try:
                sent = runner.send(member, frames)
            except TransportError as exc:
                raise PeerFailedError(f"{where}: cannot send to {member}: {exc}",
                                      peer=member, generation=view.generation,
                                      collective=sequence) from exc
            if sent is not False:
                unsent.remove(member)
                runner.messages_sent += 1
                runner.bytes_out[member] = runner.bytes_out.get(member, 0) + buffer.nbytes
                progress_deadline = time.monotonic() + runner.progress_timeout
        while (message := runner.mailbox.next_data(view.generation, sequence)) is not None:
            rank = _accept_whole(runner, collective, view, sequence, message, contributions)
            contributions[rank] = np.frombuffer(message.payload, dtype=buffer.dtype)
            progress_deadline = time.monotonic() + runner.progress_timeout
        if not unsent and len(contributions) == view.world_size:
            break
        runner.check_abandoned(view, sequence, where)
        if runner.mailbox.has_data(view.generation, sequence):
            continue  # membership work took in our data: use it before waiting
        now = time.monotonic()
        if now >= min(deadline, progress_deadline):
            missing = unsent or [m for r, m in enumerate(view.members)
                                 if r not in contributions]
            error = CollectiveTimeout if now >= deadline else PeerFailedError
            raise error(f"{where}: nothing from (or to) {', '.join(missing)} for "
                        f"{runner.progress_timeout:.1f} s", generation=view.generation,
                        collective=sequence, **({} if error is CollectiveTimeout
                                                else {"peer": missing[0]}))
        if not unsent and spin_until > now:
            runner.yield_and_look()  # every peer is on this host: their data is due now
            continue
        runner.stage = (f"{where} (one round): {len(contributions)}/{view.world_size} "
                        f"contributions, {len(unsent)} still to send")
        missing = [m for r, m in enumerate(view.members) if r not in contributions]
        runner.waiting = {"from": missing[0] if missing else None,
                          "to": unsent[0] if unsent else None,
                          "received": len(contributions) - 1,
                          "expected": view.world_size - 1, "unsent": len(unsent)}
        local = bool(unsent) and runner.local(unsent[0])
        poll = LANE_POLL if local else runner.poll_interval
        runner.mailbox.pump(min(deadline, progress_deadline, now + poll) - now,
                            writable=unsent[0] if unsent and not local else None,
                            links=runner.links_due(now))
    total = collective.combine(contributions[0], contributions[1])
    for rank in range(2, view.world_size):
        collective.combine(total, contributions[rank], out=total)
    buffer[...] = total


def _accept_whole(runner: RingRunner, collective: Collective, view: View, sequence: int,
                  message: Message, contributions: dict[int, np.ndarray]) -> int:
    """Check one member's whole contribution to a one-round all-reduce; its rank."""
    header = message.header
    where = segments.where(collective, view, sequence)
    runner.check_digest(collective, view, sequence, message)
    rank = view.members.index(message.origin) if message.origin in view.members else -1
    got = (header.sender, header.hop, header.chunk, header.segment, header.nbytes,
           header.dtype)
    want = (rank, 0, rank, 0, collective.buffer.nbytes, dtype_code(collective.buffer.dtype))
    if rank < 0 or rank in contributions or got != want or header.flags & FLAG_SHM:
        raise PeerFailedError(f"{where}: {message.origin} sent (sender, hop, chunk, "
                              f"segment, nbytes, dtype) = {got}, expected {want}"
                              + (" (a second time)" if rank in contributions else ""),
                              peer=message.origin, generation=view.generation,
                              collective=sequence)
    return rank

