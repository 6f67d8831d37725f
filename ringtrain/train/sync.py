"""The synchronous step: one gradient average over every member per step.

:class:`DistributedOptimizer` wraps an optimizer from :mod:`.optim`. Constructing it
  checks that every member trains the same thing and copies rank 0's parameters and optimizer
  state to every member. Each :meth:`~DistributedOptimizer.step` averages the gradient over the
  members in one fused all-reduce (two with compression, below), weighted by each member's
  sample count, and then steps the optimizer. Losses are means over the local batch, so the
  weighted mean ``sum(n_i * grad_i) / sum(n_i)`` is the gradient of the union batch: N members
  with batch b compute what one process with batch N*b would. Every member applies the same
  reduced bytes with the same deterministic optimizer, so parameters stay bit-identical.

Compression (``compression="int8"``, ``"fp16"``, ``"topk[:ratio]"``; default None). Only the
gradient travels through a compressed all-reduce (:mod:`ringtrain.ring.compression`). The loss,
the weights and the flags must stay exact: a rounded weight sum would skew every gradient, a
rounded flag could vanish. They travel in their own all-reduce of four values just before,
the cheapest sound way: it adds one round per step (small all-reduces take one round, not
a ring) and no bandwidth, whereas in the compressed buffer they would share a segment's int8
scale with the gradient (and the compressed path keeps only one trailing value exact, the
weight of a weighted mean). When the four say every member skips the step, the gradient does
not travel at all; else each member sends its weighted gradient divided by the weights' sum,
its share of the mean. Members still end bit-identical: every node decodes the same bytes, and
the owner of each chunk keeps exactly what the others decode. Error feedback (int8, top-k)
carries what a member's encodings left out into its next gradient, as a part of the mean (as
a part of the weighted sum it would be divided by the next step's weight: a small last batch
after full ones multiplied it by their ratio); it is cleared after a
non-finite result (which it would otherwise carry into every later step) and on a re-form
(it belongs to an attempt whose contributions never landed). Rounds (:mod:`.rounds`) compress
their pseudo-gradient instead.

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

PowerSGD (``compression="powersgd[:RANK]"``, with the model's ``layout``). The gradient's
matrices travel as low-rank factors (:mod:`ringtrain.ring.powersgd`), in two all-reduces: the
first carries the four exact values, every vector and small matrix uncompressed and every P
factor; the second every Q factor. Error feedback keeps what each member's projection left
out; the factors start where the last step's ended (warm start). Members end identical when
they run the same numpy build (see that module).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, RingtrainError
from ..node.node import Node, Work
from ..ring.compression import Codec, check_supported, get_codec
from ..ring.powersgd import PowerSGD
from .agreement import check_agreement, optimizer_kind
from .optim import Optimizer

__all__ = ["BUCKET_BYTES", "CONTROL", "DistributedOptimizer", "NonFiniteGradientError",
           "array_names", "gradient_buckets"]

log = logging.getLogger(__name__)

CONTROL = 4  # exact values before the gradient: weight x loss, weight, non-finite, re-form
BUCKET_BYTES = 1 << 20  # an early bucket of gradient holds at least this much


def array_names(state: Mapping[str, object]) -> list[str]:
    """The names of an optimizer state's arrays, sorted (every member sends them in this
    order)."""
    return sorted(name for name, value in state.items() if isinstance(value, np.ndarray))


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
        defer_start: do not run :meth:`start` here: the caller does (to recover from a
            failure during it).
        compression: None, a codec name (``fp16``, ``int8``, ``int4``, ``topk[:RATIO]``), a
            :class:`~ringtrain.ring.compression.Codec` or a
            :class:`~ringtrain.ring.powersgd.PowerSGD` for the gradient all-reduce of
            :meth:`step` (see the module docstring); every member must use the same.

    Raises:
        ConfigError: members disagree; the message names the fact, both ranks and both
            values. Or an unknown compression, or one the parameters' dtype cannot use.
    """

    def __init__(self, node: Node, optimizer: Optimizer, *,
                 agree_on: Mapping[str, object] | None = None, max_nonfinite: int = 10,
                 timeout: float | None = None, joining: bool = False,
                 defer_start: bool = False,
                 compression: str | Codec | PowerSGD | None = None):
        if isinstance(max_nonfinite, bool) or not isinstance(max_nonfinite, int) \
                or max_nonfinite < 1:
            raise ConfigError(f"max_nonfinite must be a positive integer, got {max_nonfinite!r}")
        self.node = node
        self.optimizer = optimizer
        self.params = optimizer.params
        self.max_nonfinite = max_nonfinite
        self.timeout = timeout
        self.powersgd = compression if isinstance(compression, PowerSGD) else None
        """The gradient's low-rank compression (this member's own: it holds the error
        feedback and the warm-start factors), or None."""
        if self.powersgd is not None and (self.powersgd.size != self.params.size
                                          or self.powersgd.dtype != self.params.dtype):
            raise ConfigError(f"PowerSGD was built for {self.powersgd.size} "
                              f"{self.powersgd.dtype} values; the parameters are "
                              f"{self.params.size} {self.params.dtype}")
        self.codec = None if self.powersgd is not None else get_codec(compression)
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
        self._factors = (np.empty(0, self.params.dtype), np.empty(0, self.params.dtype)) \
            if self.powersgd is None else \
            (np.empty(CONTROL + self.powersgd.first_size, self.params.dtype),
             np.empty(self.powersgd.second_size, self.params.dtype))
        self.facts = {"optimizer": optimizer_kind(optimizer),
                      "parameters": f"{self.params.size} {self.params.dtype}"}
        """What every member must share (checked by :meth:`start`)."""
        if self.codec is not None or self.powersgd is not None:
            self.facts["compression"] = (self.codec or self.powersgd).spec()
        self.facts.update({name: str(value) for name, value in (agree_on or {}).items()})
        if not (joining or defer_start):
            self.start()

    def start(self) -> None:
        """The start-up collectives, on every member at once: check that every member
        trains the same thing (:attr:`facts`), then take rank 0's state.

        Raises:
            ConfigError: a member's fact differs (named).
            PeerFailedError: a member failed meanwhile: re-form and sync state as after any
                failed step (``Trainer`` does).
        """
        check_agreement(self.node, self.facts, self.timeout)
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
        if self.codec is not None or self.powersgd is not None:
            raise ConfigError("early buckets carry an uncompressed gradient; this optimizer "
                              f"compresses with {(self.codec or self.powersgd).spec()}")
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
        self.optimizer.step(gradient)
        return True

    def _reduce(self, head: int, early: list[Work]) -> np.ndarray | None:
        """The mean gradient, or None when every member skips this step; the
        control values [weighted loss, weight, non-finite flag, re-form flag] are summed in
        place. ``early``: the all-reduces of the gradient past ``head``, already started;
        they are all finished when this returns or raises. The buffer is reduced in place
        (``out=`` the array itself): it is refilled every step, so no copy and no fresh
        result array per step."""
        control, gradient = self._buffer[:CONTROL], self._buffer[CONTROL:]
        if self.powersgd is not None:
            return self._reduce_low_rank(head)
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
        # compressed, the weights are in before the gradient travels: each member sends its
        # share of the mean, so what the codec leaves out stays a part of the mean
        np.divide(gradient, control[1], out=gradient)
        if self.codec is not None:
            self.node.all_reduce(gradient, op="sum", timeout=self.timeout,
                                 compression=self.codec, out=gradient)
        return gradient

    def _reduce_low_rank(self, head: int) -> np.ndarray | None:
        """:meth:`_reduce` with PowerSGD: the four exact values, the uncompressed values and
        every P factor in one all-reduce, every Q factor in a second; the approximate mean
        gradient written back into the buffer."""
        low_rank = self.powersgd
        assert low_rank is not None and head == self.params.size
        control, gradient = self._buffer[:CONTROL], self._buffer[CONTROL:]
        first, second = self._factors
        first[:CONTROL] = control
        low_rank.first(gradient, first[CONTROL:])
        self.node.all_reduce(first, op="sum", timeout=self.timeout, out=first)
        control[...] = first[:CONTROL]
        if control[2] != 0 or not np.isfinite(control[:2]).all() or not control[1] > 0:
            return None
        low_rank.second(first[CONTROL:], second)
        self.node.all_reduce(second, op="sum", timeout=self.timeout, out=second)
        low_rank.finish(first[CONTROL:], second, gradient)
        np.divide(gradient, control[1], out=gradient)
        return gradient

    def clear_feedback(self) -> None:
        """Forget the error-feedback residuals: after a non-finite result (they would carry
        it into every later step) or a re-form (they belong to an attempt whose
        contributions never landed)."""
        if self.codec is not None:
            self.codec.residuals.clear()
        if self.powersgd is not None:
            self.powersgd.clear_feedback()

    def broadcast_state(self, root: int) -> None:
        """Copy the ``root`` member's parameters and optimizer state to every member."""
        state = self.optimizer.state_dict()
        names = array_names(state)
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


