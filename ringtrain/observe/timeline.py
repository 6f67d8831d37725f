"""Timelines in the Chrome trace-event JSON format, which Perfetto (ui.perfetto.dev) and
chrome://tracing open: one per node, and one merged across the nodes of a job.

Per node (:class:`TimelineWriter`, fed by the flight recorder and the trainer): a complete
event (``ph: "X"``) per collective on the node's "collectives" track and per training step on
its "steps" track, an instant event per membership event, counters for loss and samples/s.
Timestamps are microseconds of the node's wall clock (``time.time()``).

Merging (:func:`merge`): wall clocks of different devices differ. Every node measures the
offset of its ring successor's clock NTP-style over the status link (``clock_samples``:
``offset = their time - (sent + received) / 2``, keeping the sample with the shortest round
trip, whose error is at most half of it). Chaining the offsets along the ring from the node
of rank 0 puts every node on rank 0's clock; going once around the whole ring should come
back to zero, and what it does not (``closure_us``) bounds the accumulated error, reported in
the merged file. Each node becomes one process (``pid``) of the merged trace.

Perfetto's JSON importer is strict in a few ways this module respects: ``traceEvents``
first, ``displayTimeUnit`` one of "ms" / "ns", no ``\\u`` escapes in strings (written as
UTF-8), no arrays among an event's top-level fields, ``ts`` on every event but metadata.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

TRACE_FILE = "trace.json"
MAX_EVENTS = 500_000  # a long run stops adding events here (and says so in the file)


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 1)


class TimelineWriter:
    """Collects one node's trace events and writes them to ``directory/trace.json``.

    Args:
        node_id: the node.
        directory: its run directory.
    """

    def __init__(self, node_id: str, directory: str | os.PathLike[str]):
        self.node_id = node_id
        self.path = Path(directory) / TRACE_FILE
        self._lock = threading.Lock()
        self._events: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": 1, "tid": 0,
             "args": {"name": f"node {node_id}"}},
            {"name": "thread_name", "ph": "M", "pid": 1, "tid": 1,
             "args": {"name": "collectives"}},
            {"name": "thread_name", "ph": "M", "pid": 1, "tid": 2, "args": {"name": "steps"}},
            {"name": "thread_name", "ph": "M", "pid": 1, "tid": 3,
             "args": {"name": "membership"}}]
        self.clock_samples: list[dict[str, Any]] = []
        self.truncated = False

    def _add(self, event: dict[str, Any]) -> None:
        with self._lock:
            if len(self._events) >= MAX_EVENTS:
                self.truncated = True
                return
            self._events.append(event)

    def on_record(self, kind: str, data: dict[str, Any]) -> None:
        """A flight-recorder listener (see ``FlightRecorder.subscribe``)."""
        if kind == "collective" and data.get("finished") is not None:
            self._add({"name": data.get("name", "collective"), "cat": "collective", "ph": "X",
                       "ts": _us(data["started"]), "dur": _us(data.get("seconds") or 0.0),
                       "pid": 1, "tid": 1,
                       "args": {"sequence": data.get("sequence"),
                                "generation": data.get("generation"),
                                "step": data.get("step"), "bytes": data.get("nbytes"),
                                "state": data.get("state"), "error": data.get("error") or "",
                                "segments_in": data.get("segments_in"),
                                "segments_out": data.get("segments_out")}})
        elif kind == "event":
            self._add({"name": data.get("event", "event"), "cat": "membership", "ph": "i",
                       "s": "p", "ts": _us(data["time"]), "pid": 1, "tid": 3,
                       "args": {"message": data.get("message", "")}})

    def step(self, started: float, seconds: float, step: int, compute_seconds: float,
             loss: float, samples_per_s: float) -> None:
        """A training step that began at wall-clock ``started`` and took ``seconds``."""
        self._add({"name": f"step {step}", "cat": "step", "ph": "X", "ts": _us(started),
                   "dur": _us(seconds), "pid": 1, "tid": 2,
                   "args": {"step": step, "compute_ms": round(compute_seconds * 1e3, 3),
                            "loss": loss}})
        self._add({"name": "training", "ph": "C", "ts": _us(started + seconds), "pid": 1,
                   "tid": 2, "args": {"loss": loss, "samples_per_s": samples_per_s}})

    def clock_sample(self, peer: str, offset: float, rtt: float, at: float) -> None:
        """A measurement of ``peer``'s clock: its time minus ours, in seconds."""
        with self._lock:
            self.clock_samples.append({"peer": peer, "offset": offset, "rtt": rtt, "at": at})
            del self.clock_samples[:-64]

    def write(self, extra: dict[str, Any] | None = None) -> Path:
        """Write the trace (atomically); returns its path."""
        with self._lock:
            events = list(self._events)
            samples = list(self.clock_samples)
        data = {"traceEvents": events, "displayTimeUnit": "ms",
                "otherData": {"node": self.node_id, "truncated": str(self.truncated),
                              "clock_samples": json.dumps(samples), **(extra or {})}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        os.replace(temporary, self.path)
        return self.path


def best_offset(samples: list[dict[str, Any]], peer: str) -> tuple[float, float] | None:
    """(offset, rtt) of the sample of ``peer`` with the shortest round trip, or None."""
    mine = [s for s in samples if s.get("peer") == peer]
    if not mine:
        return None
    best = min(mine, key=lambda s: s["rtt"])
    return float(best["offset"]), float(best["rtt"])


def ring_offsets(ring: list[str], successor_offsets: dict[str, float]
                 ) -> tuple[dict[str, float], float]:
    """Clock offsets of every node against ``ring[0]``, from each node's measured offset of
    its successor (``successor_offsets[n]`` = clock(successor of n) - clock(n)).

    Returns:
        (node -> its clock minus ring[0]'s, closure): closure is the sum around the whole
        ring, 0 if every measurement were exact; nodes after a missing measurement get 0.
    """
    offsets = {ring[0]: 0.0}
    total = 0.0
    for index, node in enumerate(ring):
        step = successor_offsets.get(node)
        following = ring[(index + 1) % len(ring)]
        if index + 1 < len(ring):
            offsets[following] = offsets[node] + (step or 0.0)
        total += step or 0.0
    return offsets, total


def merge(traces: dict[str, dict[str, Any]], ring: list[str] | None = None
          ) -> dict[str, Any]:
    """One trace of many nodes' traces (node id -> its trace.json content), on the clock of
    the first node of ``ring`` (default: node ids sorted, the ring's order without measured
    links). Each node becomes a process, named after it."""
    order = list(ring) if ring else sorted(traces)
    order = [n for n in order if n in traces] + sorted(set(traces) - set(order))
    successor_offsets: dict[str, float] = {}
    rtts: dict[str, float] = {}
    for index, node in enumerate(order):
        other = traces[node].get("otherData", {})
        try:
            samples = json.loads(other.get("clock_samples", "[]"))
        except (TypeError, json.JSONDecodeError):
            samples = []
        found = best_offset(samples, order[(index + 1) % len(order)])
        if found is not None:
            successor_offsets[node], rtts[node] = found
    offsets, closure = ring_offsets(order, successor_offsets)
    events: list[dict[str, Any]] = []
    for pid, node in enumerate(order, start=1):
        shift = _us(offsets.get(node, 0.0))
        for event in traces[node].get("traceEvents", []):
            if not isinstance(event, dict):
                continue
            moved = {**event, "pid": pid}
            if "ts" in moved and isinstance(moved["ts"], (int, float)):
                moved["ts"] = round(moved["ts"] - shift, 1)
            events.append(moved)
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"nodes": ", ".join(order),
                          "clock_offsets_us": json.dumps({n: _us(o) for n, o in
                                                          offsets.items()}),
                          "ring_closure_us": str(_us(closure)),
                          "measured_links": str(len(successor_offsets)),
                          "max_rtt_us": str(_us(max(rtts.values(), default=0.0)))}}


def load_trace(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a trace written by :class:`TimelineWriter`.

    Raises:
        ValueError: not a readable trace (the message names the file)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable trace ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise ValueError(f"{path}: no traceEvents")
    return data
