"""Training in rounds for slow links: DiLoCo, local SGD and asynchronous rounds.

A round: every member steps its own copy of the model with its inner optimizer on its own
batches, without communicating; then the members all-reduce the *pseudo-gradient*, how far
each moved from the round's starting point (the *anchor*, the shared model), weighted by the
samples each consumed, and an outer optimizer steps the anchor with that mean (DiLoCo,
Douillard et al. 2023: SGD with Nesterov momentum, lr 0.7, by default). Every member then
starts the next round from the new anchor. One all-reduce per round instead of one per step.

* Local SGD (``Trainer(average_every=k)``) is a round of k steps whose outer step is a plain
  average: outer SGD with lr 1 and no momentum, and the inner optimizers' arrays averaged too.
* The pseudo-gradient may be compressed with any codec of :mod:`ringtrain.ring.compression`
  (``int4`` is meant for it): every member decodes the same bytes, so anchors stay identical.
  The weights travel first; then each member sends its pseudo-gradient times its share of
  their sum, so the compressed all-reduce adds up to the mean itself and what the codec
  leaves out (error feedback) is owed to the next round as a part of the mean. (Carried as a
  part of the weighted sum, it was divided by the next round's weight: a short last round
  after long ones multiplied it by their ratio and threw the model off.)
* ``overlap``: a member submits its pseudo-gradient and keeps stepping while it travels;
  when the all-reduce is done, the outer step moves the anchor and the member keeps the
  steps it made since (``params = new anchor + (params - params at submission)``): they go
  into the next round. The link is busy while the processor computes.
* ``fragments=P`` (Streaming DiLoCo, Douillard et al. 2025): the parameters are cut into P
  contiguous fragments and every ``inner_steps / P`` steps one of them, in turn, goes
  through the round: its pseudo-gradient covers the steps since that fragment's last round
  (``inner_steps`` of them), its outer step moves that part of the anchor. Each fragment is
  still synced every ``inner_steps`` steps, but the link carries 1/P of the model at a time,
  spread over the round instead of in one burst (with ``overlap``, while the next steps
  compute). Lockstep rounds only.
* Asynchronous rounds (``round_seconds``): a round closes on a time budget instead of a
  step count; every member contributes the steps it made, weighted by its samples, and with
  ``overlap`` (always on here) a member never waits for a slower one: it keeps stepping until
  the slow member's contribution arrives. Each member draws its batches from its own
  permutation of the data set (a stream per member, seeded by rank).

What the rounds guarantee:

* The anchor, the outer optimizer's state and the round count are identical on every member
  after every completed round (they come from the same reduced bytes by elementwise IEEE
  arithmetic); they are the model's version, what a checkpoint saves and what a joiner adopts.
* Nothing a survivor computed is lost (the invariant the elastic tests check): every inner
  step a member makes lands in exactly one completed round's pseudo-gradient, as long as that
  member survives. When a member fails mid-round, the survivors keep their local progress,
  re-form, and the round's all-reduce is redone over the survivors' pseudo-gradients. When
  some member completed the round before the failure reached it, the others adopt its anchor
  (their contributions are in it) and keep only the steps they made after submitting. Steps
  of the failed member since its last completed round are lost: they existed only there.
* Asynchronous rounds: the outer update of round r is the sample-weighted mean of what every
  member did in round r, however many steps that was; a member that made no step contributes
  weight 0. A stalled member delays the anchor's progress, not the others' stepping.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..node.node import Node, Work
from ..ring.compression import get_codec
from .fragments import Fragments
from .optim import SGD, Optimizer
from .sync import NonFiniteGradientError, array_names

__all__ = ["DiLoCo", "Rounds", "local_sgd"]

log = logging.getLogger(__name__)

ROUND_CONTROL = 2  # exact values before the pseudo-gradient: weight, re-form flag


@dataclass(frozen=True)
class DiLoCo:
    """How to train in rounds (module docstring).

    Attributes:
        inner_steps: steps per round (H); ignored with ``round_seconds``.
        outer_lr: the outer optimizer's learning rate.
        momentum: the outer optimizer's momentum, in [0, 1).
        nesterov: Nesterov momentum for the outer step.
        compression: codec of the pseudo-gradient all-reduce (``int4``, ``int8``, ``fp16``,
            ``topk:R``; None: exact).
        overlap: keep stepping while the round's all-reduce travels.
        round_seconds: asynchronous rounds: close each round after this many seconds of
            stepping, whatever the step count (implies ``overlap``).
        warmup_rounds: asynchronous rounds: the first this many are shorter,
            ``round_seconds / 2**warmup_rounds`` doubling up to ``round_seconds``: the
            members' models drift apart fastest early in training, so they are averaged
            more often then (post-local SGD's warm-up, on the rounds' clock).
        average_inner_state: also average the inner optimizers' arrays at every round (local
            SGD; not with ``overlap``).
        fragments: sync the parameters in this many fragments, one every ``inner_steps /
            fragments`` steps (Streaming DiLoCo; lockstep rounds, a divisor of
            ``inner_steps``).
    """

    inner_steps: int = 50
    outer_lr: float = 0.7
    momentum: float = 0.9
    nesterov: bool = True
    compression: str | None = None
    overlap: bool = False
    round_seconds: float | None = None
    average_inner_state: bool = False
    fragments: int = 1
    warmup_rounds: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.inner_steps, bool) or not isinstance(self.inner_steps, int) \
                or self.inner_steps < 1:
            raise ConfigError(f"inner_steps must be a positive integer, got "
                              f"{self.inner_steps!r}")
        for name in ("outer_lr", "round_seconds"):
            value = getattr(self, name)
            if value is None and name == "round_seconds":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise ConfigError(f"momentum must lie in [0, 1), got {self.momentum!r}")
        if self.average_inner_state and self.overlapped:
            raise ConfigError("average_inner_state (local SGD) needs rounds without overlap "
                              "and without round_seconds")
        if isinstance(self.fragments, bool) or not isinstance(self.fragments, int) \
                or self.fragments < 1 or self.inner_steps % self.fragments:
            raise ConfigError(f"fragments must be a positive divisor of inner_steps "
                              f"({self.inner_steps}), got {self.fragments!r}")
        if isinstance(self.warmup_rounds, bool) or not isinstance(self.warmup_rounds, int) \
                or not 0 <= self.warmup_rounds <= 10 \
                or (self.warmup_rounds and not self.asynchronous):
            raise ConfigError(f"warmup_rounds must be an integer in [0, 10], with "
                              f"round_seconds; got {self.warmup_rounds!r}")
        if self.fragments > 1 and (self.asynchronous or self.average_inner_state):
            raise ConfigError("fragments need lockstep rounds: not with round_seconds or "
                              "average_inner_state")
        get_codec(self.compression)  # an unknown codec fails here, naming it

    @property
    def overlapped(self) -> bool:
        """Whether members keep stepping while a round's all-reduce travels."""
        return self.overlap or self.round_seconds is not None

    @property
    def asynchronous(self) -> bool:
        """Whether rounds close on a time budget (members make different step counts)."""
        return self.round_seconds is not None

    def seconds_until(self, first: int, count: int) -> float:
        """Asynchronous rounds: seconds of stepping from the start of round ``first`` (the
        rounds' clock starts there) to the end of the ``count``-th round after it."""
        assert self.round_seconds is not None

        def total(rounds: int) -> float:  # the length of rounds 0 .. rounds-1
            short = min(rounds, self.warmup_rounds)
            return ((2 ** short - 1) / 2 ** self.warmup_rounds + rounds - short) \
                * self.round_seconds

        return total(first + count) - total(first)

    def spec(self) -> str:
        """The settings as members agree on them."""
        return (f"inner_steps={self.inner_steps} outer=sgd(lr={self.outer_lr:g}, "
                f"momentum={self.momentum:g}, nesterov={self.nesterov}) "
                f"compression={self.compression} overlap={self.overlapped} "
                f"round_seconds={self.round_seconds} warmup_rounds={self.warmup_rounds} "
                f"average_inner_state={self.average_inner_state} fragments={self.fragments}")


