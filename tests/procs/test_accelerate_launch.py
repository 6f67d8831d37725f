"""An ordinary Hugging Face Accelerate script (examples/accelerate_ddp.py) launched by
``ringtrain node`` on 3 processes: Accelerate finds the ring in torchrun's variables (3
processes, each its ring rank, MULTI_CPU, over the ringtrain group), each process takes a
third of every epoch, and all three end with the same parameters."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ringtrain.testing import free_ports
from ringtrain.train.datasets import load_digits

pytest.importorskip("torch")
pytest.importorskip("accelerate")
pytestmark = [pytest.mark.torch, pytest.mark.timeout(150)]  # past BOUND_S, which reports

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "accelerate_ddp.py"
SIZE, EPOCHS, BATCH = 3, 2, 32
BOUND_S = 120  # ~10 s on a quiet machine; importing torch and accelerate 3 times is the most
QUIET_MACHINE = {"RINGTRAIN_HEARTBEAT_TIMEOUT": "20", "RINGTRAIN_PROGRESS_FLOOR": "30",
                 "RINGTRAIN_PROGRESS_TIMEOUT": "90", "OMP_NUM_THREADS": "1"}
RING_RANK = re.compile(r"^ringtrain node node-\d: rank (\d) of 3 \(generation 1\)", re.M)
DETECTED = re.compile(r"^accelerate: process (\d+) of (\d+), local (\d+), "
                      r"DistributedType\.(\w+), process group backend (\w+)$", re.M)
RESULT = re.compile(r"^process (\d+): (\d+) steps, test accuracy [\d.]+, "
                    r"parameters ([0-9a-f]{16})$", re.M)


def report(logs: Path) -> str:
    return "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}"
                     for path in sorted(logs.glob("*.log")))


def test_accelerate_detects_the_ring_and_every_process_ends_identical(tmp_path):
    ports = free_ports(SIZE)
    peers = [arg for port in ports for arg in ("--peer", f"127.0.0.1:{port}")]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "ringtrain", "node", "--insecure", "--no-discovery",
         "--port", str(port), "--node-id", f"node-{i}", "--world-size", str(SIZE), *peers,
         str(SCRIPT), "--epochs", str(EPOCHS), "--batch-size", str(BATCH)],
        stdout=(tmp_path / f"node-{i}.log").open("w"), stderr=subprocess.STDOUT,
        env={**os.environ, **QUIET_MACHINE}) for i, port in enumerate(ports)]
    deadline = time.monotonic() + BOUND_S
    for proc in procs:
        try:
            proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail("a process did not finish in time:\n" + report(tmp_path))
    assert [proc.returncode for proc in procs] == [0] * SIZE, report(tmp_path)

    train_samples = len(load_digits().split(0.2, seed=0)[0])
    # Accelerate deals each epoch's batches round-robin: 1/SIZE of them per process
    steps = EPOCHS * math.ceil(math.ceil(train_samples / BATCH) / SIZE)
    hashes = {}
    for i in range(SIZE):
        log = (tmp_path / f"node-{i}.log").read_text()
        ring_rank, detected, result = RING_RANK.search(log), DETECTED.search(log), \
            RESULT.search(log)
        assert ring_rank and detected and result, report(tmp_path)
        rank = int(ring_rank.group(1))
        assert detected.groups() == (str(rank), str(SIZE), "0", "MULTI_CPU", "ringtrain")
        assert result.group(1) == str(rank)
        assert int(result.group(2)) == steps, report(tmp_path)
        hashes[rank] = result.group(3)
    assert sorted(hashes) == list(range(SIZE))
    assert len(set(hashes.values())) == 1, hashes
