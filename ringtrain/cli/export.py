"""``ringtrain export MODEL --out FILE [--int8]``: write a model as a plain model file.

MODEL is a checkpoint, a model file or a run directory (its newest checkpoint). The file
(safetensors layout: readable with numpy alone) carries the version it was made from as its
parent. With ``--int8`` every Dense weight is stored as int8 with one float32 scale per
output column, and the command prints the float32 file's size beside it. For a model of the
bundled digits (64 inputs, 10 classes) it prints the test accuracy of both, too.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ..models import export_model, load_model
from ..train.datasets import load_digits
from ..train.nn import Dense, Sequential, accuracy

DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED = 0.2, 0  # the demo's and the built-in job's split


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the subcommand."""
    parser.add_argument("model", help="checkpoint, model file or run directory")
    parser.add_argument("--out", required=True, help="the file to write (*.safetensors)")
    parser.add_argument("--int8", action="store_true",
                        help="int8 weights, one float32 scale per output channel")


def run(args: argparse.Namespace) -> int:
    """Export; compare with float32 in size (int8) and on the digits (when it fits them)."""
    source = load_model(args.model)
    path, size = export_model(source, args.out, "int8" if args.int8 else "none")
    exported = load_model(path)
    print(f"wrote {path}: {size:,} bytes, weights {exported.quantization}, version "
          f"{exported.version}")
    if args.int8:
        with tempfile.TemporaryDirectory() as scratch:
            _, float_size = export_model(source, Path(scratch) / "float32.safetensors")
        print(f"float32 file: {float_size:,} bytes; int8 file: {size:,} bytes "
              f"({float_size / size:.2f}x smaller)")
    if fits_digits(source.model):
        _, test = load_digits().split(DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
        base = accuracy(source.forward(test.x), test.y)
        mine = accuracy(exported.forward(test.x), test.y)
        print(f"digits test accuracy ({len(test)} images): float32 {base:.4f}, "
              f"{exported.quantization if args.int8 else 'exported'} {mine:.4f} "
              f"({(mine - base) * 100:+.2f} points)")
    return 0


def fits_digits(model: Sequential) -> bool:
    """Whether ``model`` takes the digits' 64 pixels and gives 10 classes."""
    dense = [layer for layer in model.layers if isinstance(layer, Dense)]
    return bool(dense) and dense[0].in_features == 64 and dense[-1].out_features == 10
