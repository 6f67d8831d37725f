"""``ringtrain plot``: a node's line breaks where it was away, and the pictures are drawn."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ringtrain.cli.plot import _broken, draw


def _rows(times: list[float]) -> list[dict[str, float]]:
    return [{"time": t, "step": i, "loss": 1.0 / (i + 1), "accuracy": 0.5,
             "samples_per_s": 100.0, "step_s": 0.1, "compute_s": 0.05,
             "communicate_s": 0.04, "other_s": 0.01, "bytes_out": {"b": 1000}}
            for i, t in enumerate(times)]


def test_a_line_breaks_only_where_the_node_wrote_nothing_for_long() -> None:
    rows = _rows([0.0, 0.1, 0.2, 0.3, 15.0, 15.1])  # killed after 0.3 s, back at 15 s
    xs, ys = _broken(rows, lambda r: r["step"], lambda r: r["loss"])
    assert [math.isnan(x) for x in xs] == [False] * 4 + [True] + [False] * 2
    assert math.isnan(ys[4])
    slow = _rows([0.0, 10.0, 20.0, 30.0])  # a row every 10 s is that node's usual pace
    assert not any(math.isnan(x) for x in _broken(slow, lambda r: r["step"],
                                                  lambda r: r["loss"])[0])


def test_draw_writes_every_picture(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    written = draw({"a": _rows([0.0, 0.1, 5.0]), "b": _rows([0.0, 0.1, 0.2])}, tmp_path)
    assert sorted(p.name for p in written) == [
        "accuracy.png", "links.png", "loss.png", "step_time.png", "throughput.png"]
    assert all(p.stat().st_size > 1000 for p in written)
