"""Ensemble fusion: every member's own model answers the same batch, and the answers are
combined by a weighted average, of probabilities (softmax of each model's outputs) or of
the raw outputs (logits).

The members' models may differ (each trained on its own data: that is the point), but
they must share one architecture (the same layers and outputs), checked by its schema hash
before anything moves. Each member states its weight (say, its number of training samples
or its validation accuracy); the result names every member's weight and model version, so
what was fused is on record. One all-gather carries every member's outputs with its weight;
every member computes the same average from the same gathered bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..node.node import Node
from ..train.nn import Sequential
from .agreement import batch_digest, check_agree, params_version

__all__ = ["COMBINES", "Fusion", "fuse", "softmax"]

COMBINES = ("probabilities", "logits")


@dataclass(frozen=True)
class Fusion:
    """A fused answer, the same on every member.

    Attributes:
        outputs: the weighted average, shape (n, classes), float64.
        combine: ``probabilities`` or ``logits``.
        weights: each member's weight, normalised to sum to 1, by member id.
        versions: each member's model version (content hash of its parameters).
        member_outputs: each member's own outputs (probabilities or logits), by rank.
    """

    outputs: np.ndarray
    combine: str
    weights: dict[str, float]
    versions: dict[str, str]
    member_outputs: np.ndarray

    @property
    def predictions(self) -> np.ndarray:
        """The fused class of each row."""
        return np.argmax(self.outputs, axis=1).astype(np.int64)

    def describe(self) -> str:
        """One line: how the outputs were combined, with each member's weight and version."""
        parts = ", ".join(f"{m} {w:.3f} (model {self.versions[m]})"
                          for m, w in self.weights.items())
        return f"weighted average of {self.combine}: {parts}"


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def fuse(node: Node, model: Sequential, batch: np.ndarray, weight: float = 1.0,
         combine: str = "probabilities", timeout: float | None = None) -> Fusion:
    """Every member's ``model`` on the same ``batch``, combined by weighted average.

    Args:
        node: this process's node; every member calls fuse at the same point.
        model: this member's own model (same architecture on every member).
        batch: shape (n, features), the same on every member (its digest is compared).
        weight: this member's weight (finite, >= 0; not all zero).
        combine: ``probabilities`` (softmax, then average) or ``logits``.

    Raises:
        MismatchError: members hold models of different architectures, or other batches.
        ConfigError: bad weight or combine; every weight zero.
    """
    if combine not in COMBINES:
        raise ConfigError(f"combine must be one of {COMBINES}, got {combine!r}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or \
            not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"weight must be a finite number >= 0, got {weight!r}")
    batch = np.asarray(batch, dtype=model.dtype)
    version = params_version(model)
    check_agree(node, "model architecture", {"schema": model.schema_hash()[:16],
                                             "batch": batch_digest(batch)},
                "fuse models of different architectures, or answers to different batches",
                timeout)
    logits = model.forward(batch).astype(np.float64)
    mine = softmax(logits) if combine == "probabilities" else logits
    if mine.shape[1] < 2:
        raise ConfigError(f"fusion needs at least 2 outputs per row, the model gives "
                          f"{mine.shape[1]}")
    # one extra row: [weight, version as 8 bytes read as a float64, 0...]
    row = np.zeros((1, mine.shape[1]), dtype=np.float64)
    row[0, 0] = weight
    row.view(np.uint8)[0, 8:16] = np.frombuffer(bytes.fromhex(version), dtype=np.uint8)
    gathered = node.all_gather(np.concatenate([row, mine]), timeout=timeout)
    weights = gathered[:, 0, 0]
    total = float(weights.sum())
    if not total > 0:
        raise ConfigError("every member's weight is 0: nothing to average")
    members = node.members
    versions = {m: bytes(gathered[r, 0:1].view(np.uint8)[0, 8:16]).hex()
                for r, m in enumerate(members)}
    outputs = np.tensordot(weights / total, gathered[:, 1:], axes=1)
    return Fusion(outputs, combine, {m: float(w / total) for m, w in zip(members, weights,
                                                                        strict=True)},
                  versions, gathered[:, 1:])
