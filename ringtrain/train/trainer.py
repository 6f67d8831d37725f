"""Data-parallel training on a :class:`~ringtrain.Node`: every member trains the same model
on its own shard of each step's global batch, and every member ends with the same parameters.

Two pieces:

* :class:`DistributedOptimizer` wraps an optimizer from :mod:`.optim`. Constructing it
  checks that every member trains the same thing and copies rank 0's parameters and optimizer
  state to every member. Each :meth:`~DistributedOptimizer.step` averages the gradient over the
  members in one fused all-reduce (two with compression, below), weighted by each member's
  sample count, and then steps the optimizer. Losses are means over the local batch, so the
  weighted mean ``sum(n_i * grad_i) / sum(n_i)`` is the gradient of the union batch: N members
  with batch b compute what one process with batch N*b would. Every member applies the same
  reduced bytes with the same deterministic optimizer, so parameters stay bit-identical.
* :class:`Trainer` runs the loop: sharding, speed-adaptive batches, local SGD, non-finite
  gradients and checkpoints, as follows.

Sharding. Every epoch has one permutation of the data set (:mod:`ringtrain.train.sharding`), read
front to back as one stream; each step takes the next ``batch_size * world_size`` samples and
cuts them into one contiguous piece per member, in rank order. The position in the stream is
global, so no sample of an epoch is dropped or repeated, and a run resumed with another world
size carries on from the same position.

Speed-adaptive batches (``adaptive=True``, the default). Each member times its own forward and
backward pass and keeps a smoothed throughput (samples per second, an exponentially weighted
moving average with weight ``SPEED_SMOOTHING`` on the newest step). Every ``share_every`` steps
the members all-gather their throughputs (8 bytes each) and from then on cut the global batch
in proportion to them (:func:`.sharding.split_proportional`), every member getting at
least one sample so its speed stays measured. A member twice as fast then gets about twice the
samples, and fast members stop idling behind slow ones at every step. The gradient weights are
the sample counts, so the result is the same big-batch gradient whatever the split (up to float
rounding). Switch it off with ``adaptive=False`` to cut every batch evenly (bit-reproducible
runs: the split, and with it the rounding, then never depends on timing).

Local SGD (``average_every=k > 1``). Each member steps its optimizer on its own gradient for k
steps without communicating, then the members average their parameters and optimizer arrays,
weighted by the samples each consumed since the last average. One all-reduce per k steps
instead of per step: the mode for slow links. Between averages members differ; after each they
are identical again (and :meth:`Trainer.fit` ends with an average).

Compression (``compression="int8"``, ``"fp16"``, ``"topk[:ratio]"``; default None). Only the
gradient travels through a compressed all-reduce (:mod:`ringtrain.ring.compression`). The loss,
the weights and the flags must stay exact: a rounded weight sum would skew every gradient, a
rounded flag could vanish. They travel in their own all-reduce of four values just before,
the cheapest sound way: it adds one round per step (small all-reduces take one round, not
a ring) and no bandwidth, whereas in the compressed buffer they would share a segment's int8
scale with the gradient (and the compressed path keeps only one trailing value exact, the
weight of a weighted mean). When the four say every member skips the step, the gradient does
not travel at all. Members still end bit-identical: every node decodes the same bytes, and
the owner of each chunk keeps exactly what the others decode. Error feedback (int8, top-k)
carries what a member's encodings left out into its next gradient; it is cleared after a
non-finite result (which it would otherwise carry into every later step) and on a re-form
(it belongs to an attempt whose contributions never landed). Local SGD averages parameters,
which must not be quantized: it refuses compression.

Gradient during backward (``bucket_bytes``, default 1 MiB). Backward finishes the flat
gradient from its end (the last layer first; the first layer's weight in row blocks, last
rows first, and without the gradient w.r.t. the input, which training never uses), so the
trainer cuts it at the points backward reports (``Sequential.ready_points``) into buckets of
at least ``bucket_bytes`` (:func:`gradient_buckets`) and starts each bucket's all-reduce
(asynchronous, weighted, in place) as soon as backward has finished it, while the rest still
computes; what remains (the first block of the first layer) travels with the four exact
values below once backward is done, and the step waits for every bucket. Every
member cuts the same buckets from the same model and sends them in the same order (a member
with no samples sends them after its empty compute), so the collectives match. A failed
bucket fails the step like a failed all-reduce: all of them are finished before the step is
redone. It applies to uncompressed averaging with the built-in ``compute_gradients`` (an
override may change the gradient after backward has reported it); ``bucket_bytes=0`` turns
it off. A small model (under ``bucket_bytes`` past its first layer) has no early bucket.

Non-finite gradients. A member whose gradient or loss holds NaN or Inf sends zeros and raises a
flag element fused into the same all-reduce (a bucket sent during backward is checked as it
leaves: zeros if not finite, and the flag goes with the rest); when the reduced flag is set
(or the reduced gradient overflowed) every member skips the step: the optimizer does not
move, the samples count as consumed. After ``max_nonfinite`` skips in a row,
:class:`NonFiniteGradientError`. In local SGD mode the check is local: a member skips its own
local step.

Checkpoints (``checkpoint_dir``). Rank 0 saves an atomic checkpoint (parameters, optimizer
state, step, epoch, data position, generation) every ``checkpoint_every`` steps; members are
identical then, so one copy is the state of all. Rank 0 also records the last finished step in
``progress.json`` (best effort, no fsync). At start, every member looks for the newest
checkpoint in its own ``checkpoint_dir``; the member with the highest step (lowest rank on ties)
loads it and broadcasts it, so every member resumes from the same state, and the log reports
the steps done after that checkpoint and lost. Each model carries a :class:`ModelVersion`
(generation, step, content hash).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, MembershipError, PeerFailedError, RingtrainError
from ..models import architecture
from ..node.node import Node, Work
from ..ring.compression import Codec, check_supported, get_codec
from . import checkpoint
from .nn import Sequential, softmax_cross_entropy
from .optim import Optimizer
from .sharding import DataPosition, Sampler, split_proportional

__all__ = ["DistributedOptimizer", "ModelVersion", "NonFiniteGradientError", "StepReport",
           "Trainer", "check_agreement", "schema_of", "training_facts"]

log = logging.getLogger(__name__)

Loss = Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray]]
"""A loss: (model output, targets) -> (mean loss over the batch, d loss / d output)."""

SPEED_SMOOTHING = 0.3  # weight of the newest step in the throughput average: adapts in ~3 shares
FACT_BYTES = 64  # each agreement fact travels as this many UTF-8 bytes (a hex SHA-256 fits)
PROGRESS_FILE = "progress.json"
REFORM_ROUND = 2.0  # seconds per attempt to re-form; attempts repeat until rejoin_timeout
CONTROL = 4  # exact values before the gradient: weight x loss, weight, non-finite, re-form
BUCKET_BYTES = 1 << 20  # an early bucket of gradient holds at least this much


class NonFiniteGradientError(RingtrainError):
    """Gradients were NaN or Inf on some member for ``max_nonfinite`` steps in a row.

    Attributes:
        step: the last step skipped.
        generation: the membership generation.
    """

    def __init__(self, message: str, *, step: int, generation: int):
        self.step = step
        self.generation = generation
        super().__init__(message)


class LeftRing(RingtrainError):
    """This node left the ring on request (:meth:`Trainer.request_leave`) before it could
    finish a step; :meth:`Trainer.fit` catches it and returns."""


@dataclass(frozen=True)
class ModelVersion:
    """Which model this is: membership generation, global step and a hash of the state."""

    generation: int
    step: int
    content_hash: str

    def __str__(self) -> str:
        return f"generation {self.generation} step {self.step} hash {self.content_hash}"


@dataclass(frozen=True)
class StepReport:
    """What one :meth:`Trainer.step` did on this node.

    Attributes:
        step: global steps completed, this one included.
        epoch: the epoch this step's samples came from.
        end_of_epoch: whether this step consumed the epoch's last samples.
        loss: the loss over the global batch (synchronous mode) or this node's batch (local
            SGD), before the update.
        applied: False when the step was skipped for non-finite gradients.
        indices: this node's sample indices (into the training set).
        batch_sizes: every member's batch size this step, in rank order.
        compute_seconds: this node's forward and backward time.
        step_seconds: this node's whole step, communication included.
        throughput: this node's smoothed compute throughput, samples per second (0: not yet
            measured).
    """

    step: int
    epoch: int
    end_of_epoch: bool
    loss: float
    applied: bool
    indices: np.ndarray
    batch_sizes: tuple[int, ...]
    compute_seconds: float
    step_seconds: float
    throughput: float


def gradient_buckets(starts: Sequence[int], size: int, bucket_elements: int
                     ) -> list[tuple[int, int]]:
    """The gradient's early buckets: element ranges [start, stop) cut at the points
    ``starts`` where backward reports the gradient final from on (ascending, 0 first), from
    the end of a ``size``-element gradient backwards, each the fewest pieces that hold at
    least ``bucket_elements``. What stays before the last bucket (what backward finishes
    last) travels with the step's control values. Pure: every member with the same model
    cuts the same."""
    buckets, stop = [], size
    for start in reversed(starts[1:]):
        if stop - start >= bucket_elements:
            buckets.append((start, stop))
            stop = start
    return buckets


@dataclass
class _EarlyBuckets:
    """One step's gradient buckets sent while backward runs (see ``begin_step``)."""

    weight: float
    pending: list[tuple[int, int]]  # not sent yet, next first
    sent_from: int  # the gradient from here on is sent
    finite: bool = True  # every bucket sent so far was finite
    works: list[Work] = field(default_factory=list)


