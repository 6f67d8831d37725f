"""Learning-rate schedules for :class:`~.trainer.Trainer`.

A schedule maps the run's progress (0 at the start of :meth:`~.trainer.Trainer.fit`, 1 at
its end) to the factor the optimizer's learning rate is multiplied by before each step. The
trainer computes the progress from what every member agrees on (the data position, or with
asynchronous rounds the samples of the completed rounds), so members that step together
step with the same learning rate. With rounds the schedule drives the inner optimizer.

Why decay at all: with a constant learning rate the model keeps moving around the optimum
to the last step, so the final model is wherever the last steps left it (on the bundled
digits the test accuracy of one run moves by ±1 point from round to round). Decaying the
rate to (nearly) zero lets the last steps settle, which is what the DiLoCo paper's inner
optimizer does (cosine decay).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Cosine:
    """Cosine decay from the optimizer's learning rate down to ``floor`` times it:
    ``floor + (1 - floor) * (1 + cos(pi * progress)) / 2``.

    Attributes:
        floor: the factor reached at the end of the run, in [0, 1).
    """

    floor: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.floor, (int, float)) and 0.0 <= self.floor < 1.0):
            raise ConfigError(f"Cosine floor must be in [0, 1), got {self.floor!r}")

    def factor(self, progress: float) -> float:
        """The learning-rate factor at ``progress`` (clamped to [0, 1]); above zero for
        every progress below 1, which is all a step ever sees."""
        progress = min(max(progress, 0.0), 1.0)
        return self.floor + (1.0 - self.floor) * (1.0 + math.cos(math.pi * progress)) / 2.0
