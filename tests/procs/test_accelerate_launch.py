"""An ordinary Hugging Face Accelerate script (examples/accelerate_ddp.py) launched by
``ringtrain node`` on 3 processes: Accelerate finds the ring in torchrun's variables (3
processes, each its ring rank, MULTI_CPU, over the ringtrain group), each process takes a
third of every epoch, and all three end with the same parameters."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import pytest

from ringtrain.train.datasets import load_digits

pytest.importorskip("torch")
pytest.importorskip("accelerate")
pytestmark = [pytest.mark.torch, pytest.mark.timeout(150)]  # past BOUND_S, which reports

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "accelerate_ddp.py"
SIZE, EPOCHS, BATCH = 3, 2, 32
BOUND_S = 120  # ~10 s on a quiet machine; importing torch and accelerate 3 times is the most
RING_RANK = re.compile(r"^ringtrain node node-\d: rank (\d) of 3 \(generation 1\)", re.M)
DETECTED = re.compile(r"^accelerate: process (\d+) of (\d+), local (\d+), "
                      r"DistributedType\.(\w+), process group backend (\w+)$", re.M)
RESULT = re.compile(r"^process (\d+): (\d+) steps, test accuracy [\d.]+, "
                    r"parameters ([0-9a-f]{16})$", re.M)


def test_accelerate_detects_the_ring_and_every_process_ends_identical(tmp_path,
                                                                         script_ring):
    deadline = time.monotonic() + BOUND_S
    procs = script_ring.launch(SCRIPT, ["--epochs", str(EPOCHS), "--batch-size", str(BATCH)],
                               size=SIZE)
    assert script_ring.finish(procs, deadline) == [0] * SIZE, script_ring.report()

    train_samples = len(load_digits().split(0.2, seed=0)[0])
    # Accelerate deals each epoch's batches round-robin: 1/SIZE of them per process
    steps = EPOCHS * math.ceil(math.ceil(train_samples / BATCH) / SIZE)
    hashes = {}
    for i in range(SIZE):
        log = (tmp_path / f"node-{i}.log").read_text()
        ring_rank, detected, result = RING_RANK.search(log), DETECTED.search(log), \
            RESULT.search(log)
        assert ring_rank and detected and result, script_ring.report()
        rank = int(ring_rank.group(1))
        assert detected.groups() == (str(rank), str(SIZE), "0", "MULTI_CPU", "ringtrain")
        assert result.group(1) == str(rank)
        assert int(result.group(2)) == steps, script_ring.report()
        hashes[rank] = result.group(3)
    assert sorted(hashes) == list(range(SIZE))
    assert len(set(hashes.values())) == 1, hashes
