"""``ringtrain models RUN_DIR``: the model versions in a run directory, one line each.

Every checkpoint and model file with its job, generation, step, content hash and parent
(the version it was made from), oldest first. ``--verify`` loads each one and checks its
content hash.
"""

from __future__ import annotations

import argparse

from ..errors import RingtrainError
from ..models import list_versions, load_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the subcommand."""
    parser.add_argument("run_dir", help="a run directory, e.g. ./ringtrain-default (where "
                        "`ringtrain node` saves the built-in job's checkpoints)")
    parser.add_argument("--verify", action="store_true",
                        help="load every version and check its content hash")


def run(args: argparse.Namespace) -> int:
    """Print the table; exit 1 if ``--verify`` found a damaged file."""
    entries = list_versions(args.run_dir)
    if not entries:
        print(f"no model versions in {args.run_dir}")
        return 0
    known = {e.version.content_hash for e in entries}
    rows = [("FILE", "KIND", "JOB", "GENERATION", "STEP", "HASH", "PARENT", "SIZE")]
    damaged = 0
    for entry in entries:
        version, parent = entry.version, entry.version.parent
        shown_parent = parent if parent in known or not parent else f"{parent} (not here)"
        kind = entry.kind
        if args.verify:
            try:
                load_model(entry.path)
            except RingtrainError as exc:
                kind, damaged = f"{kind} DAMAGED: {exc}", damaged + 1
        rows.append((entry.path.name, kind, version.job or "?", str(version.generation),
                     str(version.step), version.content_hash, shown_parent or "-",
                     f"{entry.size:,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 1 if damaged else 0
