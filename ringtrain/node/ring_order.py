"""The ring order of a view from its measured links (``Settings.link_probe_bytes``).

Measuring runs on the engine thread as the view's first collectives, so every member does the
same: every member streams to every other (``ring.link_probe.measure_link``), the rates are
all-gathered, and each member computes the order from the very same matrix
(``ring.measured_ring_order``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from ..config import Settings
from ..errors import CollectiveError, MismatchError
from ..membership.protocol import View
from ..ring import collectives
from ..ring import plan as ring
from ..ring.link_probe import measure_link
from ..ring.runner import RingRunner

log = logging.getLogger(__name__)

# runs ``run(sequence, deadline)`` as the next collective of a view (``Executor.collect``)
Collect = Callable[[View, float, Callable[[int, float], Any]], Any]


class RingOrder:
    """The measured links of the installed view, the ring order they give and the links found
    slow, or why this generation has no ring (a measurement failed)."""

    def __init__(self, node_id: str, settings: Settings, runner: RingRunner):
        self.node_id = node_id
        self.settings = settings
        self.runner = runner
        self.links: np.ndarray | None = None  # rates measured for the current view, bytes/s
        self.slow_links: tuple[bool, ...] | None = None  # by ring rank; None: not measured
        self.error: CollectiveError | None = None  # why this generation has no ring

    def forget(self) -> None:
        """A new view is installed: nothing is measured for it yet."""
        self.links, self.slow_links, self.error = None, None, None

    def measures(self, view: View) -> bool:
        """Whether ``view``'s ring is ordered by measuring its links (else: sorted by id)."""
        return bool(self.settings.link_probe_bytes) and view.world_size >= 3

    def order(self, view: View, collect: Collect) -> View:
        """Measure the links of the installed ``view`` and return it in ring order (its
        collectives run in that view from then on).

        If either collective fails, this node keeps no ring for the generation (``error``):
        its collectives fail at once until the ring re-forms, so no two members ever run one
        generation in different orders.
        """
        timeout = self.settings.collective_timeout
        rates = np.zeros(view.world_size)
        try:
            for shift in range(1, view.world_size):
                # a barrier first, so that every member streams in the same round (two
                # streams into one node would halve both rates); it checks that all members
                # probe alike, too
                self._agree_on_probe(view, timeout, shift, collect)
                rates[(view.rank + shift) % view.world_size] = collect(
                    view, timeout, lambda sequence, deadline, shift=shift:
                    measure_link(self.runner, view, sequence, deadline,
                                 self.settings.link_probe_bytes, shift))
            gather = collectives.all_gather(rates, view.rank, view.world_size,
                                            self.runner.segment_elements)
            matrix = collect(view, timeout, lambda sequence, deadline:
                             self.runner.run(gather, view, sequence, deadline))
        except CollectiveError as exc:
            log.warning("node %s: measuring the links of generation %d failed (%s); "
                        "its collectives fail until the ring re-forms", self.node_id,
                        view.generation, exc)
            self.error = exc
            return view
        try:
            order = ring.measured_ring_order(view.members, matrix)
            self.slow_links = ring.slow_links(order, matrix, self.settings.slow_link_fraction)
        except ValueError as exc:  # a member measured nonsense: every member sees the same
            log.warning("node %s: link rates of generation %d unusable (%s); sorted ring "
                        "order", self.node_id, view.generation, exc)
            order = list(view.members)
        self.links = matrix
        log.info("node %s: generation %d ring %s from link rates (Mbit/s) %s", self.node_id,
                 view.generation, " -> ".join(order), self.link_rates_mbit(view))
        return View(view.generation, tuple(order), order.index(self.node_id), met=view.met)

    def _agree_on_probe(self, view: View, timeout: float, shift: int, collect: Collect) -> None:
        """A barrier before probing the links ``shift`` ranks on, which also checks that every
        member probes with the same number of bytes and the same ``slow_link_fraction``
        (all members see a disagreement)."""
        probe = self.settings.link_probe_bytes
        fraction = round(self.settings.slow_link_fraction * 1e6)
        mine = np.array([shift, probe, -probe, fraction, -fraction], dtype=np.int64)
        barrier = collectives.all_reduce([mine], "max", None, view.rank, view.world_size,
                                         self.runner.segment_elements,
                                         direct_bytes=self.settings.direct_bytes)
        sequence, reduced = collect(view, timeout, lambda sequence, deadline: (
            sequence, self.runner.run(barrier, view, sequence, deadline)))
        _, most, least, most_fraction, least_fraction = reduced[0]
        if most != -least or most_fraction != -least_fraction:
            raise MismatchError(f"members measure links with different settings "
                                f"(link_probe_bytes {-least} to {most}, slow_link_fraction "
                                f"{-least_fraction / 1e6:g} to {most_fraction / 1e6:g}; this "
                                f"node {probe} and {fraction / 1e6:g}): set "
                                f"RINGTRAIN_LINK_PROBE_BYTES and RINGTRAIN_SLOW_LINK_FRACTION "
                                f"alike on every node", generation=view.generation,
                                collective=sequence)

    def link_rates_mbit(self, installed: View | None) -> dict[str, dict[str, float]] | None:
        """The measured rates of the ``installed`` view's links, {from: {to: Mbit/s}}, if
        measured."""
        links = self.links
        if links is None or installed is None:
            return None
        members = installed.members
        return {source: {target: round(float(rate) * 8e-6, 1)
                         for target, rate in zip(members, row, strict=True) if target != source}
                for source, row in zip(members, links, strict=True)}

    def slow_link_names(self, view: View | None) -> list[str] | None:
        """The slow links ("a -> b") of ``view``'s ring, which compressed all-reduces encode,
        if the links were measured."""
        slow = self.slow_links
        if slow is None or view is None:
            return None
        return [f"{m} -> {view.members[(k + 1) % view.world_size]}"
                for k, m in enumerate(view.members) if slow[k]]
