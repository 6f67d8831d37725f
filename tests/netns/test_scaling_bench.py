"""``ringtrain bench-scaling`` end to end on a tiny model: an emulated LAN per ring size, each
device in its own namespace and CPU budget, real training. Checks that the table is complete
and its numbers sane; never asserts on time (deadlines only catch hangs)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from ringtrain.lab import cpu_budget

ROW = re.compile(r"^\| (\d+) \| (\d+) \| (\d+) \| ([0-9.]+) \| (\d+) \| ([0-9.]+) \(([0-9.]+)%\) "
                 r"\| ([0-9.]+) \| ([0-9.]+) \| (-?[0-9.]+) \| ([0-9.]+) / ([0-9.]+) \| "
                 r"([0-9.]+) \(([0-9.]+)\) \|$")


def test_tiny_run_prints_a_complete_sane_table():
    before = set(cpu_budget.groups())
    done = subprocess.run(
        [sys.executable, "-m", "ringtrain", "bench-scaling", "--nodes", "1,2", "--inputs", "32",
         "--hidden", "64", "--layers", "1", "--batch", "64", "--warmup", "1", "--steps", "3",
         "--reduce-repeats", "2", "--repeats", "1", "--timeout", "15"],
        capture_output=True, text=True, timeout=40, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "0.45 core (cgroup CPU quota)" in done.stdout and "1000 Mbit/s" in done.stdout
    rows = [ROW.match(line) for line in done.stdout.splitlines() if line.startswith("| ")]
    rows = [row for row in rows if row]
    assert [row[1] for row in rows] == ["1", "2"], done.stdout
    for row in rows:
        step, samples, eff = int(row[2]), int(row[3]), float(row[4])
        assert samples > 0 and eff > 0 and step >= 0, row[0]
    assert float(rows[0][4]) == 1.0
    assert float(rows[1][13]) > 0  # the two devices' traffic crossed their emulated links
    assert "gradient 11,048 bytes per all-reduce" in done.stdout
    assert set(cpu_budget.groups()) == before  # no cgroup left behind


def test_a_run_that_cannot_finish_prints_each_devices_report_and_cleans_up():
    before = set(cpu_budget.groups())
    # --timeout 1 is shorter than the report margin: every device reports at once and exits
    done = subprocess.run(
        [sys.executable, "-m", "ringtrain", "bench-scaling", "--nodes", "1", "--inputs", "8",
         "--hidden", "8", "--layers", "1", "--batch", "8", "--repeats", "1", "--timeout", "1"],
        capture_output=True, text=True, timeout=40)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "scaling run on 1 device(s) failed" in done.stderr
    assert "device 0 (exit 3)" in done.stderr and "did not finish in time" in done.stderr
    assert "Thread" in done.stderr  # the device's stacks
    assert set(cpu_budget.groups()) == before
