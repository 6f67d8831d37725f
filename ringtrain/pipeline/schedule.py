"""GPipe across ring members: each stage runs its layers on micro-batches, activations
flow to the next stage and gradients back, then one all-reduce sums the whole gradient.

Layout. With ``pipelines`` P and world size N, there are S = N / P stages: ranks
``p*S .. p*S + S - 1`` are pipeline p, stage s its rank ``p*S + s``, so a pipeline's stages
are ring neighbours. Each pipeline takes an equal contiguous part of the global batch and
cuts it into M micro-batches. Its layers are cut over its stages by :func:`partition_layers`
from the members' measured speeds and memory (all-gathered, so every member computes every
pipeline's cut alike).

Schedule (one step). Forward, ticks t = 0 .. M+S-2: stage s runs micro-batch t - s, keeps
its input, and its output goes to stage s+1; the last stage computes the loss of each
micro-batch, scaled by its share of the global batch. Backward, ticks t = 0 .. M+S-2, in
reverse: the last stage starts; each stage recomputes its forward for the micro-batch from
the kept input (GPipe's re-materialisation: a layer keeps only its last input) and
back-propagates, adding its parameter gradients up, and the gradient for its input goes to
stage s-1. Each tick's hand-over is one all-gather of a fixed-size buffer over the node's
encrypted links (every member passes one, idle or not, so the collectives match); a
receiver takes the row of its neighbour. Finally each member puts its stage's summed
gradient into a buffer the size of the whole model (zeros elsewhere) and one all-reduce sums
it: that is the gradient of the global batch's mean loss, with data parallelism's average
between pipelines included (each micro-batch's loss was scaled by its share of the whole
batch). Every member then steps the whole model with it.

Every member therefore keeps the whole model's parameters and optimizer state up to date,
not only its stage's: compute and activations are split, parameters are replicated. That is
what makes a failed stage recoverable: after a member fails, the survivors re-form the ring,
adopt the state of whoever is furthest ahead (a step that completed on some member counts),
cut the layers again over the survivors and redo the step. The price is memory and the
all-reduce of the whole gradient (2(N-1)/N of the model per member per step); see the design
notes for the limits.

Members must hold the same model version (parameters' content hash and step) to start: a
pipeline of different models is refused, naming both members and both versions.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import CollectiveError, ConfigError, MismatchError
from ..infer.agreement import check_agree, params_version
from ..models import architecture
from ..node.node import Node
from ..train.nn import Dense, Sequential, softmax_cross_entropy
from ..train.optim import Optimizer
from ..train.sharding import split_proportional
from .partition import Partition, layer_costs, layer_memory, partition_layers

__all__ = ["PipelineTrainer", "StageInfo", "measure_device"]

log = logging.getLogger(__name__)

Loss = Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray]]
PROBE_SECONDS = 0.1
MAX_RECOVERIES = 8  # failures in one step before the step gives up


@dataclass(frozen=True)
class StageInfo:
    """Where this member sits in the pipelines.

    Attributes:
        pipelines: how many pipelines run side by side (data parallel).
        stages: stages per pipeline.
        pipeline: this member's pipeline.
        stage: this member's stage in it.
        layers: the layer indexes this member runs.
        partitions: every pipeline's cut.
    """

    pipelines: int
    stages: int
    pipeline: int
    stage: int
    layers: range
    partitions: tuple[Partition, ...]


def measure_device(seconds: float = PROBE_SECONDS) -> tuple[float, float]:
    """(multiply-adds per second by wall clock, available memory in bytes) of this device."""
    a = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((256, 256)).astype(np.float32)
    done, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or done < 2:
        a @ b
        done += 1
    return done * a.shape[0] * b.size / elapsed, _available_memory()


def _available_memory() -> float:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


class PipelineTrainer:
    """Train ``model`` with its layers split over consecutive members (see the module doc).

    Constructing one is a collective: every member builds one with the same model version,
    optimizer kind, ``pipelines`` and ``micro_batches``.

    Args:
        node: this process's node.
        model: the whole model (every member holds all of its parameters).
        optimizer: steps ``model.params`` in place (SGD, Adam, ...).
        pipelines: pipelines side by side (data parallel); the largest divisor of the world
            size up to this is used, so a ring that shrank still runs.
        micro_batches: micro-batches per pipeline per step (fewer if a pipeline's part of
            the batch is smaller).
        loss: (outputs, targets) -> (mean loss, d loss / d outputs).
        speed, memory: this device's multiply-adds per second and bytes for a stage
            (default: :func:`measure_device`).
        timeout: seconds for each collective (default: the node's).

    Raises:
        MismatchError: members hold different model versions.
        ConfigError: more stages than layers, or no cut fits the devices' memory.
    """

    def __init__(self, node: Node, model: Sequential, optimizer: Optimizer, *,
                 pipelines: int = 1, micro_batches: int = 4, loss: Loss = softmax_cross_entropy,
                 speed: float | None = None, memory: float | None = None,
                 timeout: float | None = None):
        if optimizer.params is not model.params:
            raise ConfigError("the optimizer must step the model's own parameter buffer")
        for name, value in (("pipelines", pipelines), ("micro_batches", micro_batches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        self.node, self.model, self.optimizer, self.loss = node, model, optimizer, loss
        self.requested_pipelines = pipelines
        self.micro_batches = micro_batches
        self.timeout = timeout
        self.step_count = 0
        self.recoveries = 0
        self.last_loss = float("nan")
        self._texts = architecture.describe(model)["layers"]
        starts = [0]
        for layer in model.layers:
            starts.append(starts[-1] + sum(int(np.prod(s)) for _, s in layer.parameter_shapes()))
        self._starts = starts  # where each layer's parameters begin in model.params
        measured = measure_device() if speed is None or memory is None else (speed, memory)
        self._device = (speed or measured[0], memory or measured[1])
        self.info: StageInfo
        self._stage: Sequential
        self._plan()

    # planning -----------------------------------------------------------------------------

    def _plan(self) -> None:
        """Agree on the model version, gather speeds and memory, cut the layers."""
        node, model = self.node, self.model
        check_agree(node, "model version",
                    {"version": f"{params_version(model)} step {self.step_count}"},
                    "run a pipeline over members that hold different model versions",
                    self.timeout)
        world = node.world_size
        pipelines = max(p for p in range(1, min(self.requested_pipelines, world) + 1)
                        if world % p == 0)
        stages = world // pipelines
        devices = node.all_gather(np.array(self._device, dtype=np.float64),
                                  timeout=self.timeout)
        costs = layer_costs(model)
        memory = layer_memory(model, rows=1)
        partitions = tuple(partition_layers(costs, memory,
                                            list(devices[p * stages:(p + 1) * stages, 0]),
                                            list(devices[p * stages:(p + 1) * stages, 1]))
                           for p in range(pipelines))
        pipeline, stage = divmod(node.rank, stages)
        layers = partitions[pipeline].layers(stage)
        self.info = StageInfo(pipelines, stages, pipeline, stage, layers, partitions)
        self._stage = architecture.build(self._texts[layers.start:layers.stop],
                                         model.dtype.name)
        self._load_stage()
        log.info("node %s: pipeline %d of %d, stage %d of %d, layers %d-%d %s", node.node_id,
                 pipeline, pipelines, stage, stages, layers.start, layers.stop - 1,
                 self._texts[layers.start:layers.stop])

    def _param_span(self) -> tuple[int, int]:
        layers = self.info.layers
        return self._starts[layers.start], self._starts[layers.stop]

    def _load_stage(self) -> None:
        lo, hi = self._param_span()
        self._stage.load_params(self.model.params[lo:hi])

    def _width_in(self, layers: range) -> int:
        first = next(layer for layer in self.model.layers[layers.start:]
                     if isinstance(layer, Dense))
        return first.in_features

    # training -----------------------------------------------------------------------------

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One training step on the global batch (x, y), the same on every member; returns
        the batch's mean loss. After a member fails, re-forms, re-partitions over the
        survivors from the furthest state and redoes the step.

        Raises:
            MismatchError: members called with different batches or models.
            CollectiveError: the ring kept failing (``MAX_RECOVERIES`` times in a step).
            MembershipError: no ring could be re-formed.
        """
        target = self.step_count + 1
        for attempt in range(MAX_RECOVERIES + 1):
            try:
                if self.step_count >= target:  # the step completed on a member ahead of us
                    return self.last_loss
                return self._step_once(np.asarray(x), np.asarray(y))
            except MismatchError:
                raise
            except CollectiveError as exc:
                if attempt == MAX_RECOVERIES:
                    raise
                log.warning("node %s: step %d failed (%s); re-forming the ring",
                            self.node.node_id, target, exc)
                self.node.reform()
                self.recoveries += 1
                self._adopt_furthest()
                self._plan()
        raise AssertionError("unreachable")

    def _adopt_furthest(self) -> None:
        """Every member takes the parameters, optimizer state and step of the member
        furthest ahead (lowest rank on ties)."""
        node = self.node
        steps = node.all_gather(np.array([self.step_count], dtype=np.int64),
                                timeout=self.timeout)[:, 0]
        root = int(np.argmax(steps))
        if (steps == steps[root]).all():
            return
        state = self.optimizer.state_dict()
        names = sorted(name for name, value in state.items() if isinstance(value, np.ndarray))
        scalars = sorted(name for name in state if name not in names)
        flat = np.concatenate([self.model.params, *(np.ravel(state[n]) for n in names),
                               np.array([state[n] for n in scalars], dtype=self.model.dtype),
                               np.array([self.last_loss], dtype=self.model.dtype)])
        flat = node.broadcast(flat, root, timeout=self.timeout)
        at = self.model.params.size
        self.model.params[...] = flat[:at]
        for name in names:
            size = np.asarray(state[name]).size
            state[name] = flat[at:at + size].reshape(np.shape(state[name]))
            at += size
        for name in scalars:
            state[name] = type(state[name])(flat[at])
            at += 1
        self.optimizer.load_state_dict(state)
        self.last_loss = float(flat[at])
        self.step_count = int(steps[root])
        log.info("node %s: adopted step %d from rank %d", node.node_id, self.step_count, root)

    def _step_once(self, x: np.ndarray, y: np.ndarray) -> float:
        info, node = self.info, self.node
        total = len(x)
        parts = split_proportional(total, [1] * info.pipelines)
        if min(parts) < 1:
            raise ConfigError(f"a global batch of {total} cannot feed {info.pipelines} "
                              f"pipelines")
        micro = min(self.micro_batches, min(parts))
        offsets = np.concatenate([[0], np.cumsum(parts)])
        sizes = [split_proportional(part, [1] * micro) for part in parts]
        first = int(offsets[info.pipeline])
        bounds = first + np.concatenate([[0], np.cumsum(sizes[info.pipeline])])
        xs = [x[bounds[m]:bounds[m + 1]] for m in range(micro)]
        ys = [y[bounds[m]:bounds[m + 1]] for m in range(micro)]
        rows = max(max(s) for s in sizes)
        # the widest activation handed between stages, over every pipeline's cut
        width = max([self._width_in(part.layers(s)) for part in info.partitions
                     for s in range(1, info.stages)] or [1])
        kept, losses, loss_sum = self._forward(xs, ys, micro, rows, width, total)
        grads = self._backward(kept, losses, micro, rows, width)
        full = np.zeros(self.model.num_params + 1, dtype=self.model.dtype)
        lo, hi = self._param_span()
        full[lo:hi] = grads
        full[-1] = loss_sum
        full = node.all_reduce(full, op="sum", timeout=self.timeout)
        self.optimizer.step(full[:-1])
        self._load_stage()
        self.step_count += 1
        self.last_loss = float(full[-1])
        return self.last_loss

    def _hand_over(self, out: np.ndarray | None, rows: int, width: int) -> np.ndarray:
        buffer = np.zeros((rows, width), dtype=self.model.dtype)
        if out is not None:
            buffer[:out.shape[0], :out.shape[1]] = out
        return self.node.all_gather(buffer, timeout=self.timeout)

    def _forward(self, xs: list[np.ndarray], ys: list[np.ndarray], micro: int, rows: int,
                 width: int, total: int
                 ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], float]:
        info, stage, rank = self.info, self._stage, self.node.rank
        s, last = info.stage, info.stages - 1
        kept: dict[int, np.ndarray] = {}  # micro-batch -> this stage's input
        received: dict[int, np.ndarray] = {}
        losses: dict[int, np.ndarray] = {}  # micro-batch -> d loss / d output (last stage)
        loss_sum = 0.0
        for t in range(micro + last):
            m = t - s
            out = None
            if 0 <= m < micro:
                kept[m] = xs[m] if s == 0 else received.pop(m)
                out = stage.forward(kept[m])
                if s == last:
                    loss, grad = self.loss(out, ys[m])
                    share = len(ys[m]) / total
                    losses[m] = grad * grad.dtype.type(share)
                    loss_sum += loss * share
                    out = None
            # a hand-over when some stage but the last ran this tick
            if any(0 <= t - q < micro for q in range(last)):
                gathered = self._hand_over(out, rows, width)
                came = t - (s - 1)
                if s > 0 and 0 <= came < micro:
                    received[came] = gathered[rank - 1, :len(xs[came]),
                                              :self._width_in(info.layers)].copy()
        return kept, losses, loss_sum

    def _backward(self, kept: dict[int, np.ndarray], losses: dict[int, np.ndarray],
                  micro: int, rows: int, width: int) -> np.ndarray:
        info, stage, rank = self.info, self._stage, self.node.rank
        s, last = info.stage, info.stages - 1
        summed = np.zeros(stage.num_params, dtype=stage.dtype)
        received: dict[int, np.ndarray] = {}
        out_width = stage_output_width(self.model, info.layers)
        for t in range(micro + last):
            k = t - (last - s)
            grad_in = None
            if 0 <= k < micro:
                m = micro - 1 - k
                grad_out = losses.pop(m) if s == last else received.pop(m)
                stage.forward(kept[m])  # re-materialise this micro-batch's activations
                grad_in = stage.backward(grad_out, input_grad=s > 0)
                summed += stage.grads
            if any(0 <= t - (last - q) < micro for q in range(1, last + 1)):
                gathered = self._hand_over(grad_in, rows, width)
                came = t - (last - (s + 1))
                if s < last and 0 <= came < micro:
                    m = micro - 1 - came
                    received[m] = gathered[rank + 1, :len(kept[m]), :out_width].copy()
        return summed


def stage_output_width(model: Sequential, layers: range) -> int:
    """The width of what a stage running ``layers`` outputs."""
    for layer in reversed(model.layers[:layers.stop]):
        if isinstance(layer, Dense):
            return layer.out_features
    raise ConfigError("a stage's output width needs a Dense layer before it")
