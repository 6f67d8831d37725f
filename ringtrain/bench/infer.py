"""``ringtrain bench-infer``: inference across 4 local nodes, one of them at half speed.

Each node is a ``ringtrain predict --ring`` process in its own CPU budget
(:mod:`ringtrain.lab.cpu_budget`, root only): three of ``--cores`` and one of half that.
Each measures its own speed (a wall-clock probe of the model), and the batch (the digits'
test split, held by node 0) is split in proportion. The table shows each node's budget,
measured speed and share; the last line checks the ring's predictions against one process.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..lab.cpu_budget import CpuBudget
from ..models import SavedModel, Version, export_model
from ..testing import free_ports
from ..train.datasets import load_digits
from ..train.nn import Dense, ReLU, Sequential, softmax_cross_entropy
from ..train.optim import Adam

NODES = 4
_SHARE = re.compile(r"(node-\d\d) (\d+) rows \(([\d,]+) samples/s\)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the subcommand."""
    parser.add_argument("--cores", type=float, default=0.4,
                        help="CPU budget of the full-speed nodes (default 0.4; node 3 gets "
                             "half)")
    parser.add_argument("--probe-seconds", type=float, default=1.0,
                        help="each node's speed probe (default 1.0)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rings to run, one after the other; the median ratio is "
                             "printed (default 1)")
    parser.add_argument("--timeout", type=float, default=120.0)


def _model(directory: Path) -> Path:
    train, _ = load_digits().split(0.2, 0)
    model = Sequential(Dense(64, 256), ReLU(), Dense(256, 10), seed=0)
    optimizer = Adam(model.params, lr=0.01)
    for start in range(0, len(train), 64):
        _, grad = softmax_cross_entropy(model.forward(train.x[start:start + 64]),
                                        train.y[start:start + 64])
        model.backward(grad)
        optimizer.step(model.grads)
    path, _ = export_model(SavedModel(model, Version("bench", 0, 1, "0" * 16), directory),
                           directory / "model.safetensors")
    return path


def run(args: argparse.Namespace) -> int:
    """Run the 4 nodes ``--repeats`` times; print each run's shares and the median ratio."""
    ratios = []
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        model = _model(directory)
        for _ in range(args.repeats):
            ratio = _run_once(args, directory, model)
            if ratio is None:
                return 1
            ratios.append(ratio)
    if args.repeats > 1:
        print(f"node-03's share / the others' mean share, median of {args.repeats} runs: "
              f"{float(np.median(ratios)):.2f} (runs: {', '.join(f'{r:.2f}' for r in ratios)}"
              f"; half the budget: 0.5 expected)")
    return 0


def _run_once(args: argparse.Namespace, directory: Path, model: Path) -> float | None:
    """One ring of 4; returns node 3's share over the others' mean, None on failure."""
    cores = [args.cores] * (NODES - 1) + [args.cores / 2]
    ports = free_ports(NODES)
    peers = [a for port in ports for a in ("--peer", f"127.0.0.1:{port}")]
    budgets, processes = [], []
    try:
        for i in range(NODES):
            budgets.append(CpuBudget(f"rtinfer{ports[0]}-{i}", cores[i], core=i % 2))
            argv = [sys.executable, "-m", "ringtrain", "predict", str(model),
                    *(["digits", "--out", str(directory / "ring.npy")] if i == 0 else []),
                    "--ring", "--nodes", str(NODES), "--no-discovery", *peers,
                    "--port", str(ports[i]), "--insecure", "--node-id", f"node-{i:02d}",
                    "--probe-seconds", str(args.probe_seconds)]
            processes.append(subprocess.Popen(budgets[i].command(argv),
                                              stdout=subprocess.DEVNULL,
                                              stderr=subprocess.PIPE, text=True))
        errors = [p.communicate(timeout=args.timeout)[1] for p in processes]
    finally:
        for process in processes:
            process.kill()
        for budget in budgets:
            budget.close()
    found = _SHARE.findall(errors[0])
    if len(found) != NODES:
        print(f"bench-infer: node 0 reported no shares:\n{errors[0]}", file=sys.stderr)
        return None
    print(f"{'node':8} {'CPU budget':>10} {'speed (samples/s)':>18} {'share (rows)':>13}")
    for (node, rows, speed), budget in zip(found, cores, strict=True):
        print(f"{node:8} {budget:10.2f} {speed:>18} {rows:>13}")
    fast = np.mean([int(rows) for _, rows, _ in found[:-1]])
    ratio = int(found[-1][1]) / fast
    print(f"node-03 (half the budget) got {ratio:.2f} of the mean share of the others")
    local = subprocess.run([sys.executable, "-m", "ringtrain", "predict", str(model),
                            "digits", "--out", str(directory / "local.npy")],
                           capture_output=True, text=True, timeout=args.timeout)
    same = local.returncode == 0 and np.array_equal(np.load(directory / "ring.npy"),
                                                    np.load(directory / "local.npy"))
    print(f"predictions of the ring equal one process's, in order: {same}")
    return ratio if same else None
