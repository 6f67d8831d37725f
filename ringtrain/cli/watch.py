"""What ``ringtrain node`` does so that people can see it work: timeouts as flags, waiting for
peers (saying who it sees, and why it cannot see the others), a finished run that says so,
and the observer (status server, flight-recorder dumps, metrics, timeline).

``cli/node.py`` calls in here at a few marked points, so the two stay easy to change apart.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from ..comm.security import JobKey, key_from_environment
from ..config import LaunchOptions
from ..errors import ConfigError, RingtrainError
from ..observe.diagnose import diagnose
from ..observe.observer import NodeObserver
from ..train import checkpoint
from . import output

FOREVER = 10 * 365 * 24 * 3600.0  # "until Ctrl-C": a finite bound no one waits out
REPORT_EVERY = 5.0  # seconds between "waiting for peers" lines
# flag -> the Settings field it sets (through RINGTRAIN_<FIELD>, so a script started by
# `ringtrain node` gets it too)
TIMEOUT_FLAGS = {
    "heartbeat_timeout": "a peer silent this long is suspected dead (default 2)",
    "progress_timeout": "longest wait for the next segment of a collective before the "
                        "member holding it up is blamed (default 10)",
    "collective_timeout": "hard cap on one collective (default 120)",
    "reform_timeout": "longest wait for the ring to re-form after a failure (default 30)",
    "handshake_timeout": "longest a connection may take to authenticate (default 5)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``ringtrain node`` for waiting, timeouts and observing."""
    parser.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                        help="give up if no ring formed within this many seconds (exit 1); "
                             "default: wait until Ctrl-C, saying who is seen every "
                             f"{REPORT_EVERY:.0f} s")
    parser.add_argument("--diagnose-after", type=float, default=8.0, metavar="SECONDS",
                        help="while waiting, look for why peers cannot be seen after this "
                             "many seconds, and say (default 8)")
    for name, text in TIMEOUT_FLAGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=None,
                            metavar="SECONDS", help=f"{text}; every node should agree")
    parser.add_argument("--run-dir", default=None,
                        help="built-in job: the run's folder: checkpoints, and per node "
                             "metrics.jsonl, trace.json, flight-recorder dumps (default "
                             "./ringtrain-<job>)")
    parser.add_argument("--status-port", type=int, default=None,
                        help="port of this node's status server, which `ringtrain status` "
                             "asks (default: --port + 1; 0 picks a free one; -1 none)")
    parser.add_argument("--hang-dump", type=float, default=60.0, metavar="SECONDS",
                        help="write the flight recorder to the run folder when a collective "
                             "runs this long (default 60); also on failure and on SIGUSR1")
    parser.add_argument("--lr", type=float, default=None,
                        help="built-in job: the learning rate (default 0.01)")


def apply_timeouts(args: argparse.Namespace) -> None:
    """Put the timeout flags where every node setting is read (``RINGTRAIN_*``)."""
    os.environ["RINGTRAIN_FORM_TIMEOUT"] = str(args.wait if args.wait is not None else FOREVER)
    for name in TIMEOUT_FLAGS:
        value = getattr(args, name)
        if value is not None:
            if not value > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
            os.environ[f"RINGTRAIN_{name.upper()}"] = str(value)


def finished_run(directory: Path, epochs: int) -> str | None:
    """If the newest checkpoint in ``directory`` is of a run that reached ``epochs``: the
    sentence that says so and what to do; else None."""
    path = checkpoint.latest(directory) if directory.is_dir() else None
    if path is None:
        return None
    state = checkpoint.load(path)
    if state.epoch < epochs:
        return None
    return (f"this job already finished here: step {state.step}, epoch {state.epoch} of "
            f"{epochs}; the model is in {path}. To train again, pass another --run-dir (or "
            f"remove {directory}/), or more --epochs to go on from it.")


def status_listen(options: LaunchOptions, port: int | None) -> str | None:
    """Where this node's status server listens: the node's own host, ``port`` (default
    the node's port + 1; -1: no server)."""
    if port is None:
        port = options.port + 1 if options.port else 0
    if port < 0:
        return None
    host = "0.0.0.0"
    if options.interface is not None and options.interface.replace(".", "").isdigit():
        host = options.interface
    elif not options.discovery and options.peers and all(
            p.startswith(("127.", "localhost")) for p in options.peers):
        host = "127.0.0.1"
    return f"{host}:{port}"