def _outcome(work: Work) -> BaseException | None:
    """Wait for ``work``; the error it failed with, or None."""
    try:
        work.wait()
    except RingtrainError as exc:
        return exc
    return None


class DistributedOptimizer:
    """An optimizer whose steps use the gradient averaged over every member.

    Constructing it is a collective (every member must construct one): it checks that the
    members agree on the optimizer, the parameter count and ``agree_on``, then copies rank 0's
    parameters and optimizer state to every member.

    Args:
        node: this process's node.
        optimizer: steps ``optimizer.params`` (the model's flat parameter buffer) in place.
        agree_on: named facts every member must share (e.g. ``{"model":
            model.schema_hash()}``); values are turned into text with ``str``.
        max_nonfinite: skipped steps in a row before :class:`NonFiniteGradientError`.
        timeout: seconds for each collective (default: the node's setting).
        joining: this node joins a ring that is already training: skip the start-up
            agreement (the members are not running it); the caller syncs state instead.
        compression: None, a codec name (``fp16``, ``int8``, ``topk[:RATIO]``) or a
            :class:`~ringtrain.ring.compression.Codec` for the gradient all-reduce of
            :meth:`step` (see the module docstring); every member must use the same.

    Raises:
        ConfigError: members disagree; the message names the fact, both ranks and both
            values. Or an unknown compression, or one the parameters' dtype cannot use.
    """

    def __init__(self, node: Node, optimizer: Optimizer, *,
                 agree_on: Mapping[str, object] | None = None, max_nonfinite: int = 10,
                 timeout: float | None = None, joining: bool = False,
                 compression: str | Codec | None = None):
        if isinstance(max_nonfinite, bool) or not isinstance(max_nonfinite, int) \
                or max_nonfinite < 1:
            raise ConfigError(f"max_nonfinite must be a positive integer, got {max_nonfinite!r}")
        self.node = node
        self.optimizer = optimizer
        self.params = optimizer.params
        self.max_nonfinite = max_nonfinite
        self.timeout = timeout
        self.codec = get_codec(compression)
        """The gradient's codec (this member's own: it holds the error-feedback state), or
        None."""
        if self.codec is not None:
            check_supported(self.codec, self.params.dtype, "sum")
        self.loss = math.nan
        """The weighted mean loss over every member's batch, from the last :meth:`step`."""
        self.nonfinite_in_a_row = 0
        self.steps = 0
        self.reform_agreed = False
        """Whether, in the last :meth:`step`, some member asked for the ring to re-form
        (a joiner to admit, a suspect to drop, a member leaving): every member sees the same
        flag after the same step, so they all re-form at the same point."""
        self.leaving = False
        """Set to ask the others, through the next step, to re-form without this node."""
        self.leave_announced = False
        """Whether a completed step carried :attr:`leaving` to the others: now we may go."""
        # weight x loss, weight, non-finite flag, re-form flag, then weight x gradient: one
        # buffer, one all-reduce (a sum: the flags must count whatever the weights); with
        # compression the four exact values and the gradient are two all-reduces, and with
        # early buckets (begin_step) the gradient's tail goes out first (module docstring)
        self._buffer = np.empty(CONTROL + self.params.size, dtype=self.params.dtype)
        self._early: _EarlyBuckets | None = None
        if not joining:
            facts = {"optimizer": _optimizer_kind(optimizer),
                     "parameters": f"{self.params.size} {self.params.dtype}"}
            if self.codec is not None:
                facts["compression"] = self.codec.spec()
            facts.update({name: str(value) for name, value in (agree_on or {}).items()})
            check_agreement(node, facts, timeout)
            self.broadcast_state(0)

    def begin_step(self, weight: float, buckets: Sequence[tuple[int, int]]
                   ) -> Callable[[np.ndarray, int], None]:
        """Start a step whose gradient travels while backward still runs (uncompressed
        only). ``buckets`` are element ranges [start, stop) of the gradient, from its end
        backwards (see :func:`gradient_buckets`); every member must pass the same. Returns
        ``ready(grads, start)``: call it whenever ``grads[start:]`` holds final values (e.g.
        as ``Sequential.backward``'s ``on_ready``), and each bucket that is then complete
        starts its all-reduce at once. The next :meth:`step`, with the same ``grads`` and
        ``weight``, sends the rest and waits for everything. The gradient must not change
        after ``ready`` reported it."""
        if self.codec is not None:
            raise ConfigError("early buckets carry an uncompressed gradient; this optimizer "
                              f"compresses with {self.codec.spec()}")
        self._early = _EarlyBuckets(weight, list(buckets), self.params.size)

        def ready(grads: np.ndarray, start: int) -> None:
            early = self._early
            while early is not None and early.pending and early.pending[0][0] >= start:
                self._send_early(early, grads)

        return ready

    def _send_early(self, early: _EarlyBuckets, grads: np.ndarray) -> None:
        """Start the all-reduce of the next early bucket: weight x its gradient, or zeros
        when it is not finite (the flag then goes with the last all-reduce)."""
        lo, hi = early.pending.pop(0)
        region = self._buffer[CONTROL + lo:CONTROL + hi]
        if np.isfinite(grads[lo:hi]).all():
            np.multiply(grads[lo:hi], early.weight, out=region)
        else:
            region[...] = 0
            early.finite = False
        early.sent_from = lo
        early.works.append(self.node.all_reduce_async(region, op="sum", timeout=self.timeout,
                                                      out=region))

    def step(self, grads: np.ndarray, weight: float, loss: float = 0.0) -> bool:
        """Average ``grads`` over the members weighted by ``weight``, then step the optimizer.

        Args:
            grads: this node's gradient, the mean over its local batch (same shape and dtype
                as the parameters).
            weight: this node's sample count (0 if it had no samples this step).
            loss: this node's mean loss over its batch; averaged into :attr:`loss`.

        Returns:
            False if some member's gradient was not finite and every member skipped the step.

        Raises:
            NonFiniteGradientError: the ``max_nonfinite``-th skipped step in a row.
        """
        early, self._early = self._early, None
        head = self.params.size  # the gradient [0, head) not sent early
        finite = math.isfinite(loss)
        if early is not None:
            while early.pending:
                self._send_early(early, grads)
            head, finite = early.sent_from, finite and early.finite
        finite = finite and bool(np.isfinite(grads[:head]).all())
        control = self._buffer[:CONTROL]
        if finite:
            np.multiply(grads[:head], weight, out=self._buffer[CONTROL:CONTROL + head])
            control[:3] = (loss * weight, weight, 0)
        else:
            log.warning("rank %d: non-finite gradient or loss at step %d (generation %d)",
                        self.node.rank, self.steps + 1, self.node.generation)
            self._buffer[CONTROL:CONTROL + head] = 0
            control[:3] = (0, 0, 1)
        leaving = self.leaving  # read once: a signal may set it while this step runs
        control[3] = 1 if (leaving or self.node.reform_due) else 0
        gradient = self._reduce(head, [] if early is None else early.works)
        self.leave_announced = leaving
        self.steps += 1
        self.reform_agreed = bool(control[3] != 0)
        total = control[1]
        if gradient is None or not np.isfinite(gradient).all():
            self.clear_feedback()
            self.nonfinite_in_a_row += 1
            self.loss = math.nan
            if self.nonfinite_in_a_row >= self.max_nonfinite:
                raise NonFiniteGradientError(
                    f"gradients were not finite on some member for {self.nonfinite_in_a_row} "
                    f"steps in a row, up to step {self.steps} (generation "
                    f"{self.node.generation}); this node's were "
                    f"{'finite' if finite else 'not finite'}. Lower the learning rate or "
                    f"check the data.", step=self.steps, generation=self.node.generation)
            return False
        self.nonfinite_in_a_row = 0
        self.loss = float(control[0] / total)
        np.divide(gradient, total, out=gradient)
        self.optimizer.step(gradient)
        return True

    def _reduce(self, head: int, early: list[Work]) -> np.ndarray | None:
        """The summed weighted gradient, or None when every member skips this step; the
        control values [weighted loss, weight, non-finite flag, re-form flag] are summed in
        place. ``early``: the all-reduces of the gradient past ``head``, already started;
        they are all finished when this returns or raises. The buffer is reduced in place
        (``out=`` the array itself): it is refilled every step, so no copy and no fresh
        result array per step."""
        control, gradient = self._buffer[:CONTROL], self._buffer[CONTROL:]
        exact = self._buffer[:CONTROL + head] if self.codec is None else control
        try:
            self.node.all_reduce(exact, op="sum", timeout=self.timeout, out=exact)
        finally:
            # an early all-reduce that failed fails the step, even when the last one passed
            # (the engine runs them in order: they are done once the last one is)
            errors = [_outcome(work) for work in early]
        failed = next((error for error in errors if error is not None), None)
        if failed is not None:
            raise failed
        if control[2] != 0 or not np.isfinite(control[:2]).all() or not control[1] > 0:
            return None
        if self.codec is not None:
            self.node.all_reduce(gradient, op="sum", timeout=self.timeout,
                                 compression=self.codec, out=gradient)
        return gradient

    def clear_feedback(self) -> None:
        """Forget the error-feedback residuals: after a non-finite result (they would carry
        it into every later step) or a re-form (they belong to an attempt whose
        contributions never landed)."""
        if self.codec is not None:
            self.codec.residuals.clear()

    def average_state(self, weight: float) -> None:
        """Replace parameters and optimizer arrays by their mean over the members, weighted by
        ``weight`` (samples this node consumed since the last average); for local SGD.

        Raises:
            NonFiniteGradientError: the averaged parameters are not finite.
        """
        state = self.optimizer.state_dict()
        names = _array_names(state)
        arrays = [self.params, *(state[name] for name in names)]
        averaged = self.node.all_reduce_many(arrays, op="mean", weight=float(weight),
                                             timeout=self.timeout)
        if not all(np.isfinite(a).all() for a in averaged):
            raise NonFiniteGradientError(
                f"averaged parameters are not finite after step {self.steps} (generation "
                f"{self.node.generation})", step=self.steps, generation=self.node.generation)
        self.params[...] = averaged[0]
        state.update(zip(names, averaged[1:], strict=True))
        self.optimizer.load_state_dict(state)

    def broadcast_state(self, root: int) -> None:
        """Copy the ``root`` member's parameters and optimizer state to every member."""
        state = self.optimizer.state_dict()
        names = _array_names(state)
        scalars = sorted(name for name in state if name not in names)
        flat = np.concatenate([self.params, *(np.ravel(state[name]) for name in names)])
        flat = self.node.broadcast(flat, root, timeout=self.timeout)
        numbers = np.array([float(state[name]) for name in scalars], dtype=np.float64)
        numbers = self.node.broadcast(numbers, root, timeout=self.timeout)
        size = self.params.size
        self.params[...] = flat[:size]
        for index, name in enumerate(names, start=1):
            state[name] = flat[index * size:(index + 1) * size]
        for name, value in zip(scalars, numbers, strict=True):
            state[name] = int(value) if isinstance(state[name], (int, np.integer)) \
                else float(value)
        self.optimizer.load_state_dict(state)


