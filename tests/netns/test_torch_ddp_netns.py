"""The unchanged torchrun DDP script (examples/torch_ddp.py) on 4 devices of an emulated LAN,
each ``ringtrain node`` finding the others by mDNS with nothing but a job key: the final
parameters equal the same script's under ``torchrun --nproc-per-node 4`` with Gloo."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ringtrain.comm.security import JobKey, write_key_file
from ringtrain.lab.netns import EmulatedLan
from ringtrain.testing import free_ports

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.torch, pytest.mark.timeout(480)]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BOUND_S = 420
QUIET_MACHINE = {"RINGTRAIN_HEARTBEAT_TIMEOUT": "20", "RINGTRAIN_PROGRESS_FLOOR": "30",
                 "RINGTRAIN_PROGRESS_TIMEOUT": "90", "OMP_NUM_THREADS": "1"}


def _report(logs: Path) -> str:
    return "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}"
                     for path in sorted(logs.glob("*.log")))


def _parameters(prefix: Path, rank: int) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in torch.load(f"{prefix}.{rank}.pt").values()])


def test_torchrun_script_across_namespaces_with_discovery_matches_gloo(tmp_path):
    script = EXAMPLES / "torch_ddp.py"
    call = 'init_process_group(backend="ringtrain")'
    gloo_script = tmp_path / "torch_ddp_gloo.py"
    gloo_script.write_text(script.read_text().replace(call, 'init_process_group(backend="gloo")'))
    key_file = write_key_file(tmp_path / "job.key", JobKey.generate())
    args = ["--epochs", "1"]
    env = {**os.environ, **QUIET_MACHINE}
    deadline = time.monotonic() + BOUND_S
    with EmulatedLan(4) as lan:
        ring = [lan.popen(i, [sys.executable, "-m", "ringtrain", "node", "--job", "ddp",
                              "--key-file", str(key_file), "--node-id", f"dev-{i}",
                              "--world-size", "4", str(script), *args,
                              "--save", str(tmp_path / "ring")],
                          stdout=(tmp_path / f"dev-{i}.log").open("w"),
                          stderr=subprocess.STDOUT, env=env) for i in range(4)]
        gloo = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
             "--master-port", str(free_ports(1)[0]), str(gloo_script), *args,
             "--save", str(tmp_path / "gloo")], stdout=(tmp_path / "torchrun.log").open("w"),
            stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        codes = []
        for proc in [*ring, gloo]:
            try:
                codes.append(proc.wait(max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                for other in [*ring, gloo]:
                    other.kill()
                pytest.fail("a process did not finish in time:\n" + _report(tmp_path))
    assert codes == [0] * 5, _report(tmp_path)
    ours = [_parameters(tmp_path / "ring", rank) for rank in range(4)]
    theirs = _parameters(tmp_path / "gloo", 0)
    for rank in range(1, 4):
        assert torch.equal(ours[rank], ours[0])
    difference = (ours[0] - theirs).abs().max().item()
    print(f"ringtrain (4 namespaces, mDNS) vs torchrun/Gloo: max |difference| = "
          f"{difference:.2e}")
    assert difference < 1e-5
    assert all("of 4 (generation 1)" in (tmp_path / f"dev-{i}.log").read_text()
               for i in range(4)), _report(tmp_path)
