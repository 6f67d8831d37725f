"""Data-parallel training on a :class:`~ringtrain.Node`: every member trains the same model
on its own shard of each step's global batch, and every member ends with the same model.

The :class:`Trainer` runs the loop; its seams are modules of their own:

* :mod:`.sync`: the synchronous step (:class:`~.sync.DistributedOptimizer`): one weighted
  gradient average per step, compression, PowerSGD, gradient sent during backward, non-finite
  gradients;
* :mod:`.rounds`: training in rounds for slow links: DiLoCo, local SGD, asynchronous rounds;
* :mod:`.speed`: the speed policy (batches cut by measured member speed);
* :mod:`.elastic`: re-forming after failures, joins and leaves (a failed step or round is
  redone over the survivors); checkpoints;
* :mod:`.agreement`: the check that every member trains the same thing;
* :mod:`.schedule`: learning-rate schedules, driven by :meth:`Trainer.progress`.

Sharding. Every epoch has one permutation of the data set (:mod:`ringtrain.train.sharding`),
read front to back as one stream; each step takes the next ``batch_size * world_size``
samples and cuts them into one contiguous piece per member, in rank order. The position in
the stream is global, so no sample of an epoch is dropped or repeated, and a run resumed with
another world size carries on from the same position. Asynchronous rounds, whose members make
different numbers of steps, read one stream per member instead (:mod:`.rounds`).

Each model carries a :class:`ModelVersion` (generation, step, content hash of the shared
state: the parameters and optimizer state, or with rounds the anchor and the outer state).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..node.node import Node
from ..ring.compression import Codec, get_codec
from ..ring.powersgd import PowerSGD, parse_powersgd
from . import checkpoint
from .agreement import check_agreement, schema_of, training_facts
from .elastic import LeftRing, Recovery
from .nn import Sequential, softmax_cross_entropy
from .optim import Optimizer
from .rounds import DiLoCo, Rounds, local_sgd
from .schedule import Cosine
from .sharding import DataPosition, Sampler
from .speed import SpeedPolicy
from .sync import (
    BUCKET_BYTES,
    DistributedOptimizer,
    NonFiniteGradientError,
    gradient_buckets,
)

__all__ = ["BUCKET_BYTES", "DiLoCo", "DistributedOptimizer", "ModelVersion",
           "NonFiniteGradientError", "StepReport", "Trainer", "check_agreement",
           "gradient_buckets", "schema_of", "training_facts"]

log = logging.getLogger(__name__)

Loss = Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray]]
"""A loss: (model output, targets) -> (mean loss over the batch, d loss / d output)."""

STREAM_SEED_STRIDE = 7919  # asynchronous rounds: member r reads the stream of seed + r * this


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
        step: global steps completed, this one included (asynchronous rounds: this
            member's steps).
        epoch: the epoch this step's samples came from.
        end_of_epoch: whether this step consumed the epoch's last samples.
        loss: the loss over the global batch (synchronous mode) or this node's batch
            (rounds), before the update.
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


def _check_arguments(model: Sequential, optimizer: Optimizer, x: np.ndarray, y: np.ndarray,
                     **counts: object) -> None:
    """Raise ConfigError for a count that is not a positive integer, an optimizer not on
    the model's parameters or inputs and targets of different lengths."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if optimizer.params is not model.params:
        raise ConfigError("the optimizer must be built on model.params")
    if len(x) != len(y):
        raise ConfigError(f"x has {len(x)} samples but y has {len(y)}")


def _training_mode(model: Sequential, rounds: DiLoCo | None, average_every: int,
                   compression: str | Codec | None, bucket_bytes: int, adaptive: bool,
                   checkpoint_every: int | None) -> tuple[DiLoCo | None, Codec | PowerSGD | None,
                                                          bool]:
    """Check the arguments that decide how members train together (see :class:`Trainer`).

    Returns:
        (rounds, compressor, adaptive) as training uses them: local SGD becomes rounds,
        overlapped rounds do not exchange speeds.

    Raises:
        ConfigError: a bad or conflicting argument.
    """
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 0:
        raise ConfigError(f"bucket_bytes must be a non-negative integer, got {bucket_bytes!r}")
    if rounds is not None and average_every > 1:
        raise ConfigError("pass either average_every (local SGD) or rounds, not both")
    if average_every > 1:
        rounds = local_sgd(average_every)
    compressor = _compressor(compression, model)
    if compressor is not None and rounds is not None:
        raise ConfigError(f"compression {compressor.spec()} applies to the gradient "
                          f"all-reduce of every step; rounds average parameters: compress "
                          f"their pseudo-gradient with DiLoCo(compression=...)"
                          + (f" (local SGD, average_every={average_every}, averages "
                             f"parameters, which must not be quantized)"
                             if average_every > 1 else ""))
    if rounds is not None and rounds.overlapped and adaptive:
        adaptive = False  # overlapped rounds do not step in lockstep: no speed exchange
    if checkpoint_every is not None and rounds is not None and not rounds.asynchronous \
            and checkpoint_every % rounds.inner_steps:
        raise ConfigError(f"checkpoint_every ({checkpoint_every}) must be a multiple of "
                          f"the round's steps ({rounds.inner_steps}): members differ in "
                          f"between")
    return rounds, compressor, adaptive


