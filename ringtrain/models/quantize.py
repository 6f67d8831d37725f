"""int8 weights with one float32 scale per output channel (symmetric, round to nearest).

For a Dense weight of shape (in_features, out_features) each output column j gets
``scale[j] = max |W[:, j]| / 127`` and ``q[:, j] = round(W[:, j] / scale[j])`` in
[-127, 127]; ``q * scale`` restores it within half a step per element. A column's own scale
keeps a column of small weights from losing its precision to a column of large ones.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

__all__ = ["QMAX", "dequantize", "quantize"]

QMAX = 127  # symmetric: -127..127, so -q is always representable


def quantize(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weights, float32 scales of shape (out_features,)) of a 2-D weight.

    A column of zeros gets scale 1 (its values are exact either way).

    Raises:
        ConfigError: not a 2-D array of finite floats.
    """
    weight = np.asarray(weight)
    if weight.ndim != 2 or weight.dtype.kind != "f" or not np.isfinite(weight).all():
        raise ConfigError(f"int8 quantisation needs a finite 2-D float weight, got shape "
                          f"{weight.shape} dtype {weight.dtype}")
    largest = np.abs(weight).max(axis=0)
    scale = np.where(largest > 0, largest / QMAX, 1.0).astype(np.float32)
    q = np.rint(weight / scale.astype(weight.dtype))
    return np.clip(q, -QMAX, QMAX).astype(np.int8), scale


def dequantize(q: np.ndarray, scale: np.ndarray, dtype: object = np.float32) -> np.ndarray:
    """``q * scale`` per output column, in ``dtype``.

    Raises:
        ConfigError: shapes that do not fit (one scale per column of q).
    """
    if q.ndim != 2 or q.dtype != np.int8 or scale.shape != (q.shape[1],):
        raise ConfigError(f"int8 weight of shape {q.shape} ({q.dtype}) and scales of shape "
                          f"{scale.shape} do not fit: one scale per output column")
    return q.astype(dtype) * scale.astype(dtype)
