"""The MPI baseline of ``ringtrain bench --where lan``: mpiexec starts one rank per namespace
through the agent script and they all-reduce over TCP on the bridge. Times are never
asserted. Skipped, with the reason, where mpi4py, Open MPI 5 or unshare is missing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ringtrain.bench.mpi_baseline import unavailable


def test_quick_lan_bench_measures_mpi_across_namespaces(tmp_path):
    reason = unavailable(lan=True)
    if reason:
        pytest.skip(f"MPI baseline unavailable: {reason}")
    out_json = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "ringtrain", "bench", "--quick", "--where", "lan", "-n", "3",
         "--sizes", "64K", "--baselines", "mpi", "--target-s", "0.05", "--json", str(out_json)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "one rank per namespace, TCP over eth0 only" in done.stdout
    row = next(line for line in done.stdout.splitlines() if line.startswith("| 64 KiB |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert len(cells) == 9 and float(cells[6]) > 0 and float(cells[8]) > 0, row
    saved = json.loads(out_json.read_text())
    assert saved["mpi_skipped"] == "" and len(saved["mpi"]["65536"]) == 1
