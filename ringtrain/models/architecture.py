"""A model's architecture as text, and the model built back from it.

A :class:`~ringtrain.train.nn.Sequential` is described by its layers' ``describe()`` texts
(``Dense(64, 32)``, ``ReLU()``, ``Tanh()``) and its dtype. :func:`build` parses that text
with a fixed grammar (a known layer name and integer arguments): a file can name a model,
never run code.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..train.nn import Dense, Layer, ReLU, Sequential, Tanh

__all__ = ["build", "describe"]

_LAYER = re.compile(r"([A-Za-z]+)\(([0-9, ]*)\)")
_BUILDERS: dict[str, tuple[int, Callable[..., Layer]]] = {
    "Dense": (2, Dense), "ReLU": (0, ReLU), "Tanh": (0, Tanh)}  # name -> (arguments, class)
MAX_LAYERS = 4096
MAX_WIDTH = 1 << 24  # a Dense side larger than this is a damaged file, not a model


def describe(model: Sequential) -> dict[str, Any]:
    """``{"layers": [...], "dtype": "float32"}``: what :func:`build` needs."""
    return {"layers": [layer.describe() for layer in model.layers], "dtype": model.dtype.name}


def build(layers: Sequence[object], dtype: object = "float32") -> Sequential:
    """The model ``layers`` describe (parameters zero-initialised from seed 0).

    Raises:
        ConfigError: not a list of known layer texts, or an unknown dtype; the message
            names the layer at fault.
    """
    if not isinstance(layers, (list, tuple)) or not layers or len(layers) > MAX_LAYERS:
        raise ConfigError(f"an architecture is a list of 1-{MAX_LAYERS} layer texts, got "
                          f"{str(layers)[:80]!r}")
    built = []
    for index, text in enumerate(layers):
        match = _LAYER.fullmatch(text) if isinstance(text, str) else None
        known = _BUILDERS.get(match.group(1)) if match else None
        arguments = [a.strip() for a in match.group(2).split(",") if a.strip()] if match else []
        if known is None or len(arguments) != known[0] or not all(
                a.isdigit() and 0 < int(a) <= MAX_WIDTH for a in arguments):
            raise ConfigError(f"layer {index} of the architecture, {str(text)[:80]!r}, is not "
                              f"one of {', '.join(n + '(...)' for n in _BUILDERS)} with "
                              f"positive integer sizes")
        built.append(known[1](*(int(a) for a in arguments)))
    if dtype not in ("float32", "float64"):
        raise ConfigError(f"model dtype must be float32 or float64, got {dtype!r}")
    _check_widths(built)
    return Sequential(*built, seed=0, dtype=np.dtype(str(dtype)))


def _check_widths(layers: list[Layer]) -> None:
    """Consecutive Dense layers must fit: the outputs of one are the inputs of the next."""
    width = None
    for index, layer in enumerate(layers):
        if isinstance(layer, Dense):
            if width is not None and layer.in_features != width:
                raise ConfigError(f"layer {index}, {layer.describe()}, takes {layer.in_features}"
                                  f" inputs but the layer before gives {width}")
            width = layer.out_features
