"""``ringtrain predict MODEL INPUT``: run a saved model on a batch; ``--ring``: across a ring.

MODEL is a model file, a checkpoint or a run directory (its newest checkpoint; the built-in
job of ``ringtrain node`` saves to ``./ringtrain-<job>/``). INPUT is a ``.npy`` array of
shape (n, features), a ``.npz`` with ``x`` (and optionally ``y``, the labels), a ``.csv`` of
numbers, or ``digits`` (the bundled digits' test split, with labels). Predictions (the class
of each row) go to stdout one per line, or to ``--out FILE.npy``; with labels, the accuracy.

With ``--ring``, this device is one node of a ring (the same flags as ``ringtrain node``);
every member runs the same MODEL version (checked: different versions are refused, naming
both). Members without INPUT lend their speed: the batch is split over the members in
proportion to their measured speeds, and the member(s) holding INPUT print every prediction
in the batch's order.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from ..config import LaunchOptions
from ..errors import ConfigError
from ..infer import RingInference
from ..models import SavedModel, load_model
from ..node.launch import join
from ..train.datasets import load_digits
from .export import DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the subcommand."""
    parser.add_argument("model", help="model file, checkpoint or run directory")
    parser.add_argument("input", nargs="?", default=None,
                        help="x.npy, data.npz (x, y), x.csv or 'digits'; with --ring, only "
                             "the members that hold the batch give it")
    parser.add_argument("--out", default=None, help="write predictions here (.npy) instead "
                        "of printing them")
    ring = parser.add_argument_group("across a ring (--ring)")
    ring.add_argument("--ring", action="store_true",
                      help="split the batch over a ring of nodes by their measured speed")
    ring.add_argument("--job", default="predict", help="job name (default 'predict')")
    ring.add_argument("--nodes", type=int, default=2,
                      help="the ring forms with this many nodes (default 2)")
    ring.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                      help="a peer to dial directly (repeatable)")
    ring.add_argument("--no-discovery", action="store_true", help="only --peer addresses")
    ring.add_argument("--port", type=int, default=7077, help="TCP port (default 7077)")
    ring.add_argument("--interface", default=None, help="interface to announce and listen on")
    ring.add_argument("--key-file", default=None, help="the job key (`ringtrain keygen`)")
    ring.add_argument("--insecure", action="store_true",
                      help="no key: refused unless every address is loopback")
    ring.add_argument("--node-id", default=None, help="this node's id")
    ring.add_argument("--probe-seconds", type=float, default=0.2,
                      help="how long this node measures its speed (default 0.2)")


def read_input(spec: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(x, labels or None) from an INPUT argument.

    Raises:
        ConfigError: a missing file, an unknown kind, or not a 2-D numeric array.
    """
    if spec == "digits":
        _, test = load_digits().split(DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
        return test.x, test.y
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"no such input file: {spec}")
    labels = None
    try:
        if path.suffix == ".npy":
            x = np.load(path, allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                if "x" not in archive.files:
                    raise ConfigError(f"{spec} has no array 'x' (it has {archive.files})")
                x = archive["x"]
                labels = archive["y"] if "y" in archive.files else None
        elif path.suffix == ".csv":
            x = np.loadtxt(path, delimiter=",", ndmin=2)
        else:
            raise ConfigError(f"input {spec}: expected .npy, .npz, .csv or 'digits'")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read input {spec}: {exc}") from exc
    if x.ndim != 2 or x.dtype.kind not in "fiu":
        raise ConfigError(f"input {spec} must be a 2-D numeric array, got shape {x.shape} "
                          f"dtype {x.dtype}")
    return x, labels


def run(args: argparse.Namespace) -> int:
    """Predict locally, or across a ring with ``--ring``."""
    saved = load_model(args.model)
    print(f"model {saved.path}: {saved.version}, weights {saved.quantization}",
          file=sys.stderr)
    if args.input is None and not args.ring:
        raise ConfigError("give an INPUT (x.npy, data.npz, x.csv or digits)")
    x, labels = read_input(args.input) if args.input is not None else (None, None)
    if not args.ring:
        assert x is not None
        _report(saved.model.forward(x), labels, args.out)
        return 0
    return _run_ring(args, saved, x, labels)


def _run_ring(args: argparse.Namespace, saved: SavedModel, x: np.ndarray | None,
              labels: np.ndarray | None) -> int:
    if args.key_file:
        os.environ["RINGTRAIN_KEY_FILE"] = args.key_file
    if args.no_discovery and not args.peer:
        raise ConfigError("--no-discovery needs at least one --peer HOST:PORT")
    options = LaunchOptions(job=args.job, peers=tuple(args.peer), port=args.port,
                            interface=args.interface, min_nodes=args.nodes,
                            max_nodes=args.nodes, discovery=not args.no_discovery,
                            insecure=args.insecure, node_id=args.node_id)
    with join(options) as node:
        result = RingInference(node, saved.model, version=saved.version.content_hash,
                               probe_seconds=args.probe_seconds).run(x)
        shares = ", ".join(f"{m} {n} rows ({s:,.0f} samples/s)" for m, n, s in
                           zip(result.members, result.shares, result.speeds, strict=True))
        print(f"ringtrain predict {node.node_id}: {sum(result.shares)} rows over "
              f"{node.world_size} nodes: {shares}", file=sys.stderr, flush=True)
        node.barrier()  # nobody leaves while another still waits for the gather
    if x is not None:
        _report(result.outputs, labels, args.out)
    return 0


def _report(outputs: np.ndarray, labels: np.ndarray | None, out: str | None) -> None:
    predictions = np.argmax(outputs, axis=1)
    if out:
        np.save(out, predictions)
        print(f"wrote {len(predictions)} predictions to {out}", file=sys.stderr)
    else:
        sys.stdout.write("".join(f"{int(p)}\n" for p in predictions))
    if labels is not None:
        hits = int(np.sum(predictions == np.asarray(labels)))
        print(f"accuracy {hits / len(predictions):.4f} ({hits}/{len(predictions)})",
              file=sys.stderr)