def _root_inner_state(mine: dict, names: list[str], scalars: list[str], arrays: np.ndarray,
                      numbers: np.ndarray) -> dict:
    """The root's inner optimizer state, from its arrays (``names``, each as long as the
    parameters, one after another) and its scalars, typed as this member's own."""
    state = dict(mine)
    size = arrays.size // max(len(names), 1)
    for index, name in enumerate(names):
        state[name] = arrays[index * size:(index + 1) * size]
    for name, value in zip(scalars, numbers, strict=True):
        state[name] = int(value) if isinstance(mine[name], (int, np.integer)) else float(value)
    return state


def local_sgd(every: int) -> DiLoCo:
    """Local SGD: average parameters and inner optimizer arrays every ``every`` steps."""
    return DiLoCo(inner_steps=every, outer_lr=1.0, momentum=0.0, nesterov=False,
                  average_inner_state=True)


@dataclass
class _RoundClock:
    """Asynchronous rounds' clock: started at the same collective on every member (the
    start, a re-form), at round ``first``; ``closes``: rounds this member closed since."""

    started: float
    first: int = 0
    closes: int = 0

    def due(self, settings: DiLoCo) -> bool:
        """Whether this member's current round has had its seconds of stepping."""
        return time.monotonic() >= self.started + settings.seconds_until(self.first,
                                                                          self.closes + 1)


