"""The pure parts of ``ringtrain bench-rl``: its flags and the tables it prints."""

from __future__ import annotations

import pytest

from ringtrain.bench.rl import Run, kill_table, run, scaling_table, slow_table
from ringtrain.cli.main import build_parser
from ringtrain.errors import ConfigError


def _report(wall, steps=100_000, solved=True, local=40_000, hash_="aa"):
    return {"wall": wall, "solved": solved, "env_steps": steps, "rounds": 50,
            "local_steps": local, "hash": hash_, "max_staleness": 0, "reforms": 0,
            "dropped_rounds": 0, "cpu": 0.45 * wall,
            "seconds": {"acting": 2.0, "training": 2.0, "waiting": 1.0}}


def test_scaling_table_takes_the_slowest_device_and_the_median_run():
    runs = [Run("scaling", 1, "sync", "", [_report(20.0)]),
            Run("scaling", 1, "sync", "", [_report(10.0)]),
            Run("scaling", 4, "sync", "", [_report(4.0), _report(5.0), None, _report(4.5)]),
            Run("scaling", 4, "sync", "", [_report(3.0)] * 4)]
    text = scaling_table(runs)
    assert "| 1 | 2/2 | 15.0 s (10.0-20.0)" in text
    assert "| 4 | 2/2 | 4.0 s (3.0-5.0)" in text and "3.75x" in text


def test_slow_table_compares_the_devices_that_were_not_stopped():
    running = [_report(10.0, local=50_000)] * 3 + [_report(10.0, local=1)]
    stopped = [_report(10.0, local=45_000)] * 3 + [_report(10.0, local=1)]
    text = slow_table([Run("slow", 4, "async", "", running),
                       Run("slow", 4, "async", "stop", stopped)])
    assert "| async | running | 5,000 | 1.00 |" in text
    assert "| async | stopped | 4,500 | 0.90 |" in text


def test_kill_table_checks_the_survivors_hold_one_policy():
    same = Run("kill", 4, "sync", "kill", [_report(9.0)] * 3 + [None])
    differ = Run("kill", 4, "sync", "kill", [_report(9.0), _report(9.0, hash_="bb"),
                                             _report(9.0), None])
    lines = kill_table([same, differ]).splitlines()
    assert "| True | True (aa)" in lines[2] and "| True | False (aa)" in lines[3]


def test_flags_and_bad_scenarios():
    args = build_parser("bench-rl").parse_args(["bench-rl", "--scenarios", "scaling",
                                                "--repeats", "2"])
    assert (args.scenarios, args.repeats, args.cpu, args.nodes) == ("scaling", 2, 0.45, 4)
    args.scenarios = "scaling,fast"
    with pytest.raises(ConfigError, match="scenarios"):
        run(args)
