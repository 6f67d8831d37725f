"""examples/torch_diloco.py launched by ``ringtrain node`` on 3 processes: torch DiLoCo with an
int4 pseudo-gradient over the ringtrain backend trains the digits to a useful accuracy, and
every member ends with the same parameters."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytestmark = [pytest.mark.torch, pytest.mark.timeout(150)]  # past BOUND_S, which reports

SIZE = 3
BOUND_S = 120  # ~10 s on a quiet machine, most of it importing torch 3 times
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "torch_diloco.py"


def test_torch_diloco_example_trains_and_members_agree(script_ring):
    deadline = time.monotonic() + BOUND_S
    procs = script_ring.launch(EXAMPLE, ["--rounds", "20", "--inner-steps", "10"], size=SIZE)
    assert script_ring.finish(procs, deadline) == [0] * SIZE, script_ring.report()
    logs = [(script_ring.logs / f"node-{i}.log").read_text() for i in range(SIZE)]
    digests = {re.search(r"device (\d) of 3: 20 rounds, parameters ([0-9a-f]{16})", log).groups()
               for log in logs}
    assert {rank for rank, _ in digests} == {"0", "1", "2"}, script_ring.report()
    assert len({digest for _, digest in digests}) == 1, script_ring.report()
    accuracy = [float(a) for log in logs
                for a in re.findall(r"round 20: test accuracy (\d\.\d+)", log)]
    assert len(accuracy) == 1 and accuracy[0] > 0.9, script_ring.report()
