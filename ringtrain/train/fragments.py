"""The fragments of a model that rounds sync in turn (Streaming DiLoCo; one fragment: the
whole model, plain DiLoCo). See :mod:`ringtrain.train.rounds`."""

from __future__ import annotations

import numpy as np

from ..ring.compression import Codec, check_supported, get_codec
from .optim import SGD


def split(size: int, count: int) -> list[slice]:
    """``count`` contiguous slices of nearly equal length covering ``size`` elements."""
    bounds = [size * i // count for i in range(count + 1)]
    return [slice(start, stop) for start, stop in zip(bounds, bounds[1:], strict=False)]


class Fragments:
    """The parts of the parameters (``parts``), each with its own codec (so error feedback is
    never mixed between parts of equal size: residuals are keyed by shape), its outer step
    (over views of the outer optimizer's velocity: one state for checkpoints and joiners)
    and its samples not submitted yet (``samples``, one counter per part).

    Args:
        outer: the outer optimizer over the whole anchor.
        count: how many parts.
        compression: the codec spec of the rounds' all-reduces (or None).

    Raises:
        ConfigError: a codec the parameters' dtype cannot use.
    """

    def __init__(self, outer: SGD, count: int, compression: str | None):
        self.outer = outer
        self.parts = split(outer.params.size, count)
        self.codecs: list[Codec | None] = [get_codec(compression) for _ in self.parts]
        if self.codecs[0] is not None:
            check_supported(self.codecs[0], outer.params.dtype, "sum")
        self._steps = [outer] if count == 1 else [_part_of(outer, part) for part in self.parts]
        self.samples = np.zeros(count, dtype=np.int64)

    def outer_step(self, index: int, delta: np.ndarray) -> None:
        """The outer optimizer's step on part ``index`` of the anchor (with the whole's
        hyperparameters, which a checkpoint may have loaded)."""
        step = self._steps[index]
        if step is not self.outer:
            step.lr, step.momentum, step.nesterov = \
                self.outer.lr, self.outer.momentum, self.outer.nesterov
        step.step(delta)

    def clear_residuals(self) -> None:
        """Forget every codec's error feedback (it belongs to an attempt that may not have
        landed)."""
        for codec in self.codecs:
            if codec is not None:
                codec.residuals.clear()


def _part_of(outer: SGD, part: slice) -> SGD:
    """An SGD stepping ``part`` of ``outer``'s parameters, with that part of its velocity."""
    fragment = SGD(outer.params[part], lr=outer.lr, momentum=outer.momentum,
                   nesterov=outer.nesterov)
    fragment.velocity = outer.velocity[part]
    return fragment
