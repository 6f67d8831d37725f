"""Data sets that ship inside the package, so a demo trains on real data with no download.

:func:`load_digits` reads the UCI "Optical Recognition of Handwritten Digits" 8x8 set
(1797 images, 64 features, 10 classes; Alpaydin & Kaynak, CC BY 4.0, see
``ringtrain/train/data/DIGITS-LICENSE.txt``) from ``ringtrain/train/data/digits.npz``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import numpy as np

from ringtrain.errors import ConfigError

__all__ = ["Dataset", "load_digits"]

_DIGITS_FILE = "digits.npz"
_DIGITS_MAX_PIXEL = 16.0


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled classification data set held in memory; the arrays are read-only.

    Attributes:
        x: features, float32, shape (n, features).
        y: labels, int64, shape (n,).
        classes: the label values, ascending (for digits: 0..9).

    Raises:
        ConfigError: shapes disagree or a label is not one of ``classes``.
    """

    x: np.ndarray
    y: np.ndarray
    classes: tuple[int, ...]

    def __post_init__(self) -> None:
        x = np.array(self.x, dtype=np.float32)
        y = np.array(self.y, dtype=np.int64)
        if x.ndim != 2 or y.shape != (x.shape[0],):
            raise ConfigError(
                f"Dataset needs x of shape (n, features) and y of shape (n,), got "
                f"{x.shape} and {y.shape}"
            )
        classes = tuple(int(c) for c in self.classes)
        if y.size and not np.isin(y, classes).all():
            raise ConfigError(f"Dataset labels outside classes {classes}")
        x.setflags(write=False)
        y.setflags(write=False)
        # A frozen dataclass normalises its own fields through object.__setattr__.
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "classes", classes)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def split(self, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
        """Split into (train, test) by a permutation drawn from ``seed``.

        The same seed gives the same split on every machine. The test part holds
        ``round(len(self) * test_fraction)`` samples.

        Raises:
            ConfigError: the fraction is not in (0, 1), either part would be empty, or the
                seed is not a non-negative integer.
        """
        if not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
            raise ConfigError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        test_size = round(len(self) * test_fraction)
        if test_size == 0 or test_size == len(self):
            raise ConfigError(
                f"test_fraction {test_fraction} of {len(self)} samples leaves an empty part"
            )
        order = np.random.default_rng(int(seed)).permutation(len(self))
        test_rows, train_rows = order[:test_size], order[test_size:]
        return (Dataset(self.x[train_rows], self.y[train_rows], self.classes),
                Dataset(self.x[test_rows], self.y[test_rows], self.classes))


def load_digits() -> Dataset:
    """Load the 8x8 handwritten digits: 1797 samples, 64 features in [0, 1], classes 0..9.

    Pixels (0..16 in the file) are divided by 16.
    """
    source = resources.files("ringtrain.train") / "data" / _DIGITS_FILE
    with source.open("rb") as handle, np.load(handle, allow_pickle=False) as archive:
        pixels = archive["pixels"]
        labels = archive["labels"]
    x = pixels.astype(np.float32) / np.float32(_DIGITS_MAX_PIXEL)
    return Dataset(x, labels.astype(np.int64), tuple(range(10)))
