"""``ringtrain demo`` end to end: it runs, prints the summary and exits 0 or 1 (not 2, not a
traceback). Starts two real node processes; about two seconds."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_prints_the_summary():
    done = subprocess.run([sys.executable, "-m", "ringtrain.cli.main", "demo", "--nodes", "2",
                           "--epochs", "1", "--no-baseline"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 1), done.stderr
    assert "[node 0/2] epoch  1/1" in done.stdout
    assert "[node 1/2] epoch  1/1" in done.stdout
    assert "summary:" in done.stdout
    assert "2 nodes: test accuracy" in done.stdout
    assert "identical on every node: yes" in done.stdout
    assert "target test accuracy 0.95:" in done.stdout


def test_demo_with_int8_compression_reports_the_accuracy_cost():
    done = subprocess.run([sys.executable, "-m", "ringtrain.cli.main", "demo", "--nodes", "2",
                           "--epochs", "1", "--compression", "int8"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 1), done.stderr
    assert "gradients compressed with int8+ef" in done.stdout
    assert "2 nodes (int8+ef): test accuracy" in done.stdout
    assert "identical on every node: yes" in done.stdout
    assert "(int8+ef compression)" in done.stdout
    assert "accuracy with int8+ef" in done.stdout and "vs uncompressed" in done.stdout


def test_demo_refuses_an_unknown_codec_before_starting_nodes():
    done = subprocess.run([sys.executable, "-m", "ringtrain.cli.main", "demo", "--compression",
                           "zip9"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "unknown compression 'zip9'" in done.stderr
    assert "summary" not in done.stdout