def _compressor(spec: str | Codec | None, model: Sequential) -> Codec | PowerSGD | None:
    if isinstance(spec, str):
        rank = parse_powersgd(spec)
        if rank is not None:
            return PowerSGD([shape for _, shape in model.parameter_layout()], rank,
                            dtype=model.dtype)
    return get_codec(spec)


class Trainer:
    """Trains ``model`` on ``(x, y)`` data-parallel with the other members (module
    docstrings). Constructing it is a collective: agreement check, then rank 0's state or
    the newest checkpoint on every member.

    Args:
        node: this process's node.
        model: the model; ``model.params`` is what the optimizer steps.
        optimizer: built on ``model.params`` (with rounds: the inner optimizer).
        x: the whole training set's inputs (every member holds the same copy and reads only
            its samples).
        y: the targets.
        batch_size: samples per member per step; the global batch is
            ``batch_size * world_size``.
        loss: mean-over-batch loss (default softmax cross-entropy).
        seed: the data order seed.
        adaptive: cut the global batch by measured member speed (:mod:`.speed`; not with
            overlapped or asynchronous rounds).
        share_every: steps between throughput exchanges (adaptive only).
        average_every: 1 averages gradients every step; k > 1 is local SGD (rounds of k
            steps that average parameters and optimizer arrays).
        checkpoint_dir: where checkpoints live (None: no checkpoints).
        checkpoint_every: steps between checkpoints; with a ``checkpoint_dir`` and rounds of
            a fixed step count, a multiple of that count (checkpoints are taken at round
            boundaries, when members share the model).
        max_nonfinite: skipped steps in a row before :class:`NonFiniteGradientError`.
        timeout: seconds for each collective (default: the node's setting).
        global_batch_size: keep the global batch at this size whatever the number of members
            (elastic runs then compute the same gradients as a failure-free run); default
            ``batch_size * world_size``.
        rejoin_timeout: how long the trainer waits for a ring to re-form (e.g. below
            ``min_size``, or on the minority side of a partition) before giving up.
        compression: compress the gradient all-reduce: None (default), ``"fp16"``,
            ``"int8"``, ``"int4"``, ``"topk[:RATIO]"``, ``"powersgd[:RANK]"`` or a Codec
            (:mod:`.sync`); synchronous mode only (rounds compress the pseudo-gradient
            with ``DiLoCo(compression=...)``).
        bucket_bytes: send the gradient of the last layers while backward still computes
            the first ones, in buckets of whole layers of at least this many bytes
            (:mod:`.sync`); 0: all of it after backward. Applies to uncompressed synchronous
            averaging with the built-in :meth:`compute_gradients`. Members must agree.
        rounds: train in rounds (:class:`~.rounds.DiLoCo`) instead of averaging every step.
        lr_schedule: scale the (inner) optimizer's learning rate by the run's progress in
            :meth:`fit` (:mod:`.schedule`, e.g. ``Cosine()``); None keeps it constant.

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
                 global_batch_size: int | None = None, compression: str | Codec | None = None,
                 bucket_bytes: int = BUCKET_BYTES, rounds: DiLoCo | None = None,
                 lr_schedule: Cosine | None = None):
        _check_arguments(model, optimizer, x, y, batch_size=batch_size,
                         share_every=share_every, average_every=average_every,
                         checkpoint_every=checkpoint_every)
        rounds, compressor, adaptive = _training_mode(
            model, rounds, average_every, compression, bucket_bytes, adaptive,
            checkpoint_every if checkpoint_dir is not None else None)
        self.node, self.model, self.x, self.y, self.loss_fn = node, model, x, y, loss
        self.batch_size, self.global_batch_size = batch_size, global_batch_size
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every = checkpoint_every
        self.lr_schedule, self.base_lr = lr_schedule, optimizer.lr
        asynchronous = rounds is not None and rounds.asynchronous
        self.sampler = Sampler(len(x), seed + (node.rank + 1) * STREAM_SEED_STRIDE
                               if asynchronous else seed)
        self.position = DataPosition()
        self.step_count = 0
        self.fresh = True
        """Whether this trainer has not yet taken part in a state sync (a joiner adopts)."""
        self.speed = SpeedPolicy(adaptive, share_every)
        self.recovery = Recovery(self, rejoin_timeout)
        overlap = (bucket_bytes > 0 and compressor is None and rounds is None
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
            defer_start=True, compression=compressor,
            agree_on=training_facts(model, x, y, batch_size=batch_size, seed=seed,
                                    adaptive=adaptive, share_every=share_every,
                                    rounds=None if rounds is None else rounds.spec(), loss=loss,
                                    global_batch_size=global_batch_size,
                                    lr_schedule=lr_schedule and f"{lr_schedule} {optimizer.lr}",
                                    bucket_bytes=bucket_bytes if self.early_buckets else 0))
        self.rounds = None if rounds is None else Rounds(node, model.params, optimizer, rounds,
                                                         timeout)
        self.recovery.start(joining)
        self.fresh = False

    @property
    def generation(self) -> int:
        """The generation this trainer's state was last synced in."""
        return self.recovery.generation

    # what other parts read ----------------------------------------------------------------

    @property
    def throughput(self) -> float:
        """This node's smoothed compute throughput, samples per second (0: not measured)."""
        return self.speed.throughput

    @property
    def reforms(self) -> int:
        """How many times the ring re-formed under this trainer (failures, joins, leaves)."""
        return self.recovery.reforms

    @property
    def lost_steps(self) -> int:
        """Steps that had been done after the checkpoint this run resumed from, and were
        lost."""
        return self.recovery.lost_steps

    @property
    def leaving(self) -> bool:
        """Whether this node asked to leave (:meth:`request_leave`)."""
        return self.optimizer.leaving

    @property
    def shared_params(self) -> np.ndarray:
        """The model every member shares: the parameters, or with rounds the anchor (the
        parameters between rounds are this member's own)."""
        return self.model.params if self.rounds is None else self.rounds.anchor

    @property
    def version(self) -> ModelVersion:
        """The model's version: generation, global step and a hash of the shared state
        (equal on every member whenever they are in sync)."""
        if self.rounds is None:
            state = self.optimizer.optimizer.state_dict()
        else:
            state = self.rounds.outer_state()
        return ModelVersion(self.node.generation, self.step_count,
                            checkpoint.content_hash(self.shared_params, state))

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
        then a gradient average (or, with rounds, an inner step, and at the end of a round
        the round's all-reduce and outer step).

        If a member fails during the step, the ring re-forms without it and the step is done
        again by the survivors (the failed member's samples re-cut among them); nothing
        partial is applied. With rounds, the inner step stands and the round's all-reduce is
        redone over the survivors. If members asked for a change (a joiner, a leave), the ring
        re-forms after the step, at the same point on every member.
        """
        if self.rounds is not None:
            return self._round_step(self.rounds)
        return self.recovery.step_until_done(self._sync_step)

    def _batch(self) -> tuple[list[int], int, np.ndarray, DataPosition]:
        if self.rounds is not None and self.rounds.settings.asynchronous:
            sizes = [self.batch_size]
            (indices,), after = self.sampler.next_batches(self.position, sizes)
            return sizes, self.position.epoch, indices, after
        world_size = self.node.world_size
        total = self.global_batch_size or self.batch_size * world_size
        sizes = self.speed.batch_sizes(total, world_size)
        batches, after = self.sampler.next_batches(self.position, sizes)
        return sizes, self.position.epoch, batches[self.node.rank], after

    def _compute(self, indices: np.ndarray) -> tuple[float, float]:
        """Forward and backward on this node's samples; (loss, seconds)."""
        started = time.perf_counter()
        try:
            if len(indices):
                loss = self.compute_gradients(self.x[indices], self.y[indices])
            else:
                loss = 0.0
                self.model.grads[...] = 0
        finally:
            self._on_ready = None
        seconds = time.perf_counter() - started
        self.speed.record(len(indices), seconds)
        return loss, seconds

    def _sync_step(self) -> StepReport:
        started = time.perf_counter()
        sizes, epoch, indices, after = self._batch()
        if self.early_buckets:
            ready = self.optimizer.begin_step(len(indices), self.early_buckets)
            self._on_ready = lambda start: ready(self.model.grads, start)
        loss, compute_seconds = self._compute(indices)
        applied = self.optimizer.step(self.model.grads, len(indices), loss)
        self.position = after
        self.step_count += 1
        self._after_step()
        return StepReport(self.step_count, epoch, after.epoch != epoch, self.optimizer.loss,
                          applied, indices, tuple(sizes), compute_seconds,
                          time.perf_counter() - started, self.throughput)

    def _round_step(self, rounds: Rounds) -> StepReport:
        started = time.perf_counter()
        sizes, epoch, indices, after = self._batch()
        loss, compute_seconds = self._compute(indices)
        applied = rounds.inner_step(self.model.grads, len(indices), loss, self.step_count + 1,
                                    self.optimizer.max_nonfinite)
        self.position = after
        self.step_count += 1
        self.recovery.advance_round(rounds)
        if not rounds.settings.overlapped:
            self._after_step()
        return StepReport(self.step_count, epoch, after.epoch != epoch, loss, applied,
                          indices, tuple(sizes), compute_seconds,
                          time.perf_counter() - started, self.throughput)

    def _after_step(self) -> None:
        """Speed exchange and checkpoints, at points every member reaches alike."""
        if self.speed.share_due(self.step_count):
            self.recovery.share_speeds()
        self.recovery.checkpoint_if_due()

    def request_leave(self) -> None:
        """Leave after the next step (with rounds: the next round): the others learn it
        through it and re-form without this node, so nothing fails. Then :meth:`fit`
        returns and the node closes."""
        self.optimizer.leaving = True
        if self.rounds is not None:
            self.rounds.leaving = True
        self.node.prepare_leave()

    def progress(self, epochs: int, max_steps: int | None = None) -> float:
        """How far a :meth:`fit` to ``epochs`` (or ``max_steps``) is, 0 to 1 (done), from what
        members agree on: the data position (asynchronous rounds: completed rounds' samples)."""
        if epochs <= 0 or max_steps is not None and max_steps <= 0:
            return 1.0
        if self.rounds is not None and self.rounds.settings.asynchronous:
            done = self.rounds.samples_total
            total = self.global_batch_size or self.batch_size * self.node.world_size
            return max(done / (epochs * len(self.x)),
                       0.0 if max_steps is None else done / (max_steps * total))
        return max((self.position.epoch + self.position.position / len(self.x)) / epochs,
                   0.0 if max_steps is None else self.step_count / max_steps)

    def fit(self, epochs: int, on_step: Callable[[StepReport], None] | None = None,
            max_steps: int | None = None) -> StepReport | None:
        """Train until the data position reaches epoch ``epochs`` (counted from the start of
        training, so a resumed run stops where an uninterrupted one would), or until
        ``max_steps`` global steps are done (asynchronous rounds: until the completed rounds
        hold that many epochs or global batches of samples).

        Args:
            epochs: the epoch to stop at.
            on_step: called with each step's report.
            max_steps: stop once the global step count reaches this.

        Returns:
            the last step's report (None if no step was left to do).
        """
        report = None
        while (progress := self.progress(epochs, max_steps)) < 1.0:
            if self.lr_schedule is not None:
                self.optimizer.optimizer.lr = self.base_lr * self.lr_schedule.factor(progress)
            try:
                report = self.step()
            except LeftRing as exc:
                log.info("%s", exc)
                self.node.leave()
                return report
            if on_step is not None:
                on_step(report)
            announced = self.optimizer.leave_announced if self.rounds is None \
                else self.rounds.leave_announced
            if announced:
                self.node.leave()
                return report
        if self.rounds is not None:
            self.rounds.finish()
        return report

    def save_checkpoint(self) -> Path:
        """Write this node's shared state to ``checkpoint_dir`` atomically; returns the file.

        Raises:
            ConfigError: the trainer has no ``checkpoint_dir``.
            CheckpointError: the file could not be written.
        """
        return self.recovery.save_checkpoint()