class Trainer:
    """Trains ``model`` on ``(x, y)`` data-parallel with the other members (policies: module
    docstring). Constructing it is a collective: agreement check, then rank 0's state or the
    newest checkpoint on every member.

    Args:
        node: this process's node.
        model: the model; ``model.params`` is what the optimizer steps.
        optimizer: built on ``model.params``.
        x: the whole training set's inputs (every member holds the same copy and reads only
            its samples).
        y: the targets.
        batch_size: samples per member per step; the global batch is
            ``batch_size * world_size``.
        loss: mean-over-batch loss (default softmax cross-entropy).
        seed: the data order seed.
        adaptive: cut the global batch by measured member speed.
        share_every: steps between throughput exchanges (adaptive only).
        average_every: 1 averages gradients every step; k > 1 is local SGD.
        checkpoint_dir: where checkpoints live (None: no checkpoints).
        checkpoint_every: steps between checkpoints; with a ``checkpoint_dir``, a multiple of
            ``average_every``.
        max_nonfinite: skipped steps in a row before :class:`NonFiniteGradientError`.
        timeout: seconds for each collective (default: the node's setting).
        global_batch_size: keep the global batch at this size whatever the number of members
            (elastic runs then compute the same gradients as a failure-free run); default
            ``batch_size * world_size``.
        rejoin_timeout: how long the trainer waits for a ring to re-form (e.g. below
            ``min_size``, or on the minority side of a partition) before giving up.
        compression: compress the gradient all-reduce: None (default), ``"fp16"``,
            ``"int8"``, ``"topk[:RATIO]"`` or a Codec (module docstring); not with local SGD.
        bucket_bytes: send the gradient of the last layers while backward still computes
            the first ones, in buckets of whole layers of at least this many bytes (module
            docstring); 0: all of it after backward. Applies to uncompressed gradient
            averaging (``average_every=1``) with the built-in :meth:`compute_gradients` (an
            override may change the gradient after backward). Members must agree.

    Raises:
        ConfigError: a bad argument, or members that disagree on model, data or settings.
        CheckpointError: this node's newest checkpoint cannot be read.
    """

    def __init__(self, node: Node, model: Sequential, optimizer: Optimizer, x: np.ndarray,
                 y: np.ndarray, *, batch_size: int, loss: Loss = softmax_cross_entropy,
                 seed: int = 0, adaptive: bool = True, share_every: int = 10,
                 average_every: int = 1, checkpoint_dir: str | os.PathLike[str] | None = None,
                 checkpoint_every: int = 100, max_nonfinite: int = 10,
                 timeout: float | None = None, rejoin_timeout: float = 600.0,
                 global_batch_size: int | None = None,
                 compression: str | Codec | None = None,
                 bucket_bytes: int = BUCKET_BYTES):
        for name, value in (("batch_size", batch_size), ("share_every", share_every),
                            ("average_every", average_every),
                            ("checkpoint_every", checkpoint_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) \
                or bucket_bytes < 0:
            raise ConfigError(f"bucket_bytes must be a non-negative integer, got "
                              f"{bucket_bytes!r}")
        if checkpoint_dir is not None and checkpoint_every % average_every:
            raise ConfigError(f"checkpoint_every ({checkpoint_every}) must be a multiple of "
                              f"average_every ({average_every}): members differ in between")
        codec = get_codec(compression)
        if codec is not None and average_every > 1:
            raise ConfigError(f"compression {codec.spec()} applies to the gradient all-reduce "
                              f"of every step; local SGD (average_every={average_every}) "
                              f"averages parameters, which must not be quantized")
        if optimizer.params is not model.params:
            raise ConfigError("the optimizer must be built on model.params")
        if len(x) != len(y):
            raise ConfigError(f"x has {len(x)} samples but y has {len(y)}")
        self.node = node
        self.model = model
        self.x, self.y = x, y
        self.loss_fn = loss
        self.batch_size = batch_size
        self.adaptive = adaptive
        self.share_every = share_every
        self.average_every = average_every
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every = checkpoint_every
        self.sampler = Sampler(len(x), seed)
        self.position = DataPosition()
        self.step_count = 0
        self.throughput = 0.0
        """This node's smoothed compute throughput, samples per second (0: not measured)."""
        self.lost_steps = 0
        self.parent_version = ""
        """The content hash of the last checkpoint saved or resumed from: the parent of the
        next one (``ringtrain models``)."""
        """Steps that had been done after the checkpoint this run resumed from, and were lost."""
        self._speeds: list[float] | None = None
        self._since_average = 0  # samples since the last parameter average (local SGD)
        self._local_steps = 0
        self._local_nonfinite = 0
        self.rejoin_timeout = rejoin_timeout
        self.global_batch_size = global_batch_size
        self.reforms = 0
        """How many times the ring re-formed under this trainer (failures, joins, leaves)."""
        overlap = (bucket_bytes > 0 and codec is None and average_every == 1
                   and type(self).compute_gradients is Trainer.compute_gradients)
        self.early_buckets = gradient_buckets(
            model.ready_points, model.num_params,
            max(1, bucket_bytes // model.dtype.itemsize)) if overlap else []
        """The gradient's ranges [start, stop) sent while backward runs, in that order (empty:
        all of it travels after backward)."""
        self._on_ready: Callable[[int], None] | None = None  # backward's hook, during a step
        joining = node.joined_running_ring
        self.optimizer = DistributedOptimizer(
            node, optimizer, max_nonfinite=max_nonfinite, timeout=timeout, joining=joining,
            compression=codec,
            agree_on=training_facts(model, x, y, batch_size=batch_size, seed=seed,
                                    adaptive=adaptive, share_every=share_every,
                                    average_every=average_every, loss=loss,
                                    global_batch_size=global_batch_size,
                                    bucket_bytes=bucket_bytes if self.early_buckets else 0))
        if joining:
            try:
                self._sync_state()
            except PeerFailedError as exc:  # the ring changed again while admitting us
                log.warning("state sync after joining failed (%s); re-forming", exc)
                self._reform()
        elif self.checkpoint_dir is not None:
            self._resume(self.checkpoint_dir)

    # the loop -------------------------------------------------------------------------------

    def compute_gradients(self, x: np.ndarray, y: np.ndarray) -> float:
        """Forward and backward on one local batch; fills ``model.grads``, returns the loss.

        Override to change how gradients are computed (the tests slow a node down here).
        """
        loss, grad_out = self.loss_fn(self.model.forward(x), y)
        self.model.backward(grad_out, on_ready=self._on_ready, input_grad=False)
        return loss

    def step(self) -> StepReport:
        """One global step: this node's share of the next global batch, forward, backward,
        then a gradient average (or, in local SGD mode, a local update and every
        ``average_every`` steps a parameter average).

        If a member fails during the step, the ring re-forms without it and the step is done
        again by the survivors (the failed member's samples re-cut among them); nothing
        partial is applied. If members asked for a change (a joiner, a leave), the ring
        re-forms after the step, at the same point on every member.
        """
        while True:
            try:
                report = self._step_once()
            except PeerFailedError as exc:
                log.warning("rank %d: step %d failed (%s); re-forming the ring and redoing it",
                            self.node.rank, self.step_count + 1, exc)
                self._reform()
                self._event("step-redone", f"step {self.step_count + 1} redone on generation "
                            f"{self.node.generation} ({self.node.world_size} members) after: "
                            f"{exc}", step=self.step_count + 1, cause=str(exc),
                            suspect=exc.peer)
                continue
            if self.optimizer.reform_agreed and not self.optimizer.leave_announced:
                self._reform()
            return report

    def _step_once(self) -> StepReport:
        started = time.perf_counter()
        node = self.node
        sizes = self._batch_sizes()
        epoch = self.position.epoch
        batches, after = self.sampler.next_batches(self.position, sizes)
        indices = batches[node.rank]
        if self.average_every == 1 and self.early_buckets:
            ready = self.optimizer.begin_step(len(indices), self.early_buckets)
            self._on_ready = lambda start: ready(self.model.grads, start)
        compute_started = time.perf_counter()
        try:
            if len(indices):
                loss = self.compute_gradients(self.x[indices], self.y[indices])
            else:
                loss = 0.0
                self.model.grads[...] = 0
        finally:
            self._on_ready = None
        compute_seconds = time.perf_counter() - compute_started
        if len(indices) and compute_seconds > 0:
            rate = len(indices) / compute_seconds
            self.throughput = rate if self.throughput == 0 else \
                SPEED_SMOOTHING * rate + (1 - SPEED_SMOOTHING) * self.throughput
        if self.average_every == 1:
            applied = self.optimizer.step(self.model.grads, len(indices), loss)
            loss = self.optimizer.loss
        else:
            applied = self._local_step(len(indices), loss)
        self.position = after
        self.step_count += 1
        if self.adaptive and self.step_count % self.share_every == 0:
            try:
                self._share_speeds()
            except PeerFailedError as exc:  # the step itself is done: just re-form
                log.warning("rank %d: sharing speeds failed (%s); re-forming", node.rank, exc)
                self._reform()
        if self.checkpoint_dir is not None and node.rank != 0 \
                and self.step_count % self.checkpoint_every == 0:
            self.parent_version = self.version.content_hash  # what rank 0 saves now
        if self.checkpoint_dir is not None and node.rank == 0:
            if self.step_count % self.checkpoint_every == 0:
                self.save_checkpoint()
            self._write_progress(self.checkpoint_dir)
        return StepReport(self.step_count, epoch, after.epoch != epoch, loss, applied, indices,
                          tuple(len(b) for b in batches), compute_seconds,
                          time.perf_counter() - started, self.throughput)

    def _reform(self) -> None:
        """Re-form the ring, then make every member's state that of the most advanced one."""
        deadline = time.monotonic() + self.rejoin_timeout
        waited = False
        while True:
            try:
                # short rounds, so a request to leave is noticed while no ring can form
                view = self.node.reform(timeout=max(1.0, min(REFORM_ROUND,
                                                             deadline - time.monotonic())))
                self.reforms += 1
                log.info("rank %d: ring re-formed as generation %d with %d members",
                         view.rank, view.generation, view.world_size)
                self.optimizer.clear_feedback()
                self._sync_state()
                return
            except PeerFailedError as exc:
                log.warning("another failure while re-forming (%s); trying again", exc)
            except MembershipError as exc:
                if time.monotonic() >= deadline:
                    raise
                if not waited:
                    log.warning("waiting for the ring to re-form (up to %.0f s): %s",
                                self.rejoin_timeout, exc)
                    waited = True
            if self.optimizer.leaving:  # asked to leave while no ring could form: just go
                raise LeftRing(f"left the ring on request at step {self.step_count}, "
                               f"while it was re-forming")

    def _sync_state(self) -> None:
        """After a membership change: every member adopts the state of the member furthest
        ahead (most steps done; lowest rank among equals). A member that finished a step the
        others abandoned thus passes on that step's result, so no step is lost or applied
        twice; a joiner receives everything it needs."""
        mine = np.array([self.step_count, self.position.epoch, self.position.position],
                        dtype=np.int64)
        gathered = self.node.all_gather(mine, timeout=self.optimizer.timeout)
        root = int(np.argmax(gathered[:, 0]))
        self.optimizer.broadcast_state(root)
        self.step_count, epoch, position = (int(v) for v in gathered[root])
        self.position = DataPosition(epoch, position)
        self.optimizer.steps = self.step_count
        self._speeds = None  # the members changed: measure again
        self._since_average = 0
        self._local_steps = 0

    def request_leave(self) -> None:
        """Leave after the next step: the others learn it through that step and re-form
        without this node, so no step fails. Then :meth:`fit` returns and the node closes."""
        self.optimizer.leaving = True
        self.node.prepare_leave()

    def fit(self, epochs: int, on_step: Callable[[StepReport], None] | None = None,
            max_steps: int | None = None) -> StepReport | None:
        """Train until the data position reaches epoch ``epochs`` (counted from the start of
        training, so a resumed run stops where an uninterrupted one would), or until
        ``max_steps`` global steps are done.

        Args:
            epochs: the epoch to stop at.
            on_step: called with each step's report.
            max_steps: stop once the global step count reaches this.

        Returns:
            the last step's report (None if no step was left to do).
        """
        report = None
        while self.position.epoch < epochs and (max_steps is None
                                                or self.step_count < max_steps):
            try:
                report = self.step()
            except LeftRing as exc:
                log.info("%s", exc)
                self.node.leave()
                return report
            if on_step is not None:
                on_step(report)
            # go once a step told the others (local SGD has no per-step message: go now)
            if self.optimizer.leave_announced or (self.optimizer.leaving
                                                  and self.average_every > 1):
                self.node.leave()
                return report
        if self._local_steps:
            self._average()
        return report

    @property
    def version(self) -> ModelVersion:
        """The model's version: generation, global step and a hash of parameters and
        optimizer state (equal on every member whenever they are in sync)."""
        return ModelVersion(self.node.generation, self.step_count, checkpoint.content_hash(
            self.model.params, self.optimizer.optimizer.state_dict()))

    # checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write this node's state to ``checkpoint_dir`` atomically; returns the file.

        Raises:
            ConfigError: the trainer has no ``checkpoint_dir``.
            CheckpointError: the file could not be written.
        """
        if self.checkpoint_dir is None:
            raise ConfigError("save_checkpoint needs a Trainer with a checkpoint_dir")
        state = checkpoint.TrainingState(
            params=self.model.params.copy(),
            optimizer_state=self.optimizer.optimizer.state_dict(),
            step=self.step_count, epoch=self.position.epoch, position=self.position.position,
            generation=self.node.generation,
            metadata={"model": self.model.schema_hash(), "world_size": self.node.world_size,
                      "job": self.node.job, "parent": self.parent_version,
                      **architecture.describe(self.model)})
        path = checkpoint.save(self.checkpoint_dir, state)
        self.parent_version = checkpoint.content_hash(state.params, state.optimizer_state)
        self._event("checkpoint", f"checkpoint written: step {self.step_count} to {path}",
                    step=self.step_count, path=str(path))
        return path

    def _event(self, kind: str, message: str, **fields: object) -> None:
        """One line for people (the node's flight recorder logs it as an event; observe)."""
        recorder = getattr(self.node, "recorder", None)
        if recorder is not None:
            recorder.event(kind, message, **fields)

    def _resume(self, directory: Path) -> None:
        path = checkpoint.latest(directory)
        state = None if path is None else checkpoint.load(path)
        offered = np.array([-1 if state is None else state.step], dtype=np.int64)
        steps = self.node.all_gather(offered, timeout=self.optimizer.timeout)[:, 0]
        best = int(steps.max())
        if best < 0:
            return
        root = int(np.argmax(steps))
        meta = np.zeros(4, dtype=np.int64)
        if self.node.rank == root and state is not None:
            if state.params.shape != self.model.params.shape:
                raise ConfigError(f"checkpoint {path} holds {state.params.size} parameters, "
                                  f"the model has {self.model.num_params}")
            self.model.load_params(state.params)
            self.optimizer.optimizer.load_state_dict(state.optimizer_state)
            done = self._read_progress(directory)
            meta[:] = (state.step, state.epoch, state.position, max(0, done - state.step))
        self.optimizer.broadcast_state(root)
        meta = self.node.broadcast(meta, root, timeout=self.optimizer.timeout)
        self.step_count, epoch, position, self.lost_steps = (int(v) for v in meta)
        self.position = DataPosition(epoch, position)
        self.optimizer.steps = self.step_count
        self.parent_version = self.version.content_hash
        log.info("rank %d resumed from the checkpoint of rank %d at step %d (epoch %d, "
                 "position %d), now %s; lost work: %d steps done after that checkpoint",
                 self.node.rank, root, self.step_count, epoch, position, self.version,
                 self.lost_steps)

    def _write_progress(self, directory: Path) -> None:
        # Best effort, no fsync: it only tells a resumed run how much work was lost.
        temporary = directory / f".{PROGRESS_FILE}.tmp"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps({"step": self.step_count}))
            os.replace(temporary, directory / PROGRESS_FILE)
        except OSError as exc:
            log.warning("could not record progress in %s: %s", directory, exc)

    @staticmethod
    def _read_progress(directory: Path) -> int:
        try:
            return int(json.loads((directory / PROGRESS_FILE).read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    # policies -------------------------------------------------------------------------------

    def _batch_sizes(self) -> list[int]:
        world_size = self.node.world_size
        total = self.global_batch_size or self.batch_size * world_size
        if self._speeds is None or len(self._speeds) != world_size:
            return split_proportional(total, [1] * world_size)
        # one sample each first, so a slow member keeps being measured
        return [1 + size for size in split_proportional(total - world_size, self._speeds)]

    def _share_speeds(self) -> None:
        speeds = self.node.all_gather(np.array([self.throughput]),
                                      timeout=self.optimizer.timeout)[:, 0]
        if (speeds > 0).all() and np.isfinite(speeds).all():
            self._speeds = [float(s) for s in speeds]
            log.debug("step %d: member throughputs %s samples/s", self.step_count,
                      [round(s) for s in self._speeds])

    def _local_step(self, samples: int, loss: float) -> bool:
        grads = self.model.grads
        applied = samples > 0 and math.isfinite(loss) and bool(np.isfinite(grads).all())
        if applied:
            self.optimizer.optimizer.step(grads)
            self._local_nonfinite = 0
        elif samples:
            self._local_nonfinite += 1
            log.warning("rank %d: non-finite gradient at step %d, skipped locally",
                        self.node.rank, self.step_count + 1)
            if self._local_nonfinite >= self.optimizer.max_nonfinite:
                raise NonFiniteGradientError(
                    f"rank {self.node.rank}: gradients were not finite for "
                    f"{self._local_nonfinite} local steps in a row, up to step "
                    f"{self.step_count + 1} (generation {self.node.generation})",
                    step=self.step_count + 1, generation=self.node.generation)
        self._since_average += samples
        self._local_steps += 1
        if self._local_steps == self.average_every:
            self._average()
        return applied

    def _average(self) -> None:
        self.optimizer.average_state(self._since_average)
        self._since_average = 0
        self._local_steps = 0


def _optimizer_kind(optimizer: Optimizer) -> str:
    state = optimizer.state_dict()
    return f"{type(optimizer).__name__}({','.join(sorted(state))})"


def _array_names(state: Mapping[str, object]) -> list[str]:
    return sorted(name for name, value in state.items() if isinstance(value, np.ndarray))


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
