"""Per-node metrics as JSON lines in the node's run directory (``metrics.jsonl``).

One object per training step: ``time`` (wall clock), ``step``, ``epoch``, ``loss``,
``accuracy`` (test accuracy, on the steps that end an epoch), ``samples_per_s``,
``bytes_out`` / ``bytes_in`` (payload bytes per peer during the step), ``step_s``,
``compute_s``, ``communicate_s`` (collectives' time in the step) and ``other_s`` (the rest:
data, optimizer, waiting), ``generation``, ``world_size``. ``ringtrain plot`` draws them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends one JSON object per line to ``directory/metrics.jsonl``, flushed per line
    so a crash loses at most the line being written."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.path = Path(directory) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        """Append one row."""
        self._file.write(json.dumps(row, default=float) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a metrics file (a truncated last line is skipped)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