class _FullRing(logging.Handler):
    """The members of the last full ring this node's membership found it cannot join (its
    "full" event), so the waiting line says why the node waits."""

    def __init__(self) -> None:
        super().__init__()
        self.members: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "ringtrain_event", None)
        if event is not None and event.get("event") == "full" and "members" in event:
            self.members = list(event["members"])


class WaitReporter:
    """While the ring forms: every few seconds one line saying who this node sees and what
    it waits for; after ``diagnose_after`` seconds, why it cannot see the others (the checks
    of ``ringtrain doctor``), again whenever the findings change. A node that found the
    ring full waits for a place instead, and says so."""

    def __init__(self, options: LaunchOptions, diagnose_after: float):
        self.options = options
        self.diagnose_after = diagnose_after
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ringtrain-waiting",
                                        daemon=True)
        self._full = _FullRing()
        self.started = time.monotonic()

    def __enter__(self) -> WaitReporter:
        logging.getLogger(output.EVENTS_LOGGER).addHandler(self._full)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        # a diagnosis in flight must not hold up the node: it notices the stop and says
        # nothing more
        self._stop.set()
        logging.getLogger(output.EVENTS_LOGGER).removeHandler(self._full)

    def _run(self) -> None:
        options = self.options
        try:
            key: JobKey | None = key_from_environment()
        except RingtrainError:
            key = None
        said: set[str] = set()
        next_diagnosis = self.started + self.diagnose_after
        while not self._stop.wait(REPORT_EVERY):
            waited = time.monotonic() - self.started
            full = self._full.members
            if full:  # the peers are seen: the reason is known, no diagnosis needed
                output.event("waiting", f"waiting for a place ({waited:.0f} s): the ring of "
                             f"{', '.join(full)} is full ({len(full)} nodes, their "
                             f"--max-nodes); this node joins when a member leaves (Ctrl-C "
                             f"to stop)", waited=round(waited, 1), full_ring=full)
                continue
            if time.monotonic() >= next_diagnosis:
                next_diagnosis = time.monotonic() + 6 * REPORT_EVERY
                try:
                    findings = diagnose(options.job, key, options.interface, options.peers,
                                        seconds=2.0, timeout=2.0, mdns=options.discovery,
                                        own_port=options.port)
                except RingtrainError as exc:
                    output.event("diagnosis", f"could not run the checks: {exc}")
                    continue
                if self._stop.is_set():
                    return
                for finding in findings:
                    text = "\n".join(finding.lines())
                    if finding.cause != "ok" and text not in said:
                        said.add(text)
                        output.event("diagnosis", f"cannot see a peer: {text}",
                                     cause=finding.cause, fix=finding.fix)
                seen = [f.sentence for f in findings if f.cause == "ok"]
                if seen:
                    output.event("waiting", f"waiting for peers ({waited:.0f} s): "
                                 f"{'; '.join(seen)}")
                continue
            needs = f"the ring needs {options.min_nodes} nodes (--min-nodes)"
            where = " and ".join(part for part in (
                "by mDNS" if options.discovery else "",
                f"at {', '.join(options.peers)}" if options.peers else "") if part)
            output.event("waiting", f"waiting for peers ({waited:.0f} s): {needs}; looking "
                         f"{where} for job {options.job!r} (Ctrl-C to stop)",
                         waited=round(waited, 1))


def observe(node: Any, run_dir: Path, args: argparse.Namespace,
            options: LaunchOptions) -> NodeObserver:
    """Start the observer of a formed node; SIGUSR1 then dumps its flight recorder."""
    observer = NodeObserver(node, run_dir / node.node_id, node.key,
                            status_listen(options, args.status_port), args.hang_dump)
    if observer.server is not None:
        output.event("status", f"status on {observer.server.endpoint} (ringtrain status); "
                     f"metrics, timeline and dumps in {observer.directory}/",
                     node=node.node_id)

    def on_usr1(_number: int, _frame: object) -> None:
        path = observer.dump("SIGUSR1")
        output.event("dump", f"flight recorder written to {path}", node=node.node_id,
                     path=str(path))

    signal.signal(signal.SIGUSR1, on_usr1)
    return observer
