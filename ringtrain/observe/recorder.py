"""The flight recorder: what a node did last, kept in memory and dumped to a file when it
matters.

Every :class:`~ringtrain.node.node.Node` holds one :class:`FlightRecorder`. The collective
runner opens a :class:`CollectiveRecord` for each collective (sequence, generation, step,
name, digest, the ring neighbours, segments and bytes in and out, timings, and what it is
waiting for while it runs) and closes it with its outcome; the node adds membership events
(formed, re-formed, joined, left, suspected). The last ``capacity`` of each are kept, so a
long run costs a bounded amount of memory.

The record is readable live (:meth:`FlightRecorder.snapshot`, served by ``ringtrain status``)
and written to a JSON file (:meth:`FlightRecorder.dump`) on failure, when a collective runs
past a hang bound, and on SIGUSR1 (``ringtrain node`` arranges those); ``ringtrain doctor``
merges the dumps of a job.

Thread safety: the engine thread writes, any thread may read. Appends and snapshots take a
lock; a record still running is read field by field and may be a moment stale, never torn.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CollectiveError, PeerFailedError

log = logging.getLogger(__name__)
events_log = logging.getLogger("ringtrain.events")

DEFAULT_CAPACITY = 256  # collectives (and, separately, events) kept in memory
DUMP_FORMAT = "ringtrain-flight-recorder/1"

# (messages sent, messages received, bytes out by peer, bytes in by peer, waiting): the
# runner's counters, read when a record starts and when it ends
Counters = Callable[[], tuple[int, int, dict[str, int], dict[str, int], dict[str, Any]]]


@dataclass
class CollectiveRecord:
    """One collective as this node saw it. Times are ``time.time()`` seconds (wall clock, so
    dumps of several nodes can be lined up) plus a monotonic start for durations."""

    sequence: int
    generation: int
    step: int
    name: str
    digest: str
    nbytes: int
    rank: int
    members: tuple[str, ...]
    predecessor: str
    successor: str
    started: float
    state: str = "running"  # running, done, failed
    finished: float | None = None
    seconds: float | None = None
    segments_out: int = 0
    segments_in: int = 0
    bytes_out: dict[str, int] = field(default_factory=dict)
    bytes_in: dict[str, int] = field(default_factory=dict)
    waiting: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    suspect: str | None = None
    _started_monotonic: float = field(default=0.0, repr=False)
    _base: tuple[int, int, dict[str, int], dict[str, int]] | None = field(default=None,
                                                                           repr=False)

    def as_dict(self, counters: Counters | None = None) -> dict[str, Any]:
        """The record as plain JSON data; a running one with its progress so far."""
        data = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        data["members"] = list(self.members)
        if self.state == "running":
            data["age"] = round(time.monotonic() - self._started_monotonic, 3)
            if counters is not None and self._base is not None:
                data.update(_progress(self._base, counters()))
        return data


def _progress(base: tuple[int, int, dict[str, int], dict[str, int]],
              now: tuple[int, int, dict[str, int], dict[str, int], dict[str, Any]]
              ) -> dict[str, Any]:
    sent, received, out, into, waiting = now
    return {"segments_out": sent - base[0], "segments_in": received - base[1],
            "bytes_out": _delta(out, base[2]), "bytes_in": _delta(into, base[3]),
            "waiting": dict(waiting)}


def _delta(now: dict[str, int], base: dict[str, int]) -> dict[str, int]:
    return {peer: count - base.get(peer, 0) for peer, count in now.items()
            if count != base.get(peer, 0)}


class FlightRecorder:
    """The last collectives and membership events of one node.

    Args:
        node_id: the node whose record this is.
        capacity: collectives kept (and, separately, events).
    """

    def __init__(self, node_id: str, capacity: int = DEFAULT_CAPACITY):
        self.node_id = node_id
        self.capacity = capacity
        self._lock = threading.Lock()
        self._collectives: deque[CollectiveRecord] = deque(maxlen=capacity)
        self._events: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._counters: Counters | None = None
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._members: tuple[str, ...] | None = None
        self._turned_away: set[str] = set()  # joiners told "the ring is full" about
        self._full_ring: tuple[str, ...] = ()  # the full ring this node was told it waits for
        self.last_error: str | None = None
        self.collectives_total = 0

    # what the runner and the node call --------------------------------------------------------

    def collective_started(self, name: str, digest: bytes, nbytes: int, generation: int,
                           sequence: int, step: int, rank: int, members: tuple[str, ...],
                           counters: Counters) -> CollectiveRecord:
        """Open the record of a collective that starts now (engine thread)."""
        size = len(members)
        sent, received, out, into, _ = counters()
        record = CollectiveRecord(
            sequence=sequence, generation=generation, step=step, name=name,
            digest=bytes(digest).hex(), nbytes=nbytes, rank=rank,
            members=tuple(members), predecessor=members[(rank - 1) % size],
            successor=members[(rank + 1) % size], started=time.time(),
            _started_monotonic=time.monotonic(), _base=(sent, received, dict(out), dict(into)))
        with self._lock:
            self._counters = counters
            self._collectives.append(record)
            self.collectives_total += 1
        return record

    def collective_finished(self, record: CollectiveRecord,
                            error: BaseException | None = None) -> None:
        """Close ``record``: done, or failed with ``error`` (engine thread)."""
        if record.state != "running":
            return
        counters = self._counters
        if counters is not None and record._base is not None:
            progress = _progress(record._base, counters())
            if error is None:
                progress["waiting"] = {}  # what it waited for last matters only on failure
            for key, value in progress.items():
                setattr(record, key, value)
        record.finished = time.time()
        record.seconds = round(time.monotonic() - record._started_monotonic, 6)
        if error is None:
            record.state = "done"
        else:
            record.state = "failed"
            record.error = f"{type(error).__name__}: {error}"
            if isinstance(error, PeerFailedError):
                record.suspect = error.peer
            if isinstance(error, CollectiveError):
                self.last_error = record.error
        if self._listeners:  # the dict (a deep copy) costs ~10 % of a small collective's CPU
            self._notify("collective", record.as_dict())

    def view_installed(self, view: Any) -> None:
        """A membership view was installed: record formed / re-formed, joined and left."""
        members = tuple(view.members)
        previous, self._members = self._members, members
        fields = {"generation": view.generation, "members": list(members),
                  "rank": view.rank, "world_size": len(members)}
        if previous is None:
            self.event("formed", f"ring formed: {len(members)} members, generation "
                       f"{view.generation} ({', '.join(members)})", **fields)
            return
        joined = sorted(set(members) - set(previous))
        left = sorted(set(previous) - set(members))
        changes = "; ".join(part for part in (
            f"joined: {', '.join(joined)}" if joined else "",
            f"left: {', '.join(left)}" if left else "") if part)
        met = tuple(getattr(view, "met", ()))
        merged = f"; two rings of this job met and merged, from the other ring: " \
            f"{', '.join(met)}; all go on from the model of the member furthest ahead" \
            if met else ""
        self.event("re-formed", f"ring re-formed: {len(members)} members, generation "
                   f"{view.generation} ({changes or 'same members'}){merged}",
                   joined=joined, left=left, met=list(met), **fields)

    def ring_full(self, joiners: tuple[str, ...], max_size: int,
                  full_ring: tuple[str, ...]) -> None:
        """A full ring, from the membership's latest tick: on a member, one line for each
        joiner it has no room for, when it starts waiting; on a node outside, one line when
        it finds the ring it would join full (``full_ring``: its members)."""
        for peer in sorted(set(joiners) - self._turned_away):
            self.event("full", f"{peer} asks to join, but the ring is full ({max_size} nodes, "
                       f"--max-nodes); it joins when a member leaves", peer=peer,
                       max_size=max_size)
        self._turned_away = set(joiners)
        if full_ring and full_ring != self._full_ring:
            self.event("full", f"the ring of {', '.join(full_ring)} is full ({len(full_ring)} "
                       f"nodes, their --max-nodes); this node joins when a member leaves",
                       members=list(full_ring))
        self._full_ring = full_ring

    def suspected(self, peer: str, reason: str) -> None:
        """This node suspects ``peer`` of having failed (when a collective just failed, the
        node's final verdict on whom to blame: it replaces the runner's first guess)."""
        with self._lock:
            record = self._collectives[-1] if self._collectives else None
        if record is not None and record.state == "failed":
            record.suspect = peer
        if peer == self.node_id:  # a member's ABORT named this node
            self.event("suspected", f"blamed by another member: {reason}", peer=peer,
                       reason=reason)
            return
        self.event("suspected", f"suspects {peer}: {reason}", peer=peer, reason=reason)

    def event(self, kind: str, message: str, **fields: Any) -> None:
        """Record an event and log it as one line (logger ``ringtrain.events``; the command
        line prints these, or their JSON with ``--log-json``)."""
        entry = {"time": time.time(), "node": self.node_id, "event": kind,
                 "message": message, **fields}
        with self._lock:
            self._events.append(entry)
        events_log.info("%s", message, extra={"ringtrain_event": entry})
        self._notify("event", entry)

    # what readers call ----------------------------------------------------------------------

    def subscribe(self, listener: Callable[[str, dict[str, Any]], None]) -> None:
        """Call ``listener(kind, data)`` for each finished collective ("collective") and each
        event ("event"), on the thread that recorded it; keep it quick."""
        self._listeners.append(listener)

    def link_bytes(self) -> tuple[dict[str, int], dict[str, int]]:
        """Payload bytes sent to and received from each peer since the node started."""
        counters = self._counters
        if counters is None:
            return {}, {}
        _, _, out, into, _ = counters()
        return dict(out), dict(into)

    def current(self) -> dict[str, Any] | None:
        """The latest collective (running or not), as plain data."""
        with self._lock:
            record = self._collectives[-1] if self._collectives else None
            counters = self._counters
        return None if record is None else record.as_dict(counters)

    def snapshot(self, last: int | None = None) -> dict[str, Any]:
        """Everything kept (or the ``last`` few of each), as plain JSON data."""
        with self._lock:
            records = list(self._collectives)
            events = list(self._events)
            counters = self._counters
        if last is not None:
            records, events = records[-last:], events[-last:]
        return {"format": DUMP_FORMAT, "node": self.node_id, "time": time.time(),
                "pid": os.getpid(), "collectives_total": self.collectives_total,
                "last_error": self.last_error,
                "collectives": [r.as_dict(counters) for r in records], "events": events}

    def dump(self, directory: str | os.PathLike[str], reason: str,
             extra: dict[str, Any] | None = None) -> Path:
        """Write :meth:`snapshot` plus ``reason`` (and ``extra``) to
        ``directory/flight-<node>-<time>.json`` atomically; returns the path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = {**self.snapshot(), "reason": reason, **(extra or {})}
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(data["time"]))
        millis = int(data["time"] * 1000) % 1000
        path = directory / f"flight-{self.node_id}-{stamp}-{millis:03d}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
        os.replace(temporary, path)
        log.info("node %s: flight recorder dumped to %s (%s)", self.node_id, path, reason)
        return path

    def _notify(self, kind: str, data: dict[str, Any]) -> None:
        for listener in self._listeners:
            try:
                listener(kind, data)
            except Exception:  # noqa: BLE001 - an observer must not stop the engine
                log.exception("flight recorder listener failed")


def load_dump(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a dump written by :meth:`FlightRecorder.dump`.

    Raises:
        ValueError: the file is not a flight-recorder dump (the message names the file).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != DUMP_FORMAT:
        raise ValueError(f"{path}: not a ringtrain flight-recorder dump")
    return data
