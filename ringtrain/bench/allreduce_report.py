"""The report of ``ringtrain bench``: each backend's runs (:class:`Series`) and the markdown
table, with the command that reproduces it and what an all-reduce cost in CPU."""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field


def format_size(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


@dataclass
class Series:
    """One backend's runs: per size, each run's median iteration time."""

    name: str
    runs: dict[int, list[float]] = field(default_factory=dict)
    memory: dict[int, int] = field(default_factory=dict)  # largest peak RSS growth seen
    cpu: dict[int, list[float]] = field(default_factory=dict)  # per run: CPU s per iteration
    skipped: str = ""

    def add(self, size: int, time_s: float, peak: int) -> None:
        self.runs.setdefault(size, []).append(time_s)
        self.memory[size] = max(self.memory.get(size, 0), peak)

    def median(self, size: int) -> float | None:
        runs = self.runs.get(size)
        return statistics.median(runs) if runs else None

    def median_cpu(self, size: int) -> float | None:
        runs = self.cpu.get(size)
        return statistics.median(runs) if runs else None

    def best(self, size: int) -> float | None:
        runs = self.runs.get(size)
        return min(runs) if runs else None


def _ratio(value: float) -> str:
    """Two decimals, or two significant digits below 0.1 (so it never reads 0.00)."""
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def command_line(args: argparse.Namespace) -> str:
    parts = ["ringtrain bench", f"-n {args.nodes}", f"--where {args.where}"]
    if args.where == "lan":
        parts.append(f"--rate {args.rate:g}")
        if args.slow_node is not None:
            parts.append(f"--slow-node {args.slow_node} --slow-rate {args.slow_rate:g}")
        if args.sites is not None:
            parts.append(f"--sites {args.sites}"
                         + (f" --uplink {args.uplink:g}" if args.uplink else ""))
        if args.cpu is not None:
            parts.append(f"--cpu {args.cpu:g}")
    if args.probe_bytes:
        parts.append(f"--probe-links {args.probe_links}")
    if args.sizes:
        parts.append(f"--sizes {args.sizes}")
    if args.repeats:
        parts.append(f"--repeats {args.repeats}")
    if args.target_s:
        parts.append(f"--target-s {args.target_s:g}")
    if args.insecure:
        parts.append("--insecure")
    if args.compression != "none":
        parts.append(f"--compression {args.compression}")
    if args.baselines != "gloo,mpi":
        parts.append(f"--baselines {args.baselines}")
    if args.quick:
        parts.append("--quick")
    return " ".join(parts)


def report(args: argparse.Namespace, sizes: list[int], repeats: int, ours: Series,
           gloo: Series, mpi: Series, ordered: Series) -> str:
    """The results as a markdown table, with the command that reproduces it."""
    n = args.nodes
    factor = 2 * (n - 1) / n
    lan = args.where == "lan"
    link = args.rate * 1e6 if lan else None
    if lan and args.slow_node is not None:
        link = min(link, args.slow_rate * 1e6)
    security = "no encryption (--insecure)" if args.insecure else "CURVE-encrypted (keyed)"
    where = (f"emulated LAN, {n} namespaces, links {args.rate:g} Mbit/s"
             + (f", node {args.slow_node} at {args.slow_rate:g} Mbit/s"
                if args.slow_node is not None else "")
             + (f", sites {args.sites} with {args.uplink or args.rate:g} Mbit/s uplinks"
                if args.sites is not None else "")
             + (f", {args.cpu:g} core per device" if args.cpu is not None else "")
             if lan else f"loopback, {n} processes")
    if args.probe_bytes:
        where += f"; ring ordered by measured links ({args.probe_links} probes)"
    effective = " (effective: uncompressed bytes / time)" if args.compression != "none" else ""
    lines = [f"`{command_line(args)}`", "",
             f"{where}; ringtrain {security}, compression {args.compression}; float32 sum; "
             f"{repeats} interleaved run(s) per backend, each the median of its iterations "
             f"(an iteration = slowest rank, after a barrier){effective}.", ""]
    unit = "Gbit/s" if lan else "GB/s"

    def bw(size: int, t: float | None) -> str:
        if t is None:
            return "-"
        busbw = size / t * factor
        if lan:
            return f"{_bandwidth(busbw * 8 / 1e9)} ({busbw * 8 / link:.2f}x link)"
        return _bandwidth(busbw / 1e9)

    header = (f"| size | ringtrain median ms | best ms | busbw {unit} median | best | "
              f"peak RSS / bytes |")
    rule = "|---|---|---|---|---|---|"
    baselines = [(label, series) for label, series in (("sorted ring", ordered), ("gloo", gloo),
                                                       ("mpi", mpi)) if not series.skipped]
    for label, _ in baselines:
        header += f" {label} median ms | {label} busbw {unit} | ringtrain / {label} (busbw) |"
        rule += "---|---|---|"
    lines += [header, rule]
    for size in sizes:
        t, b = ours.median(size), ours.best(size)
        row = (f"| {format_size(size)} | {t * 1e3:.3f} | {b * 1e3:.3f} | {bw(size, t)} | "
               f"{bw(size, b)} | {ours.memory.get(size, 0) / size:.2f} |")
        for _, series in baselines:
            g = series.median(size)
            row += f" {g * 1e3:.3f} | {bw(size, g)} | {_ratio(g / t)} |"
        lines.append(row)
    lines.append("")
    lines += cpu_lines(sizes, ours, gloo)
    if gloo.skipped:
        lines.append(f"Gloo: {gloo.skipped}.")
    if mpi.skipped:
        lines.append(f"MPI: {mpi.skipped}.")
    else:
        from .mpi_baseline import describe

        lines.append(f"MPI: {describe(lan)}.")
    lines.append("algbw = size / time; busbw = algbw x 2(N-1)/N. ratio > 1: ringtrain faster. "
                 "peak RSS / bytes: the largest peak RSS growth of a worker while running "
                 "that size, beyond its input buffer, over the buffer's bytes.")
    return "\n".join(lines)


def cpu_lines(sizes: list[int], ours: Series, gloo: Series) -> list[str]:
    """One line per size: the CPU an all-reduce cost a rank, beside Gloo's when it ran."""
    lines = []
    for size in sizes:
        mine, theirs = ours.median_cpu(size), gloo.median_cpu(size)
        if mine is None:
            continue
        line = f"CPU per all-reduce, {format_size(size)}: ringtrain {mine * 1e3:.3f} ms"
        if theirs is not None:  # Gloo ran
            line += (f", gloo {theirs * 1e3:.3f} ms: ringtrain uses {_ratio(mine / theirs)}x "
                     f"Gloo's CPU")
        lines.append(line + ".")
    return lines + ([""] if lines else [])


def _bandwidth(value: float) -> str:
    """Three decimals, or two significant digits below 0.01: a small all-reduce on a busy
    machine (4 KiB in 8 ms: 0.0005 GB/s) never reads as zero."""
    return f"{value:.3f}" if value >= 0.01 else f"{value:.2g}"
