"""What the members of an inference must agree on, checked with one all-gather: the model
version (or architecture) and the batch. A disagreement raises the same
:class:`MismatchError` on every member (they all see the same gathered rows), naming the
first two members that differ and what each holds."""

from __future__ import annotations

import hashlib

import numpy as np

from ..errors import ConfigError, MismatchError
from ..node.node import Node
from ..train.checkpoint import content_hash
from ..train.nn import Sequential

__all__ = ["LABEL_BYTES", "batch_digest", "check_agree", "params_version"]

LABEL_BYTES = 64  # each member's label travels as this many UTF-8 bytes, zero-padded


def params_version(model: Sequential) -> str:
    """The content hash of a model's parameters (16 hex digits): equal on two members
    exactly when their parameters are bit-identical."""
    return content_hash(model.params, {})


def batch_digest(batch: np.ndarray | None) -> str:
    """16 hex digits over a batch's dtype, shape and bytes ("" for no batch)."""
    if batch is None:
        return ""
    batch = np.ascontiguousarray(batch)
    digest = hashlib.sha256(f"{batch.dtype.str}{list(batch.shape)}".encode())
    digest.update(batch.tobytes())
    return digest.hexdigest()[:16]


def check_agree(node: Node, what: str, labels: dict[str, str], action: str,
                timeout: float | None = None) -> None:
    """All-gather ``labels`` (name -> text, same names on every member, "" for "any");
    raise :class:`MismatchError` if two members hold different non-empty texts.

    Args:
        what: the thing compared, for the message (e.g. "model version").
        action: what is refused, for the message (e.g. "split one batch").

    Raises:
        MismatchError: members disagree; names both members and both values.
        ConfigError: a label longer than ``LABEL_BYTES`` UTF-8 bytes in all.
    """
    text = "\n".join(f"{name}={value}" for name, value in sorted(labels.items())).encode()
    if len(text) > LABEL_BYTES:
        raise ConfigError(f"labels {labels} exceed {LABEL_BYTES} bytes")
    mine = np.zeros(LABEL_BYTES, dtype=np.uint8)
    mine[:len(text)] = np.frombuffer(text, dtype=np.uint8)
    rows = node.all_gather(mine, timeout=timeout)
    members = node.members
    held = [dict(line.split("=", 1) for line in bytes(row).rstrip(b"\0").decode().split("\n")
                 if "=" in line) for row in rows]
    for name in sorted(labels):
        first: tuple[str, str] | None = None
        for member, values in zip(members, held, strict=True):
            value = values.get(name, "")
            if not value:
                continue
            if first is None:
                first = (member, value)
            elif value != first[1]:
                raise MismatchError(
                    f"refusing to {action}: member {first[0]} holds {what} {first[1]}, member "
                    f"{member} holds {value} ({name}); give every member the same",
                    generation=node.generation)
