"""The MPI baseline of ``ringtrain bench``: a real ``--quick`` run through mpiexec on loopback
prints MPI columns of real numbers and writes the MPI runs to the JSON. Times are never
asserted. Skipped, with the reason, where mpi4py or Open MPI 5's mpiexec is missing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ringtrain.bench.mpi_baseline import unavailable, write_agent


def table_rows(out: str) -> dict[str, dict[str, str]]:
    """The bench's markdown table: per size label, column name -> cell."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def test_quick_bench_measures_mpi_beside_ringtrain(tmp_path):
    reason = unavailable(lan=False)
    if reason:
        pytest.skip(f"MPI baseline unavailable: {reason}")
    out_json = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "ringtrain", "bench", "--quick", "-n", "2", "--sizes", "4K,64K",
         "--baselines", "mpi", "--target-s", "0.05", "--json", str(out_json)],
        capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MPI: Open MPI 5" in done.stdout and "skipped" not in done.stdout
    rows = table_rows(done.stdout)
    assert set(rows) == {"4 KiB", "64 KiB"}
    for row in rows.values():
        for column in ("mpi median ms", "mpi busbw GB/s", "ringtrain / mpi (busbw)"):
            assert float(row[column]) > 0, (column, row)
    saved = json.loads(out_json.read_text())
    assert saved["mpi_skipped"] == ""
    assert {size: len(runs) for size, runs in saved["mpi"].items()} == {"4096": 1, "65536": 1}
    assert all(t > 0 for runs in saved["mpi"].values() for t in runs)


def test_without_mpi_the_table_says_so_and_has_no_mpi_columns():
    done = subprocess.run(
        [sys.executable, "-m", "ringtrain", "bench", "--quick", "-n", "2", "--sizes", "4K",
         "--baselines", "none", "--target-s", "0.05"],
        capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MPI: not asked for." in done.stdout and "mpi median ms" not in done.stdout


def test_the_agent_enters_only_the_namespaces_of_its_lan(tmp_path):
    agent = write_agent(str(tmp_path), ["rtabc-0", "rtabc-1"])
    done = subprocess.run([agent, "rtother-0", "echo", "hi"], capture_output=True, text=True,
                          timeout=10)
    assert done.returncode == 2 and "not a namespace of this emulated LAN" in done.stderr
