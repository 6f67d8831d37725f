"""``ringtrain bench --quick`` on a tiny configuration: it runs, exits 0 and prints a markdown
table with the command that reproduces it. Times are never asserted here."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ringtrain.bench.allreduce import iterations_for, parse_size
from ringtrain.bench.allreduce_report import format_size
from ringtrain.errors import ConfigError


def test_quick_bench_prints_a_table():
    done = subprocess.run(
        [sys.executable, "-m", "ringtrain", "bench", "--quick", "-n", "2", "--sizes", "4K,64K",
         "--baselines", "none", "--target-s", "0.05"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "`ringtrain bench -n 2 --where loopback --sizes 4K,64K" in out
    assert "| size | ringtrain median ms |" in out
    assert "| 4 KiB |" in out and "| 64 KiB |" in out
    assert "CPU per all-reduce, 4 KiB: ringtrain " in out  # no baseline: ringtrain's alone


def test_bad_flags_are_usage_errors():
    done = subprocess.run([sys.executable, "-m", "ringtrain", "bench", "--where", "lan",
                           "--insecure"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "loopback only" in done.stderr
    done = subprocess.run([sys.executable, "-m", "ringtrain", "bench", "--cpu", "0.45"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--cpu needs --where lan" in done.stderr


def test_sizes_and_iterations():
    assert parse_size("4K") == 4096 and parse_size("64MiB") == 64 << 20 and parse_size("8") == 8
    assert format_size(4096) == "4 KiB" and format_size(256 << 20) == "256 MiB"
    for bad in ("3", "x", "5K5"):
        with pytest.raises(ConfigError):
            parse_size(bad)
    assert iterations_for(4096, 4, 1e9, 1.0) == 50
    assert iterations_for(1 << 30, 4, 1e8, 1.0) == 3
