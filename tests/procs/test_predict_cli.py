"""``ringtrain predict --ring``: two real CLI processes on 127.0.0.1 split the digits test
split between them and the one holding the input writes every prediction, in order, equal
to ``ringtrain predict`` alone."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from ringtrain.models import SavedModel, Version, export_model
from ringtrain.testing import free_ports
from ringtrain.train.nn import Dense, ReLU, Sequential

TIMEOUT = 120.0


def test_predict_across_a_ring_of_two_equals_predict_alone(tmp_path):
    model = Sequential(Dense(64, 32), ReLU(), Dense(32, 10), seed=3)
    path, _ = export_model(SavedModel(model, Version("t", 0, 0, "0" * 16), tmp_path),
                           tmp_path / "model.safetensors")
    ports = free_ports(2)
    peers = [a for port in ports for a in ("--peer", f"127.0.0.1:{port}")]
    ring = [subprocess.Popen(
        [sys.executable, "-m", "ringtrain", "predict", str(path),
         *(["digits", "--out", str(tmp_path / "ring.npy")] if i == 0 else []), "--ring",
         "--nodes", "2", "--no-discovery", *peers, "--port", str(ports[i]), "--insecure",
         "--node-id", f"node-{i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    try:
        outputs = [p.communicate(timeout=TIMEOUT) for p in ring]
    finally:
        for p in ring:
            p.kill()
    assert all(p.returncode == 0 for p in ring), outputs
    assert "359 rows over 2 nodes" in outputs[0][1], outputs[0][1]
    alone = subprocess.run([sys.executable, "-m", "ringtrain", "predict", str(path), "digits",
                            "--out", str(tmp_path / "alone.npy")], capture_output=True,
                           text=True, timeout=TIMEOUT)
    assert alone.returncode == 0, alone.stderr
    assert np.array_equal(np.load(tmp_path / "ring.npy"), np.load(tmp_path / "alone.npy"))
