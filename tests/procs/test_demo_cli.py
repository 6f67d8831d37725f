"""``ringtrain demo`` end to end: it runs, prints the summary and exits 0 or 1 (not 2, not a
traceback). Starts two real node processes; about two seconds."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_prints_the_summary():
    done = subprocess.run([sys.executable, "-m", "ringtrain.cli", "demo", "--nodes", "2",
                           "--epochs", "1", "--no-baseline"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 1), done.stderr
    assert "[node 0/2] epoch  1/1" in done.stdout
    assert "[node 1/2] epoch  1/1" in done.stdout
    assert "summary:" in done.stdout
    assert "2 nodes: test accuracy" in done.stdout
    assert "identical on every node: yes" in done.stdout
    assert "target test accuracy 0.95:" in done.stdout
