"""Checking that every member trains the same thing: model, data, settings.

:func:`training_facts` lists what must match; :func:`check_agreement` compares every member's
facts with rank 0's in one all-gather and names the first difference (fact, both ranks, both
node ids, both values); :func:`schema_of` digests the facts for a Node's ``schema``, so a
node with other facts is refused when it says HELLO.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import numpy as np

from ..errors import ConfigError
from ..node.node import Node
from .nn import Sequential
from .optim import Optimizer

__all__ = ["check_agreement", "optimizer_kind", "schema_of", "training_facts"]

FACT_BYTES = 64  # each agreement fact travels as this many UTF-8 bytes (a hex SHA-256 fits)


def optimizer_kind(optimizer: Optimizer) -> str:
    """The optimizer's class and state names, as members compare them."""
    state = optimizer.state_dict()
    return f"{type(optimizer).__name__}({','.join(sorted(state))})"


def _data_digest(x: np.ndarray, y: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in (np.asarray(x), np.asarray(y)):
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def training_facts(model: Sequential, x: np.ndarray, y: np.ndarray, **settings: object
                   ) -> dict[str, str]:
    """What every member of one training job must share: model schema, data, settings. Pass
    ``schema_of(facts)`` to the Node as its ``schema`` so that a node with other facts is
    refused when it tries to join, with both values named."""
    facts = {"model": model.schema_hash(), "data": _data_digest(x, y)}
    for name, value in sorted(settings.items()):
        facts[name] = getattr(value, "__name__", None) or str(value) if callable(value) \
            else str(value)
    return facts


def schema_of(facts: Mapping[str, str]) -> str:
    """A short digest of :func:`training_facts`, to pass to a Node as its ``schema``."""
    text = json.dumps(dict(facts), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_agreement(node: Node, facts: Mapping[str, str], timeout: float | None = None
                    ) -> None:
    """Check that every member holds the same ``facts`` (a collective).

    Each fact travels as up to 64 UTF-8 bytes (a longer one as its SHA-256), so the error can
    show both values.

    Raises:
        ConfigError: a member's fact differs from rank 0's; names the fact, both ranks, both
            node ids and both values.
    """
    names = sorted(facts)
    texts = [facts[name] for name in names]
    encoded = [text.encode() if len(text.encode()) <= FACT_BYTES
               else hashlib.sha256(text.encode()).hexdigest().encode() for text in texts]
    mine = np.zeros((len(names), FACT_BYTES), dtype=np.uint8)
    for row, data in enumerate(encoded):
        mine[row, :len(data)] = np.frombuffer(data, dtype=np.uint8)
    gathered = node.all_gather(mine, timeout=timeout)
    for rank in range(1, len(gathered)):
        for row, name in enumerate(names):
            if not np.array_equal(gathered[rank, row], gathered[0, row]):
                first, other = (bytes(gathered[r, row]).rstrip(b"\0").decode(errors="replace")
                                for r in (0, rank))
                raise ConfigError(f"members disagree on {name}: rank 0 ({node.members[0]}) has "
                                  f"{first!r}, rank {rank} ({node.members[rank]}) has {other!r}")
