"""``ringtrain plot RUN_DIR...``: pictures of a run, and one timeline of all its nodes.

Reads every node's ``metrics.jsonl`` and ``trace.json`` under the run folders given (a run
folder of ``ringtrain node`` holds one subfolder per node; folders copied from several
devices can be given together) and writes, into ``--out`` (default: the first folder):

- ``loss.png``: training loss against step and against time, per node;
- ``accuracy.png``: test accuracy at each epoch's end against step and time, per node;
- ``throughput.png``: samples/s per node against step;
- ``links.png``: payload bandwidth of every link (node -> peer), MB/s against time;
- ``step_time.png``: each step's time split into compute, communication and the rest, per
  node, and the spread of step times across nodes;
- ``timeline.json``: the nodes' traces merged on one clock (Chrome trace JSON: open it in
  ui.perfetto.dev or chrome://tracing).

Needs matplotlib: ``pip install 'ringtrain[plot]'``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..observe.metrics import METRICS_FILE, read_metrics
from ..observe.timeline import TRACE_FILE, load_trace, merge


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the subcommand."""
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run folders of `ringtrain node` (or single nodes' folders)")
    parser.add_argument("--out", default=None,
                        help="where the PNGs and timeline.json go (default: the first RUN_DIR)")


def _node_folders(run_dirs: list[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for name in run_dirs:
        path = Path(name)
        if not path.is_dir():
            raise ConfigError(f"no such run folder: {path}")
        for folder in [path, *sorted(p for p in path.iterdir() if p.is_dir())]:
            if (folder / METRICS_FILE).exists() or (folder / TRACE_FILE).exists():
                found[folder.name] = folder
    if not found:
        raise ConfigError(f"no metrics.jsonl or trace.json under {', '.join(run_dirs)}")
    return found


GAP_SECONDS = 2.0  # at least this long without a row breaks a node's line ...
GAP_INTERVALS = 5  # ... and at least this many times its usual interval between rows


def _broken(rows: list[dict[str, Any]], x: Callable[[dict[str, Any]], float],
            y: Callable[[dict[str, Any]], float]) -> tuple[list[float], list[float]]:
    """The points of ``rows``, with a NaN where the node wrote nothing for much longer than
    usual (it was killed and restarted, or stalled), so the line breaks there instead of
    drawing a straight line across the time it was away."""
    times = [row["time"] for row in rows if "time" in row]
    intervals = sorted(b - a for a, b in zip(times, times[1:], strict=False))
    usual = intervals[len(intervals) // 2] if intervals else 0.0
    gap = max(GAP_SECONDS, GAP_INTERVALS * usual)
    xs: list[float] = []
    ys: list[float] = []
    last = None
    for row in rows:
        if last is not None and row.get("time", last) - last > gap:
            xs.append(math.nan)
            ys.append(math.nan)
        last = row.get("time", last)
        xs.append(x(row))
        ys.append(y(row))
    return xs, ys


def draw(metrics: dict[str, list[dict[str, Any]]], out: Path) -> list[Path]:
    """Write the PNGs; returns their paths."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("ringtrain plot needs matplotlib: pip install 'ringtrain[plot]'") \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = min((r["time"] for rows in metrics.values() for r in rows if "time" in r),
                default=0.0)
    written = []

    def save(figure: Any, name: str) -> None:
        figure.tight_layout()
        path = out / name
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)

    for key, title, name in (("loss", "training loss", "loss.png"),
                             ("accuracy", "test accuracy (end of each epoch)",
                              "accuracy.png")):
        figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
        for node, rows in metrics.items():
            points = [r for r in rows if isinstance(r.get(key), (int, float))]
            style = "-" if key == "loss" else "o-"
            by_step.plot(*_broken(points, lambda r: r["step"], lambda r, k=key: r[k]),
                         style, label=node, markersize=3)
            by_time.plot(*_broken(points, lambda r: r["time"] - start,
                                  lambda r, k=key: r[k]), style, label=node, markersize=3)
        by_step.set_xlabel("step")
        by_time.set_xlabel("seconds since the run began")
        for axes in (by_step, by_time):
            axes.set_ylabel(title)
            axes.grid(alpha=0.3)
            axes.legend(fontsize=8)
        figure.suptitle(title)
        save(figure, name)

    figure, axes = plt.subplots(figsize=(8, 4))
    for node, rows in metrics.items():
        axes.plot(*_broken(rows, lambda r: r["step"], lambda r: r.get("samples_per_s", 0)),
                  label=node, linewidth=0.8)
    axes.set_xlabel("step")
    axes.set_ylabel("samples/s (global batch / step time)")
    axes.set_title("throughput per node")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    save(figure, "throughput.png")

    figure, axes = plt.subplots(figsize=(8, 4))
    for node, rows in metrics.items():
        peers = sorted({p for r in rows for p in (r.get("bytes_out") or {})})
        for peer in peers:
            timed = [r for r in rows if r.get("step_s")]
            axes.plot(*_broken(timed, lambda r: r["time"] - start,
                               lambda r, p=peer: (r.get("bytes_out") or {}).get(p, 0)
                               / r["step_s"] / 1e6),
                      label=f"{node} -> {peer}", linewidth=0.8)
    axes.set_xlabel("seconds since the run began")
    axes.set_ylabel("MB/s sent over the link (per step)")
    axes.set_title("bandwidth per link")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    save(figure, "links.png")

    figure, (split, spread) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(metrics)
    parts = [("compute_s", "compute"), ("communicate_s", "communication"), ("other_s", "other")]
    bottoms = [0.0] * len(names)
    for key, label in parts:
        means = [1e3 * sum(r.get(key, 0) for r in rows) / max(1, len(rows))
                 for rows in metrics.values()]
        split.bar(names, means, bottom=bottoms, label=label)
        bottoms = [b + m for b, m in zip(bottoms, means, strict=True)]
    split.set_ylabel("mean ms per step")
    split.set_title("where a step's time goes (collectives overlap compute)")
    split.legend(fontsize=8)
    spread.boxplot([[1e3 * r.get("step_s", 0) for r in rows] for rows in metrics.values()],
                   showfliers=False)
    spread.set_xticks(range(1, len(names) + 1), names)
    spread.set_ylabel("step time, ms")
    spread.set_title("step-time spread per node")
    save(figure, "step_time.png")
    return written


def run(args: argparse.Namespace) -> int:
    """Draw the run's pictures and merge its timelines."""
    folders = _node_folders(args.run_dirs)
    out = Path(args.out or args.run_dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    metrics = {node: read_metrics(folder / METRICS_FILE) for node, folder in folders.items()
               if (folder / METRICS_FILE).exists()}
    written = draw({n: rows for n, rows in metrics.items() if rows}, out) if any(
        metrics.values()) else []
    traces = {node: load_trace(folder / TRACE_FILE) for node, folder in folders.items()
              if (folder / TRACE_FILE).exists()}
    if traces:
        merged = merge(traces)
        path = out / "timeline.json"
        path.write_text(json.dumps(merged, ensure_ascii=False), encoding="utf-8")
        written.append(path)
        other = merged["otherData"]
        print(f"timeline of {len(traces)} nodes on one clock (offsets estimated over the "
              f"ring, {other['measured_links']} links measured, closure error "
              f"{other['ring_closure_us']} us): {path}")
    for path in written:
        print(path)
    return 0
