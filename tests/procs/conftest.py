"""What the script-launching tests share: ``ringtrain node SCRIPT`` processes on 127.0.0.1,
one ring of ``size``, waited for within a bound that fails with every process's log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ringtrain.testing import free_ports

# generous failure detection: these tests are about results, and several processes importing
# torch on 2 shared cores can go quiet for seconds
QUIET_MACHINE = {"RINGTRAIN_PROGRESS_FLOOR": "30",
                 "RINGTRAIN_PROGRESS_TIMEOUT": "90", "OMP_NUM_THREADS": "1"}


class ScriptRing:
    """Starts ``ringtrain node`` processes that run a script; their logs go to ``logs``."""

    def __init__(self, logs: Path):
        self.logs = logs

    def launch(self, script: Path, args: list[str], size: int = 4,
               extra: tuple[str, ...] = (), heartbeat_timeout: float = 20.0
               ) -> list[subprocess.Popen]:
        """``size`` processes (node-0 ... node-N-1) on 127.0.0.1 running ``script ARGS``. A
        test that kills a member waits out ``heartbeat_timeout`` once: 6 s is enough there
        (three processes importing torch at once on 2 cores held the GIL for at most 0.56 s
        at a time)."""
        ports = free_ports(size)
        peers = [arg for port in ports for arg in ("--peer", f"127.0.0.1:{port}")]
        env = {**os.environ, **QUIET_MACHINE,
               "RINGTRAIN_HEARTBEAT_TIMEOUT": str(heartbeat_timeout)}
        return [subprocess.Popen(
            [sys.executable, "-m", "ringtrain", "node", "--insecure", "--no-discovery",
             "--port", str(port), "--node-id", f"node-{i}", "--world-size", str(size),
             *extra, *peers, str(script), *args],
            stdout=(self.logs / f"node-{i}.log").open("w"), stderr=subprocess.STDOUT, env=env)
            for i, port in enumerate(ports)]

    def finish(self, procs: list[subprocess.Popen], deadline: float) -> list[int]:
        """Every process's exit code, waiting until ``deadline`` (monotonic) at most; on a
        hang, kill them all and fail with every log."""
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                for other in procs:
                    other.kill()
                pytest.fail("a process did not finish in time:\n" + self.report())
        return codes

    def run(self, script_text: str, size: int, bound_s: float) -> dict[int, dict]:
        """Write ``script_text`` beside the logs, run it on a ring of ``size`` within
        ``bound_s``, and return each rank's one ``RESULT {json}`` line (which must hold its
        ``rank``), by rank."""
        script = self.logs / "script.py"
        script.write_text(script_text)
        deadline = time.monotonic() + bound_s
        procs = self.launch(script, [], size=size)
        assert self.finish(procs, deadline) == [0] * size, self.report()
        results = {}
        for i in range(size):
            lines = [line for line in (self.logs / f"node-{i}.log").read_text().splitlines()
                     if line.startswith("RESULT ")]
            assert len(lines) == 1, self.report()
            out = json.loads(lines[0].removeprefix("RESULT "))
            results[out["rank"]] = out
        assert sorted(results) == list(range(size)), self.report()
        return results

    def report(self) -> str:
        """The tail of every log, for a failure message."""
        return "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}"
                         for path in sorted(self.logs.glob("*.log")))


@pytest.fixture
def script_ring(tmp_path: Path) -> ScriptRing:
    """A launcher of ``ringtrain node SCRIPT`` rings logging into the test's folder."""
    return ScriptRing(tmp_path)


@pytest.fixture(scope="module")
def module_script_ring(tmp_path_factory: pytest.TempPathFactory) -> ScriptRing:
    """A ``script_ring`` shared by a module's tests (one launch read by several)."""
    return ScriptRing(tmp_path_factory.mktemp("ring"))
