"""``ringtrain submit`` across network namespaces: two idle agents, each on its own
emulated device, take a job handed to them by a third device, train it, and report back; a
submit with a key that is not the pool's is refused, and no agent runs anything for it.

Real processes of the real CLI, one per namespace, static peers by namespace address.
Needs root and iproute2 (skips otherwise). Every wait is bounded; a failure prints every
process's output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ringtrain.comm.security import JobKey, write_key_file
from ringtrain.lab.netns import EmulatedLan

POOL_PORT = 7079
BOUND = 240.0  # seconds: a hang bound for the whole job on a loaded machine, not a speed claim


def _agent(lan: EmulatedLan, i: int, key: Path, out: Path) -> subprocess.Popen:
    peers = [a for j in range(2) for a in ("--peer", f"{lan.address(j)}:{POOL_PORT}")]
    return lan.popen(i, [sys.executable, "-m", "ringtrain", "agent", "--key-file", str(key),
                         "--interface", lan.address(i), "--no-discovery", *peers,
                         "--node-id", f"agent-{i}", "--workdir", str(out / f"work-{i}"),
                         "--jobs", "1"],
                     stdout=open(out / f"agent-{i}.out", "w"), stderr=subprocess.STDOUT)


def _submit(lan: EmulatedLan, key: Path, timeout: float) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "ringtrain", "submit", "digits", "--nodes", "2",
            "--epochs", "1", "--key-file", str(key), "--interface", lan.address(2),
            "--no-discovery", "--peer", f"{lan.address(0)}:{POOL_PORT}", "--node-id",
            "submitter", "--timeout", str(BOUND)]
    return subprocess.run(lan.command(2, argv), capture_output=True, text=True,
                          timeout=timeout, check=False,
                          env={**os.environ, "RINGTRAIN_FORM_TIMEOUT": "10"})


def test_idle_agents_train_a_submitted_job_and_a_stranger_is_refused(tmp_path):
    key, stranger = tmp_path / "job.key", tmp_path / "stranger.key"
    write_key_file(key, JobKey.generate())
    write_key_file(stranger, JobKey.generate())
    with EmulatedLan(3) as lan:
        agents = [_agent(lan, i, key, tmp_path) for i in range(2)]

        def outputs() -> str:
            return "\n".join(f"--- agent-{i}:\n{(tmp_path / f'agent-{i}.out').read_text()}"
                             for i in range(2))

        refused = _submit(lan, stranger, timeout=120)
        # a wrong key is a configuration error, named within seconds (exit 2, issue 14)
        assert refused.returncode == 2, (refused.stdout, refused.stderr, outputs())
        assert "refused our key" in refused.stderr, refused.stderr
        assert "running job" not in outputs()

        done = _submit(lan, key, timeout=BOUND + 30)
        report = f"{done.stdout}\n{done.stderr}\n{outputs()}"
        assert done.returncode == 0, report
        lines = [line for line in done.stdout.splitlines() if " exit code 0: " in line]
        assert len(lines) == 2 and all("done at step" in line for line in lines), report
        for agent in agents:
            assert agent.wait(timeout=60) == 0, outputs()
        print(f"\nrefused: {refused.stderr.strip().splitlines()[-1]}\n{done.stdout}")
