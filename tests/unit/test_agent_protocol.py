"""The pool's rows and the choice of agents: pure."""

from __future__ import annotations

import numpy as np
import pytest

from ringtrain.agent.protocol import (
    ROW_BYTES,
    JobReport,
    JobRequest,
    PoolRow,
    assign,
    decode,
    encode,
)
from ringtrain.errors import ConfigError


def agent(name: str, busy: str = "") -> PoolRow:
    return PoolRow(name, "agent", f"10.0.0.{name[-1]}:7078", busy)


def submitter(name: str, request: str, nodes: int) -> PoolRow:
    return PoolRow(name, "submitter", request=JobRequest(request, f"job-{request}", nodes=nodes))


def test_rows_round_trip_and_fit_their_slot():
    row = PoolRow("a1", "agent", "10.0.0.1:7078", "beef0001",
                  JobRequest("beef0001", "digits-1", "script", 3, 2, "train.py", ("--lr", "1")),
                  JobReport("beef0001", 0, "done"), True)
    raw = encode(row)
    assert raw.shape == (ROW_BYTES,) and raw.dtype == np.uint8
    assert decode(raw, "a1") == row


@pytest.mark.parametrize("text", [b"not json", b'{"node": "other", "role": "agent"}',
                                  b'{"node": "a1", "role": "king"}',
                                  b'{"node": "a1", "role": "submitter", "request": '
                                  b'{"request": "beef0001", "job": "x", "kind": "shell"}}'])
def test_a_bad_row_is_refused_naming_the_member(text):
    raw = np.zeros(ROW_BYTES, dtype=np.uint8)
    raw[:len(text)] = np.frombuffer(text, dtype=np.uint8)
    with pytest.raises(ConfigError, match="pool member a1 sent a bad row"):
        decode(raw, "a1")


@pytest.mark.parametrize("script", ["../x.py", "/bin/sh", "x.sh", "a/b.py", ""])
def test_a_request_names_a_script_file_never_a_path(script):
    with pytest.raises(ConfigError, match="script"):
        JobRequest("beef0001", "job", "script", script=script)


def test_requests_take_the_first_idle_agents_in_rank_order():
    rows = [agent("a1"), submitter("s1", "aaaa0001", 2), agent("a2", busy="cccc0003"),
            agent("a3"), agent("a4"), submitter("s2", "bbbb0002", 2)]
    assert assign(rows) == {"aaaa0001": ["a1", "a3"]}  # s2 waits: only a4 is left
    rows[2] = agent("a2")
    assert assign(rows) == {"aaaa0001": ["a1", "a2"], "bbbb0002": ["a3", "a4"]}
