"""What the default view of ``ringtrain`` prints: events and errors, routine events rarely."""

from __future__ import annotations

import logging

from ringtrain.cli.output import ROUTINE_SECONDS, _EventsAndErrors


def _event(kind: str, created: float) -> logging.LogRecord:
    return logging.makeLogRecord({"created": created, "levelno": logging.INFO,
                                  "ringtrain_event": {"event": kind, "node": "n0"}})


def test_checkpoints_show_at_most_once_per_period_but_every_other_event_shows() -> None:
    view = _EventsAndErrors(every_routine_event=False)
    shown = [view.filter(_event("checkpoint", t)) for t in (0.0, 0.2, 1.0, ROUTINE_SECONDS)]
    assert shown == [True, False, False, True]
    assert all(view.filter(_event("re-formed", t)) for t in (0.0, 0.1, 0.2))


def test_json_lines_carry_every_checkpoint() -> None:
    view = _EventsAndErrors(every_routine_event=True)
    assert all(view.filter(_event("checkpoint", t)) for t in (0.0, 0.1, 0.2))


def test_errors_show_and_other_log_lines_do_not() -> None:
    view = _EventsAndErrors(every_routine_event=False)
    assert view.filter(logging.makeLogRecord({"levelno": logging.ERROR}))
    assert not view.filter(logging.makeLogRecord({"levelno": logging.WARNING}))