@dataclass
class _Pending:
    """A round whose all-reduce was submitted and is not applied yet.

    Uncompressed, one all-reduce carries the weights and the weighted pseudo-gradient.
    Compressed, the weights travel first; once their sum is in, this member sends its
    pseudo-gradient times its share of it (``mean``), so that what the codec leaves out is
    owed to the next round as a part of the *mean*, whatever the next round's weight.
    """

    weights: Work  # the control values (uncompressed: and the weighted pseudo-gradient)
    buffer: np.ndarray  # the control values, then the fragment's pseudo-gradient
    index: int  # the fragment of the parameters this round carries
    snapshot: np.ndarray  # the fragment as submitted (anchor - snapshot travels)
    samples: int  # the samples in it
    leaving: bool
    inner: Work | None  # the inner optimizer arrays' average (local SGD)
    compressed: bool
    mean: Work | None = None  # compressed: the shares' sum, once sent
    mean_sent: bool = False  # compressed: sent (or not needed: no member made a step)

    def done(self) -> bool:
        return self.weights.done() and (self.inner is None or self.inner.done()) and \
            (not self.compressed or (self.mean_sent and (self.mean is None
                                                         or self.mean.done())))


class Rounds:
    """The round state of one member (module docstring): anchor, outer optimizer, progress.

    Args:
        node: this process's node.
        params: the model's flat parameters (stepped by ``inner``).
        inner: the inner optimizer, on ``params``.
        settings: the rounds' settings.
        timeout: seconds per collective (default: the node's).

    Raises:
        ConfigError: a codec the parameters' dtype cannot use.
    """

    def __init__(self, node: Node, params: np.ndarray, inner: Optimizer, settings: DiLoCo,
                 timeout: float | None = None):
        self.node = node
        self.params = params
        self.inner = inner
        self.settings = settings
        self.timeout = timeout
        self.anchor = params.copy()
        """The shared model: where every member's round starts."""
        self.outer = SGD(self.anchor, lr=settings.outer_lr, momentum=settings.momentum,
                         nesterov=settings.nesterov)
        self.rounds_done = 0
        """Completed rounds: equal on every member once they all applied the same round."""
        self.samples_total = 0
        """Samples in all completed rounds, every member's together (with fragments: in the
        rounds of the first fragment, which hold every step once)."""
        # the parts of the parameters synced in turn (one: the whole), their unsent samples
        self.fragments = Fragments(self.outer, settings.fragments, settings.compression)
        self.inner_steps = 0  # steps in this member's round so far
        self.clock = _RoundClock(time.monotonic())
        self._nonfinite = 0  # inner steps skipped in a row
        self.reform_agreed = False
        """Whether the last applied round carried a request to re-form (on every member)."""
        self.leave_announced = False
        """Whether an applied round told the others that this member leaves."""
        self.leaving = False
        """Set to ask the others, through the next round, to re-form without this node."""
        self._buffer = np.empty(ROUND_CONTROL + params.size, dtype=params.dtype)
        self._pending: _Pending | None = None
        self._own_weight = 0.0  # this member's weight in the pending round

    def begin(self) -> None:
        """A new ring's start: rank 0's parameters, now every member's, are the anchor."""
        self.anchor[...] = self.params
        self.clock = _RoundClock(time.monotonic())

    @property
    def unapplied(self) -> int:
        """Samples of this member's steps that no applied round holds yet (with fragments: in
        the fragment that waited longest)."""
        return int(self.fragments.samples.max()) + \
            (0 if self._pending is None else self._pending.samples)

    def round_due(self) -> bool:
        """Whether this member's round is over (its steps, or its time budget)."""
        if self.settings.round_seconds is not None:
            # every member closes round k at the same time on its own clock, started at the
            # same collective, so their all-reduces start within a step of one another (the
            # ring's progress deadline would evict a member that arrived rounds late)
            return self.inner_steps > 0 and self.clock.due(self.settings)
        return self.inner_steps >= self.settings.inner_steps // len(self.fragments.parts)

    def inner_step(self, grads: np.ndarray, samples: int, loss: float, step: int,
                   max_nonfinite: int) -> bool:
        """This member's own optimizer step on ``grads``; counts it into the round. A
        non-finite gradient is skipped here alone. Returns whether the step was applied.

        Raises:
            NonFiniteGradientError: ``max_nonfinite`` skipped steps in a row.
        """
        applied = samples > 0 and math.isfinite(loss) and bool(np.isfinite(grads).all())
        if applied:
            self.inner.step(grads)
            self._nonfinite = 0
        elif samples:
            self._nonfinite += 1
            log.warning("rank %d: non-finite gradient at step %d, skipped locally",
                        self.node.rank, step)
            if self._nonfinite >= max_nonfinite:
                raise NonFiniteGradientError(
                    f"rank {self.node.rank}: gradients were not finite for {self._nonfinite} "
                    f"local steps in a row, up to step {step} (generation "
                    f"{self.node.generation})", step=step, generation=self.node.generation)
        self.fragments.samples += samples  # every part moved
        self.inner_steps += 1
        return applied

    def advance(self) -> bool:
        """After an inner step: apply a round whose all-reduce arrived, close this member's
        round when it is due. Returns whether a round was applied.

        Raises:
            PeerFailedError: a member failed during the round's all-reduce (the round stays
                pending, so :meth:`adopt` after the re-form keeps every step in it).
            NonFiniteGradientError: the mean pseudo-gradient is not finite.
        """
        applied = False
        if self._pending is not None:
            self._send_share(wait=False)
        if self._pending is not None and self._pending.done():
            self._complete()
            if self.settings.asynchronous:
                return True  # the caller decides whether to stop before the next round
            applied = True
        if not self.round_due():
            return applied
        if self._pending is not None:
            if self.settings.asynchronous:
                return False  # keep stepping until the last round is in: never wait
            self._complete()
            applied = True
        # lockstep rounds close after the same steps on every member, overlapped or not
        self._submit()
        if not self.settings.overlapped:
            self._complete()
            applied = True
        return applied

    def finish(self) -> None:
        """End of training: apply the round in flight, then one last round with the steps
        made since (every member calls this after the same applied round)."""
        if self._pending is not None:
            self._complete()
        owed = len(self.fragments.parts) > 1 or self.inner_steps or \
            self.fragments.samples[0] or self.settings.asynchronous  # steps not in a round
        for _ in self.fragments.parts if owed else ():  # each part: one last round
            self._submit()
            self._complete()

    def _submit(self) -> None:
        """Start this round's all-reduce: weight, re-form flag and the pseudo-gradient
        ``anchor - params`` (uncompressed: times the weight, in the same all-reduce;
        compressed: its share of the mean follows once the weights are in)."""
        fragments = self.fragments
        index = self.rounds_done % len(fragments.parts)  # the same on every member: lockstep
        part = fragments.parts[index]
        weight = float(fragments.samples[index])
        buffer = self._buffer[:ROUND_CONTROL + part.stop - part.start]
        control, delta = buffer[:ROUND_CONTROL], buffer[ROUND_CONTROL:]
        np.subtract(self.anchor[part], self.params[part], out=delta)
        if not np.isfinite(delta).all():
            log.warning("rank %d: parameters not finite after %d inner steps; this member's "
                        "round is dropped and it restarts from the anchor", self.node.rank,
                        self.inner_steps)
            self.params[part] = self.anchor[part]
            delta[...] = 0
            weight = 0.0
        leaving = self.leaving  # read once: a signal may set it meanwhile
        control[:] = (weight, 1 if (leaving or self.node.reform_due) else 0)
        compressed = fragments.codecs[index] is not None
        if compressed:
            weights = self.node.all_reduce_async(control, op="sum", timeout=self.timeout,
                                                 out=control)
        else:
            if weight != 1.0:
                delta *= weight
            weights = self.node.all_reduce_async(buffer, op="sum", timeout=self.timeout,
                                                 out=buffer)
        inner = None
        if self.settings.average_inner_state:
            state = self.inner.state_dict()
            arrays = [state[name] for name in array_names(state)]
            if arrays:  # a weight of 0 everywhere leaves them as they are (see _complete)
                inner = self.node.all_reduce_many_async(
                    [a * weight for a in arrays], op="sum", timeout=self.timeout)
        self._pending = _Pending(weights, buffer, index, self.params[part].copy(),
                                 int(fragments.samples[index]), leaving, inner, compressed)
        self._own_weight = weight
        fragments.samples[index] = 0
        self.inner_steps = 0
        self.clock.closes += 1

    def _send_share(self, wait: bool) -> None:
        """Compressed rounds: once the weights' sum is in (``wait``: wait for it), send this
        member's pseudo-gradient times its share of the sum, ``weight / total``: the
        all-reduce then adds up to the mean. Nothing is sent when no member made a step."""
        pending = self._pending
        assert pending is not None
        if not pending.compressed or pending.mean_sent:
            return
        if not wait and not pending.weights.done():
            return
        pending.weights.wait()  # a PeerFailedError leaves the round pending
        total = float(pending.buffer[0])
        pending.mean_sent = True
        if total > 0:
            delta = pending.buffer[ROUND_CONTROL:]
            delta *= self._own_weight / total
            pending.mean = self.node.all_reduce_async(
                delta, op="sum", timeout=self.timeout,
                compression=self.fragments.codecs[pending.index], out=delta)

    def _complete(self) -> None:
        """Wait for the pending round, step the anchor, keep the steps made since."""
        pending = self._pending
        assert pending is not None
        pending.weights.wait()  # a PeerFailedError leaves the round pending
        self._send_share(wait=True)
        if pending.mean is not None:
            pending.mean.wait()
        inner = None if pending.inner is None else pending.inner.wait()
        self._pending = None
        control, delta = pending.buffer[:ROUND_CONTROL], pending.buffer[ROUND_CONTROL:]
        total = float(control[0])
        self.reform_agreed = bool(control[1] != 0)
        self.leave_announced = pending.leaving
        if total > 0:
            if not pending.compressed:
                np.divide(delta, total, out=delta)
            if not np.isfinite(delta).all():
                raise NonFiniteGradientError(
                    f"the mean pseudo-gradient of round {self.rounds_done + 1} is not finite "
                    f"(generation {self.node.generation}); lower the learning rates",
                    step=self.rounds_done + 1, generation=self.node.generation)
            self.fragments.outer_step(pending.index, delta)
            if inner is not None:
                state = self.inner.state_dict()
                state.update({name: summed / total for name, summed in
                              zip(array_names(state), inner, strict=True)})
                self.inner.load_state_dict(state)
        self._keep_drift(pending)
        if pending.index == 0:
            self.samples_total += int(round(total))
        self.rounds_done += 1

    def _keep_drift(self, pending: _Pending) -> None:
        """Keep the steps made since submitting ``pending``: params = anchor + drift."""
        part = self.fragments.parts[pending.index]
        drift = np.subtract(self.params[part], pending.snapshot, out=pending.snapshot)
        np.add(self.anchor[part], drift, out=self.params[part])

    # elastic recovery and checkpoints ---------------------------------------------------------

    def adopt(self, root: int, joined: bool) -> None:
        """After a re-form (a collective): take the ``root`` member's anchor, outer state and
        round count, keeping every inner step of this member that is not in them.

        * ``joined`` (a joiner, or a resume from a checkpoint): start from the anchor, with
          the root's inner optimizer state.
        * The root completed a round this member had submitted (its all-reduce failed here):
          that round holds this member's contribution, so only the steps made since
          submitting stay: ``params = anchor + (params - submitted)``.
        * Same round count: nothing of this member's landed; the pending round's samples
          go back into the next round, and ``anchor - params`` still holds every step.
        """
        inner_state = self.inner.state_dict()
        names = array_names(inner_state)
        scalars = sorted(name for name in inner_state if name not in names)
        size = self.anchor.size
        flat = np.concatenate([self.anchor, self.outer.velocity,
                               *(np.ravel(inner_state[name]) for name in names)])
        flat = self.node.broadcast(flat, root, timeout=self.timeout)
        numbers = np.array([self.rounds_done, self.samples_total,
                            *(float(inner_state[name]) for name in scalars)], np.float64)
        numbers = self.node.broadcast(numbers, root, timeout=self.timeout)
        behind = int(numbers[0]) > self.rounds_done
        self.clock = _RoundClock(time.monotonic(), int(numbers[0]))  # again, on every member
        pending, self._pending = self._pending, None
        self.anchor[...] = flat[:size]
        self.outer.velocity[...] = flat[size:2 * size]
        self.rounds_done, self.samples_total = int(numbers[0]), int(numbers[1])
        self.fragments.clear_residuals()
        if joined:
            self.params[...] = self.anchor
            self.inner.load_state_dict(_root_inner_state(inner_state, names, scalars,
                                                         flat[2 * size:], numbers[2:]))
            self.fragments.samples[:] = 0
            self.inner_steps = 0
        elif behind and pending is not None:
            self._keep_drift(pending)
        elif pending is not None:
            self.fragments.samples[pending.index] += pending.samples
        kept = "" if joined else f", {self.unapplied} samples of own steps kept for the next round"
        log.info("rank %d: round state of rank %d adopted: %d rounds done%s", self.node.rank,
                 root, self.rounds_done, kept)

    def outer_state(self) -> dict[str, np.ndarray | int | float]:
        """The shared round state: the outer optimizer's state and the round count."""
        return {**self.outer.state_dict(), "rounds": self.rounds_done,
                "samples": self.samples_total}

    def load_outer(self, anchor: np.ndarray, state: Mapping[str, np.ndarray | int | float]
                   ) -> None:
        """Restore :meth:`outer_state` and the anchor (from a checkpoint).

        Raises:
            ConfigError: the state lacks the round count or the outer optimizer's keys.
        """
        state = dict(state)
        try:
            rounds, samples = int(state.pop("rounds")), int(state.pop("samples"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"the checkpoint's round state is incomplete: {exc}") from exc
        self.outer.load_state_dict(state)
        self.anchor[...] = anchor
        self.rounds_done, self.samples_total = rounds, samples
