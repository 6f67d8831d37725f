"""One batch split across the ring in proportion to each member's measured speed.

Every member calls :meth:`RingInference.run` (or :func:`infer`) at the same point, as with
any collective. The batch may be on every member (the same batch: its digest is compared)
or on some: then the lowest-ranked holder broadcasts it. Each member runs the model on its
share, a contiguous slice, and one all-gather brings every share's outputs to every member,
which puts them back in the batch's order. The shares come from the members' speeds
(samples per second of wall time, the device's real pace whatever slows it): measured with a
short probe when the ring is new, then learnt from each call's own compute time. Speeds are
all-gathered, so every member computes the same shares (``split_proportional`` is exact).

Before any data moves, every member's model version (the content hash of its parameters)
is compared: members that hold different models would give a mix of two models' answers,
so the call is refused on every member, naming both members and both versions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..node.node import Node
from ..train.nn import Dense, Sequential
from ..train.sharding import split_proportional
from .agreement import batch_digest, check_agree, params_version

__all__ = ["InferenceResult", "RingInference", "infer", "measure_speed"]

PROBE_SECONDS = 0.2  # a speed probe runs the model this long (several CFS periods)
PROBE_ROWS = 256
LEARN_ROWS = 64  # a share this large times well enough to update the member's speed
LEARN_WEIGHT = 0.5  # weight of the newest observed speed


@dataclass(frozen=True)
class InferenceResult:
    """What one distributed inference produced (the same on every member).

    Attributes:
        outputs: the model's outputs for the whole batch, in the batch's order.
        shares: how many rows each rank computed.
        speeds: the speeds (samples/s) the shares were cut from, by rank.
        members: member ids by rank.
    """

    outputs: np.ndarray
    shares: tuple[int, ...]
    speeds: tuple[float, ...]
    members: tuple[str, ...]

    @property
    def predictions(self) -> np.ndarray:
        """The class of each row (argmax of its outputs)."""
        return np.argmax(self.outputs, axis=1).astype(np.int64)


def measure_speed(model: Sequential, seconds: float = PROBE_SECONDS,
                  rows: int = PROBE_ROWS) -> float:
    """Samples per second this device runs ``model`` at, by wall clock over ``seconds``."""
    probe = np.random.default_rng(0).standard_normal((rows, _input_width(model)))
    probe = probe.astype(model.dtype)
    done, started = 0, time.perf_counter()
    while True:
        model.forward(probe)
        done += rows
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and done >= 2 * rows:
            return done / elapsed


class RingInference:
    """Run one model over a ring, each batch split by measured speed.

    Args:
        node: this process's node; every member builds its own RingInference.
        model: the model, the same version on every member.
        version: what identifies the model (default: its parameters' content hash).
        speed: this member's speed to start from, samples/s (default: measured by a probe
            when the ring is first used or changes).
        probe_seconds: how long a speed probe runs.
    """

    def __init__(self, node: Node, model: Sequential, *, version: str | None = None,
                 speed: float | None = None, probe_seconds: float = PROBE_SECONDS):
        self.node = node
        self.model = model
        self.version = version or params_version(model)
        self._own_speed = speed
        self._probe_seconds = probe_seconds
        self._speeds: list[float] | None = None
        self._members: tuple[str, ...] = ()

    @property
    def speeds(self) -> list[float] | None:
        """The members' speeds (samples/s) by rank, as last agreed."""
        return None if self._speeds is None else list(self._speeds)

    def run(self, batch: np.ndarray | None, timeout: float | None = None) -> InferenceResult:
        """The model's outputs for ``batch``, computed across the ring, on every member.

        Args:
            batch: shape (n, features), on at least one member (None elsewhere).
            timeout: seconds for each collective (default: the node's).

        Raises:
            MismatchError: members hold different model versions or different batches.
            ConfigError: no member holds a batch, or it does not fit the model.
            CollectiveError: a member failed; nothing partial is returned.
        """
        node, model = self.node, self.model
        if batch is not None:
            batch = np.asarray(batch, dtype=model.dtype)
            if batch.ndim != 2 or batch.shape[1] != _input_width(model):
                raise ConfigError(f"a batch for this model has shape (n, "
                                  f"{_input_width(model)}), got {batch.shape}")
        check_agree(node, "model version", {"version": self.version,
                                            "batch": batch_digest(batch)},
                    "split one batch over members that hold different models or batches",
                    timeout)
        if self._members != node.members:
            self._members = node.members
            self._speeds = self._measure(timeout)
        batch = self._distribute(batch, timeout)
        speeds = list(self._speeds or [])
        shares = split_proportional(len(batch), speeds)
        bounds = np.concatenate([[0], np.cumsum(shares)])
        start, stop = int(bounds[node.rank]), int(bounds[node.rank + 1])
        widest = max(shares)
        outputs = _output_width(model)
        # row 0: [rows, compute seconds, 0...]; then this member's outputs, zero-padded
        mine = np.zeros((widest + 1, max(outputs, 2)), dtype=np.float64)
        started = time.perf_counter()
        if stop > start:
            mine[1:1 + stop - start, :outputs] = model.forward(batch[start:stop])
        mine[0, :2] = (stop - start, time.perf_counter() - started)
        gathered = node.all_gather(mine, timeout=timeout)
        result = np.concatenate([gathered[rank, 1:1 + shares[rank], :outputs]
                                 for rank in range(node.world_size)]).astype(model.dtype)
        self._learn(gathered[:, 0, :2])
        return InferenceResult(result, tuple(shares), tuple(speeds), node.members)

    def _measure(self, timeout: float | None) -> list[float]:
        own = self._own_speed if self._own_speed is not None else \
            measure_speed(self.model, self._probe_seconds)
        speeds = self.node.all_gather(np.array([own], dtype=np.float64), timeout=timeout)[:, 0]
        return [float(s) if np.isfinite(s) and s > 0 else 1.0 for s in speeds]

    def _learn(self, timings: np.ndarray) -> None:
        """Blend each member's observed speed on this call (if its share was large enough
        to time) into its speed: every member does the same with the same numbers."""
        assert self._speeds is not None
        for rank, (rows, seconds) in enumerate(timings):
            if rows >= LEARN_ROWS and seconds > 0:
                self._speeds[rank] = ((1 - LEARN_WEIGHT) * self._speeds[rank]
                                      + LEARN_WEIGHT * rows / seconds)

    def _distribute(self, batch: np.ndarray | None, timeout: float | None) -> np.ndarray:
        """The batch on every member: kept where every member holds it, else broadcast
        from the lowest-ranked holder."""
        node = self.node
        shape = np.array([-1, -1] if batch is None else batch.shape, dtype=np.int64)
        shapes = node.all_gather(shape, timeout=timeout)
        holders = [rank for rank in range(node.world_size) if shapes[rank, 0] >= 0]
        if not holders:
            raise ConfigError("no member holds a batch to run")
        if len(holders) == node.world_size:
            assert batch is not None
            return batch
        root = holders[0]
        rows, width = (int(v) for v in shapes[root])
        buffer = batch if node.rank == root else np.zeros((rows, width), dtype=self.model.dtype)
        return node.broadcast(buffer, root, timeout=timeout)


def infer(node: Node, model: Sequential, batch: np.ndarray | None,
          timeout: float | None = None) -> InferenceResult:
    """One distributed inference (see :class:`RingInference`; keep one of those to reuse
    the learnt speeds across batches)."""
    return RingInference(node, model).run(batch, timeout)


def _input_width(model: Sequential) -> int:
    first = next((layer for layer in model.layers if isinstance(layer, Dense)), None)
    if first is None:
        raise ConfigError("distributed inference needs a model with a Dense layer")
    return first.in_features


def _output_width(model: Sequential) -> int:
    last = [layer for layer in model.layers if isinstance(layer, Dense)]
    if not last:
        raise ConfigError("distributed inference needs a model with a Dense layer")
    return last[-1].out_features
