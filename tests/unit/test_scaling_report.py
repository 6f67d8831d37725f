"""The pure parts of ``ringtrain bench-scaling``: sizes, efficiency, the summary of device
reports, the table and the flags. The bench itself runs in tests/netns/test_scaling_bench.py."""

from __future__ import annotations

import pytest

from ringtrain.bench.scaling import (
    Row,
    efficiency,
    median_run,
    model_of,
    parse_nodes,
    summarize,
    table,
)
from ringtrain.cli.main import build_parser
from ringtrain.errors import ConfigError


def report(wall: float, compute: float, reduce_wall: float, alone: list[float]) -> dict:
    return {"wall": wall, "cpu": wall * 0.4, "compute": compute, "wire_bytes": 5000,
            "reduce_wall": reduce_wall,
            "reduce_cpu": reduce_wall * 0.2, "gradient_bytes": 400, "reduce_alone": alone}


def test_nodes_are_parsed_sorted_and_must_include_one():
    assert parse_nodes("1,2,4") == [1, 2, 4]
    assert parse_nodes("4,1") == [1, 4]
    for bad in ("2,4", "1,1", "0,1", "1,x", "", "1,201"):
        with pytest.raises(ConfigError):
            parse_nodes(bad)


def test_efficiency_is_throughput_over_n_times_one_device():
    assert efficiency(200.0, 2, 100.0) == 1.0
    assert efficiency(360.0, 4, 100.0) == pytest.approx(0.9)


def test_summary_takes_the_slowest_device_and_means_of_the_parts():
    results = [report(10.0, 8.0, 1.0, [0.1, 0.3]), report(12.0, 9.0, 2.0, [0.2, 0.1])]
    row = summarize(2, batch=100, steps=10, results=results)
    assert row.step == pytest.approx(1.2)  # the slowest device's 12 s over 10 steps
    assert row.throughput == pytest.approx(2 * 100 * 10 / 12.0)
    assert row.compute == pytest.approx(0.85) and row.reduce == pytest.approx(0.15)
    assert row.reduce_alone == pytest.approx(0.25)  # median of per-repeat maxima 0.2, 0.3
    assert row.waiting == 0.0  # the step's all-reduce took less than the one alone
    assert row.other == pytest.approx(1.2 - 0.85 - 0.15)
    assert row.reduce_cpu == pytest.approx(0.2) and row.wire == 500
    with pytest.raises(ConfigError):
        summarize(3, batch=100, steps=10, results=results)


def test_table_has_a_row_per_size_with_efficiency_against_one_device():
    rows = [Row(1, 1.0, 100.0, 0.9, 0.01, 0.0, 0.2, 0.45, 0.0, 4_000_000),
            Row(2, 1.1, 180.0, 0.9, 0.15, 0.1, 0.2, 0.45, 4_300_000.0, 4_000_000)]
    lines = table(rows).splitlines()
    assert lines[0].startswith("| N | step ms | samples/s | efficiency |")
    assert lines[2].startswith("| 1 | 1000 | 100 | 1.000 |")
    assert lines[3].startswith("| 2 | 1100 | 180 | 0.900 |")
    assert "(13.6%)" in lines[3] and "| 50.0 |" in lines[3]  # share; waiting 150 - 100 ms
    assert lines[3].endswith("| 4.30 (4.00) |")  # eth0 per step beside 2(N-1)/N x gradient


def test_flags_and_the_default_model():
    args = build_parser("bench-scaling").parse_args(["bench-scaling"])
    assert (args.nodes, args.rate, args.cpu, args.batch) == ("1,2,4", 1000.0, 0.45, 3072)
    model = model_of(vars(args))
    assert model.num_params == 512 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10
    args = build_parser("bench-scaling").parse_args(["bench-scaling", "--nodes", "1,2",
                                                     "--cpu", "0.3"])
    assert (parse_nodes(args.nodes), args.cpu) == ([1, 2], 0.3)


def test_the_median_run_is_the_middle_throughput():
    runs = [Row(2, 1.0, t, 0.9, 0.1, 0.1, 0.2, 0.45, 0.0, 8) for t in (300.0, 100.0, 200.0)]
    assert median_run(runs).throughput == 200.0
    assert median_run(runs[:2]).throughput == 100.0  # even count: the lower middle
    with pytest.raises(ConfigError):
        median_run([])
