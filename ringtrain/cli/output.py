"""What the ``ringtrain`` command prints while it runs: one line per event by default,
details with ``-v``, JSON lines with ``--log-json``.

Events are log records of the ``ringtrain.events`` logger carrying a ``ringtrain_event``
dict (the flight recorder and the trainer emit them: formed, re-formed, joined, left,
suspected, step redone, checkpoint written, waiting for peers, a diagnosis). By default a
person sees those and errors, each one line; ``-v`` adds warnings and information from every
module, with their details; ``-vv`` adds debugging. ``--log-json`` prints every shown record
as one JSON object per line (``time``, ``level``, ``logger``, ``message`` and, for events,
the event's fields), for programs.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import Any

EVENTS_LOGGER = "ringtrain.events"
ROUTINE_EVENTS = frozenset({"checkpoint"})  # shown at most once per ROUTINE_SECONDS by default
ROUTINE_SECONDS = 30.0


class _EventsAndErrors(logging.Filter):
    """The default view: events, and errors from anywhere. A routine event (a checkpoint
    every 50 steps: several a second on a fast ring) shows at most once per
    ``ROUTINE_SECONDS``; ``-v`` and ``--log-json`` show every one."""

    def __init__(self, every_routine_event: bool) -> None:
        super().__init__()
        self._every_routine_event = every_routine_event
        self._last_shown: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        event = getattr(record, "ringtrain_event", None)
        if event is None:
            return record.levelno >= logging.ERROR
        kind = event.get("event")
        if kind in ROUTINE_EVENTS and not self._every_routine_event:
            if record.created - self._last_shown.get(kind, -math.inf) < ROUTINE_SECONDS:
                return False
            self._last_shown[kind] = record.created
        return True


class HumanFormatter(logging.Formatter):
    """``HH:MM:SS message`` for events; ``HH:MM:SS LEVEL logger: message`` for the rest."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        event = getattr(record, "ringtrain_event", None)
        if event is not None:
            node = event.get("node")
            return f"{stamp} {node + ': ' if node else ''}{record.getMessage()}"
        text = f"{stamp} {record.levelname.lower()} {record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {"time": round(record.created, 6),
                                "level": record.levelname.lower(), "logger": record.name,
                                "message": record.getMessage()}
        event = getattr(record, "ringtrain_event", None)
        if event is not None:
            data.update({k: v for k, v in event.items() if k not in ("time", "message")})
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure(verbosity: int, as_json: bool, stream: Any = None) -> None:
    """Set up the root logger for one run of the command (replacing earlier handlers)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else HumanFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    if verbosity <= 0:
        handler.addFilter(_EventsAndErrors(every_routine_event=as_json))
        root.setLevel(logging.INFO)
    else:
        root.setLevel(logging.INFO if verbosity == 1 else logging.DEBUG)
    logging.getLogger(EVENTS_LOGGER).setLevel(logging.INFO)


def event(kind: str, message: str, node: str | None = None, **fields: Any) -> None:
    """Emit one event line from the command line itself (not from a node's recorder)."""
    logging.getLogger(EVENTS_LOGGER).info(
        "%s", message, extra={"ringtrain_event": {"time": time.time(), "node": node,
                                                  "event": kind, "message": message,
                                                  **fields}})
