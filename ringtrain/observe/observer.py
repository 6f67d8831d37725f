"""What ``ringtrain node`` adds around a node so people can see it: the status server, the
flight recorder's dumps (on failure, past a hang bound, on request), metrics and a timeline
in the run directory, link rates, and clock offsets to the ring successor.

Files in the node's run directory: ``node.json`` (who and where), ``metrics.jsonl``
(:mod:`~ringtrain.observe.metrics`), ``trace.json`` (:mod:`~ringtrain.observe.timeline`),
``flight-*.json`` (:mod:`~ringtrain.observe.recorder` dumps).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from ..comm.security import JobKey
from ..errors import RingtrainError
from .metrics import MetricsWriter
from .status import StatusServer, query, status_endpoint
from .timeline import TimelineWriter

log = logging.getLogger(__name__)

SAMPLE_INTERVAL = 1.0  # seconds between link-rate samples and hang checks
CLOCK_INTERVAL = 10.0  # seconds between clock measurements of the successor
CLOCK_TIMEOUT = 2.0


class NodeObserver:
    """Watches one node (anything with ``node_id``, ``recorder``, ``state()``,
    ``peer_endpoints()``, ``endpoint``).

    Args:
        node: the node.
        directory: this node's run directory (created).
        key: the job key (authenticates the status server).
        status_listen: ``host:port`` for the status server; None: none.
        hang_seconds: dump the flight recorder once a collective has run this long.
        status_offset: peers serve their status on their port plus this.
    """

    def __init__(self, node: Any, directory: str | os.PathLike[str], key: JobKey | None,
                 status_listen: str | None, hang_seconds: float, status_offset: int = 1):
        self.node = node
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = key
        self.hang_seconds = hang_seconds
        self.status_offset = status_offset
        self.timeline = TimelineWriter(node.node_id, self.directory)
        self.metrics = MetricsWriter(self.directory)
        node.recorder.subscribe(self._on_record)
        self.step: dict[str, Any] = {}
        self.rates: dict[str, dict[str, float]] = {}
        self.dumps: list[str] = []
        self._communicate = 0.0  # seconds in collectives since the last step
        self._bytes = node.recorder.link_bytes()
        self._hang_dumped: set[tuple[int, int]] = set()
        self._stop = threading.Event()
        self.server: StatusServer | None = None
        if status_listen is not None:
            try:
                self.server = StatusServer(node.node_id, status_listen, key, self.status)
            except RingtrainError as exc:  # seeing the node must not stop it training
                node.recorder.event("status-off", f"no status server: {exc} (pick another "
                                    f"--status-port)", error=str(exc))
        (self.directory / "node.json").write_text(json.dumps({
            "node": node.node_id, "endpoint": node.endpoint, "pid": os.getpid(),
            "status": self.server.endpoint if self.server else None,
            "started": time.time()}, indent=1))
        self._sampler = threading.Thread(target=self._sample, name="ringtrain-observer",
                                         daemon=True)
        self._sampler.start()

    # feeds -----------------------------------------------------------------------------------

    def _on_record(self, kind: str, data: dict[str, Any]) -> None:
        self.timeline.on_record(kind, data)
        if kind == "collective" and data.get("seconds"):
            self._communicate += float(data["seconds"])

    def on_step(self, report: Any, started: float, accuracy: float | None = None) -> None:
        """A training step (a trainer's ``StepReport``) that began at wall clock ``started``."""
        out, into = self.node.recorder.link_bytes()
        last_out, last_in = self._bytes
        self._bytes = (out, into)
        communicate, self._communicate = self._communicate, 0.0
        samples = int(sum(report.batch_sizes))
        rate = samples / report.step_seconds if report.step_seconds > 0 else 0.0
        view = self._view()
        row = {"time": started + report.step_seconds, "step": report.step,
               "epoch": report.epoch, "loss": report.loss,
               "accuracy": accuracy, "samples_per_s": round(rate, 1),
               "local_samples": len(report.indices),
               "bytes_out": {p: b - last_out.get(p, 0) for p, b in out.items()
                             if b != last_out.get(p, 0)},
               "bytes_in": {p: b - last_in.get(p, 0) for p, b in into.items()
                            if b != last_in.get(p, 0)},
               "step_s": round(report.step_seconds, 6),
               "compute_s": round(report.compute_seconds, 6),
               "communicate_s": round(communicate, 6),
               "other_s": round(max(0.0, report.step_seconds - report.compute_seconds
                                    - communicate), 6),
               "generation": view.get("generation"), "world_size": len(view.get("members", []))}
        self.metrics.write(row)
        self.step = row
        self.timeline.step(started, report.step_seconds, report.step, report.compute_seconds,
                           report.loss, rate)

    # status ----------------------------------------------------------------------------------

    def _view(self) -> dict[str, Any]:
        try:
            return self.node.state().get("view") or {}
        except (RuntimeError, RingtrainError):  # the engine changed a dict under us
            return {}

    def status(self) -> dict[str, Any]:
        """This node's status, as ``ringtrain status`` shows it."""
        recorder = self.node.recorder
        try:
            state = self.node.state()
        except (RuntimeError, RingtrainError) as exc:
            state = {"error": str(exc)}
        return {"node": self.node.node_id, "pid": os.getpid(), "time": time.time(),
                "endpoint": self.node.endpoint,
                "view": state.get("view"), "stage": state.get("stage"),
                "step": self.step.get("step"), "epoch": self.step.get("epoch"),
                "loss": self.step.get("loss"), "samples_per_s": self.step.get("samples_per_s"),
                "links": self.rates, "collective": recorder.current(),
                "last_error": recorder.last_error, "dumps": self.dumps[-5:],
                "peers": self.node.peer_endpoints(),
                "recent": recorder.snapshot(last=12)}

    # dumps -----------------------------------------------------------------------------------

    def dump(self, reason: str) -> Path:
        """Write the flight recorder (and this node's status) to the run directory."""
        path = self.node.recorder.dump(self.directory, reason, {"status": self.status()})
        self.dumps.append(str(path))
        return path

    def _sample(self) -> None:
        last = time.monotonic()
        last_bytes = self.node.recorder.link_bytes()
        next_clock = time.monotonic() + 1.0
        while not self._stop.wait(SAMPLE_INTERVAL):
            now = time.monotonic()
            current = self.node.recorder.link_bytes()
            seconds = max(now - last, 1e-6)
            peers = set(current[0]) | set(current[1])
            self.rates = {p: {"bytes_out": current[0].get(p, 0), "bytes_in": current[1].get(p, 0),
                              "out_mbit_s": round((current[0].get(p, 0)
                                                   - last_bytes[0].get(p, 0)) * 8e-6 / seconds, 3),
                              "in_mbit_s": round((current[1].get(p, 0)
                                                  - last_bytes[1].get(p, 0)) * 8e-6 / seconds, 3)}
                          for p in sorted(peers)}
            last, last_bytes = now, current
            self._check_hang()
            if now >= next_clock:
                next_clock = now + CLOCK_INTERVAL
                self._measure_clock()

    def _check_hang(self) -> None:
        record = self.node.recorder.current()
        if not record or record.get("state") != "running":
            return
        key = (record["generation"], record["sequence"])
        if record.get("age", 0) >= self.hang_seconds and key not in self._hang_dumped:
            self._hang_dumped.add(key)
            path = self.dump(f"hang: {record['name']} #{record['sequence']} of generation "
                             f"{record['generation']} running for {record['age']:.0f} s")
            self.node.recorder.event("hang-dump", f"{record['name']} #{record['sequence']} "
                                     f"has run {record['age']:.0f} s; flight recorder written "
                                     f"to {path}", path=str(path))

    def _measure_clock(self) -> None:
        """NTP-style: the successor's clock minus ours, over its status link."""
        view = self._view()
        members = view.get("members") or []
        if len(members) < 2 or self.node.node_id not in members:
            return
        successor = members[(members.index(self.node.node_id) + 1) % len(members)]
        endpoint = self.node.peer_endpoints().get(successor)
        if endpoint is None:
            return
        target = status_endpoint(endpoint, self.status_offset)
        sent = time.time()
        try:
            reply = query([target], self.key, CLOCK_TIMEOUT, op="clock")[target]
        except RingtrainError:
            return
        if reply and isinstance(reply.get("time"), (int, float)):
            rtt = float(reply["rtt"])  # request to reply, connection set-up excluded
            middle = float(reply["received"]) - rtt / 2  # our clock when they read theirs
            self.timeline.clock_sample(successor, float(reply["time"]) - middle, rtt, sent)

    def close(self) -> None:
        """Stop watching; write the timeline."""
        self._stop.set()
        self._sampler.join(SAMPLE_INTERVAL + CLOCK_TIMEOUT + 1.0)
        try:
            self.timeline.write()
        except OSError as exc:
            log.warning("could not write the timeline: %s", exc)
        self.metrics.close()
        if self.server is not None:
            self.server.close()
