"""Timelines: what the flight recorder and trainer feed in comes out as trace-event JSON that
Perfetto's JSON importer accepts, and merging puts every node on one clock.

``PERFETTO_JSON_SCHEMA`` writes down, as a JSON Schema, what Perfetto's JSON trace importer
(trace_processor, ``json_trace_tokenizer`` and ``json_trace_parser``) requires of a file:
an object whose keys are among the few it knows (``traceEvents`` first: an unknown key
ends its parsing), ``displayTimeUnit`` "ms" or "ns", and events that each have a known
phase, a numeric ``ts`` (all but metadata), integer ``pid``/``tid``, a ``dur`` on complete
events, numeric counter arguments, a scope on instants, and no arrays among an event's own
fields (its tokenizer refuses those). Two rules are about the text, not the values: no
``\\u`` escapes (its string reader rejects them) and no control characters in strings.
"""

from __future__ import annotations

import json
import time

import jsonschema
import pytest

from ringtrain.errors import PeerFailedError
from ringtrain.observe.recorder import FlightRecorder
from ringtrain.observe.timeline import TimelineWriter, merge, ring_offsets

EVENT = {
    "type": "object",
    "required": ["ph", "pid", "tid", "name"],
    "properties": {
        "ph": {"enum": ["B", "E", "X", "i", "I", "C", "M", "b", "e", "n", "s", "t", "f"]},
        "ts": {"type": "number", "minimum": 0},
        "dur": {"type": "number", "minimum": 0},
        "pid": {"type": "integer", "minimum": 0, "maximum": 4294967295},
        "tid": {"type": "integer", "minimum": 0, "maximum": 4294967295},
        "name": {"type": "string"},
        "cat": {"type": "string"},
        "s": {"enum": ["g", "p", "t"]},
        "args": {"type": "object"},
    },
    "additionalProperties": {"not": {"type": "array"}},
    "allOf": [
        {"if": {"properties": {"ph": {"not": {"const": "M"}}}}, "then": {"required": ["ts"]}},
        {"if": {"properties": {"ph": {"const": "X"}}}, "then": {"required": ["dur"]}},
        {"if": {"properties": {"ph": {"const": "C"}}},
         "then": {"required": ["args"], "properties": {"args": {
             "additionalProperties": {"type": "number"}}}}},
        {"if": {"properties": {"ph": {"const": "M"}}},
         "then": {"properties": {"name": {"enum": ["process_name", "thread_name",
                                                   "process_sort_index",
                                                   "thread_sort_index"]},
                                 "args": {"required": ["name"]}}}},
    ],
}
PERFETTO_JSON_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["traceEvents"],
    "propertyNames": {"enum": ["traceEvents", "displayTimeUnit", "otherData", "metadata",
                               "systemTraceEvents"]},
    "properties": {
        "traceEvents": {"type": "array", "items": EVENT, "minItems": 1},
        "displayTimeUnit": {"enum": ["ms", "ns"]},
        "otherData": {"type": "object"},
    },
}


def check_perfetto_json(text: str) -> dict:
    """Validate a trace file's text as Perfetto's JSON importer reads it."""
    assert text.lstrip().startswith('{"traceEvents"'), "traceEvents must come first"
    assert "\\u" not in text, "Perfetto's JSON reader rejects \\u escapes"
    data = json.loads(text)
    jsonschema.validate(data, PERFETTO_JSON_SCHEMA)
    return data


class View:
    """What the recorder reads of a membership view."""

    def __init__(self, generation: int, members: tuple[str, ...], rank: int):
        self.generation, self.members, self.rank = generation, members, rank


def record_run(node: str, successor: str, members: tuple[str, ...], directory) -> str:
    """A node's trace as a real recorder and writer make it (two collectives, a failure, a
    view, a step, clock samples of its successor: n1's clock is 0.25 s ahead of n0's)."""
    recorder = FlightRecorder(node)
    writer = TimelineWriter(node, directory)
    recorder.subscribe(writer.on_record)
    view = View(3, members, members.index(node))
    recorder.view_installed(view)
    counters = lambda: (0, 0, {}, {}, {})  # noqa: E731
    done = recorder.collective_started("all_reduce", b"\x01" * 8, 4096, 3, 0, 7, view.rank,
                                       members, counters)
    recorder.collective_finished(done)
    failed = recorder.collective_started("broadcast", b"\x02" * 8, 64, 3, 1, 7, view.rank,
                                         members, counters)
    recorder.collective_finished(failed, PeerFailedError("n2 sent nothing — for 2 s",
                                                         peer="n2"))
    writer.step(time.time() - 0.05, 0.05, 7, 0.02, 0.5, 1280.0)
    # the successor's clock, measured by this node: theirs minus ours
    writer.clock_sample(successor, 0.25 if node == "n0" else -0.25, 0.001, time.time())
    writer.clock_sample(successor, 9.0, 0.5, time.time())  # a slow sample: not used
    return writer.write().read_text(encoding="utf-8")


def test_a_node_trace_and_the_merged_trace_follow_perfettos_json_format(tmp_path):
    members = ("n0", "n1")
    traces = {}
    for node, successor in (("n0", "n1"), ("n1", "n0")):
        text = record_run(node, successor, members, tmp_path / node)
        traces[node] = check_perfetto_json(text)
        phases = {e["ph"] for e in traces[node]["traceEvents"]}
        assert {"M", "X", "i", "C"} <= phases
    merged = merge(traces, ring=list(members))
    text = json.dumps(merged, ensure_ascii=False)
    data = check_perfetto_json(text)
    assert {e["pid"] for e in data["traceEvents"]} == {1, 2}
    offsets = json.loads(data["otherData"]["clock_offsets_us"])
    assert offsets == {"n0": 0.0, "n1": 250000.0}  # the fastest sample, not the 9 s one
    assert float(data["otherData"]["ring_closure_us"]) == 0.0
    n1_steps = [e for e in data["traceEvents"] if e["pid"] == 2 and e["ph"] == "X"]
    original = [e for e in traces["n1"]["traceEvents"] if e["ph"] == "X"]
    assert n1_steps[0]["ts"] == pytest.approx(original[0]["ts"] - 250000.0, abs=1.0)


def test_the_schema_refuses_what_perfetto_refuses():
    good = {"traceEvents": [{"name": "x", "ph": "X", "ts": 1.0, "dur": 2.0, "pid": 1,
                             "tid": 1}]}
    check_perfetto_json(json.dumps(good))
    for bad in ({"name": "x", "ph": "X", "ts": 1.0, "pid": 1, "tid": 1},  # no dur
                {"name": "x", "ph": "Q", "ts": 1.0, "pid": 1, "tid": 1},  # unknown phase
                {"name": "x", "ph": "i", "pid": 1, "tid": 1},  # no ts
                {"name": "x", "ph": "X", "ts": 1, "dur": 1, "pid": 1, "tid": 1,
                 "stack": [1, 2]}):  # an array among its fields
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"traceEvents": [bad]}, PERFETTO_JSON_SCHEMA)
    with pytest.raises(AssertionError):
        check_perfetto_json(json.dumps({"traceEvents": [{"name": "\u00e9", "ph": "i",
                                                         "ts": 1, "pid": 1, "tid": 1,
                                                         "s": "t"}]}))


def test_ring_offsets_chain_and_report_the_closure():
    offsets, closure = ring_offsets(["a", "b", "c"], {"a": 1.0, "b": 2.0, "c": -2.9})
    assert offsets == {"a": 0.0, "b": 1.0, "c": 3.0}
    assert closure == pytest.approx(0.1)
