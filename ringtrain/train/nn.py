"""A small numpy neural-network stack whose parameters live in one flat buffer.

Every parameter of a :class:`Sequential` model is a view into one contiguous 1-D array,
``model.params``; every gradient is a view into a second array of the same size,
``model.grads``. A whole step's gradient is therefore one buffer, reduced by one fused
all-reduce, and an optimizer steps the whole model with a few vectorised operations.

Losses are means over the local batch. To combine the gradients of members whose batches
differ in size into the gradient of the union batch, weight each member's gradient by its
sample count: ``sum(n_i * grad_i) / sum(n_i)``.

Example::

    model = Sequential(Dense(64, 32), ReLU(), Dense(32, 10), seed=0)
    logits = model.forward(x)
    loss, dlogits = softmax_cross_entropy(logits, y)
    model.backward(dlogits)      # model.grads now holds d(loss)/d(params)
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ringtrain.errors import ConfigError

__all__ = [
    "Layer",
    "Dense",
    "ReLU",
    "Tanh",
    "Sequential",
    "softmax_cross_entropy",
    "mse_loss",
    "accuracy",
]


class Layer:
    """A differentiable step of a :class:`Sequential` model.

    A layer declares its parameters with :meth:`parameter_shapes`; the model then hands it
    views into the flat buffers through :meth:`bind`. Layers without parameters only
    implement :meth:`forward` and :meth:`backward`.
    """

    def parameter_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Return (name, shape) of each parameter, in the order they sit in the buffer."""
        return []

    def bind(self, params: list[np.ndarray], grads: list[np.ndarray]) -> None:
        """Receive views of this layer's parameters and gradients, in declared order."""

    def initialize(self, rng: np.random.Generator) -> None:
        """Write initial values into the bound parameters, drawing from ``rng``."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Compute the layer's output and keep what :meth:`backward` needs."""
        raise NotImplementedError

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """Write parameter gradients (overwriting) and return the gradient w.r.t. the input."""
        raise NotImplementedError

    def param_backward(self, grad_out: np.ndarray,
                       on_ready: Callable[[int], None] | None = None) -> None:
        """Write parameter gradients only (the model's first layer: nobody needs the
        gradient w.r.t. the input). Override to skip computing that gradient; an override
        may call ``on_ready(offset)`` at each of :meth:`ready_offsets`, once this layer's
        gradients from ``offset`` (counted from its first parameter) on are final."""
        self.backward(grad_out)

    def ready_offsets(self) -> list[int]:
        """Where :meth:`param_backward` reports part of the gradients final early (none)."""
        return []

    def describe(self) -> str:
        """Return a short text naming the layer and its hyperparameters (part of the schema)."""
        return f"{type(self).__name__}()"


WEIGHT_BLOCKS = 4  # Dense.param_backward reports its weight gradient done in this many parts


class Dense(Layer):
    """Affine layer ``y = x @ weight + bias`` with weight of shape (in_features, out_features).

    Weights start Glorot-uniform, biases at zero.
    """

    def __init__(self, in_features: int, out_features: int):
        if not _is_positive_int(in_features) or not _is_positive_int(out_features):
            raise ConfigError(
                f"Dense needs positive integer sizes, got in_features={in_features!r}, "
                f"out_features={out_features!r}"
            )
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.weight: np.ndarray | None = None
        self.bias: np.ndarray | None = None
        self.grad_weight: np.ndarray | None = None
        self.grad_bias: np.ndarray | None = None
        self._input: np.ndarray | None = None

    def parameter_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        return [("weight", (self.in_features, self.out_features)), ("bias", (self.out_features,))]

    def bind(self, params: list[np.ndarray], grads: list[np.ndarray]) -> None:
        self.weight, self.bias = params
        self.grad_weight, self.grad_bias = grads

    def initialize(self, rng: np.random.Generator) -> None:
        weight, bias = self._bound()[:2]
        limit = math.sqrt(6.0 / (self.in_features + self.out_features))
        # Drawn in float64 and rounded once: PCG64 and IEEE rounding are the same on every
        # platform, so every machine starts from bit-identical parameters.
        weight[...] = rng.uniform(-limit, limit, size=weight.shape)
        bias[...] = 0.0

    def forward(self, x: np.ndarray) -> np.ndarray:
        weight, bias = self._bound()[:2]
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ConfigError(
                f"Dense({self.in_features}, {self.out_features}) expects input of shape "
                f"(batch, {self.in_features}), got {x.shape}"
            )
        self._input = x
        out = x @ weight
        out += bias
        return out

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        self.param_backward(grad_out)
        return grad_out @ self._bound()[0].T

    def param_backward(self, grad_out: np.ndarray,
                       on_ready: Callable[[int], None] | None = None) -> None:
        """The bias first, then the weight in row blocks from the last (the end of this
        layer's gradients) to the first, each reported to ``on_ready`` as it is done. Always
        in blocks, so the bits do not depend on whether anyone listens."""
        _, _, grad_weight, grad_bias = self._bound()
        if self._input is None:
            raise ConfigError("Dense.backward called before forward")
        np.sum(grad_out, axis=0, out=grad_bias)
        rows = [0, *self._block_rows(), self.in_features]
        for lo, hi in reversed(list(zip(rows[:-1], rows[1:], strict=True))):
            np.matmul(self._input[:, lo:hi].T, grad_out, out=grad_weight[lo:hi])
            if lo > 0 and on_ready is not None:
                on_ready(lo * self.out_features)

    def ready_offsets(self) -> list[int]:
        return [row * self.out_features for row in self._block_rows()]

    def _block_rows(self) -> list[int]:
        """First rows of the weight's row blocks after the first (``WEIGHT_BLOCKS`` blocks,
        fewer for a narrow input)."""
        blocks = min(WEIGHT_BLOCKS, self.in_features)
        return sorted({self.in_features * k // blocks for k in range(1, blocks)})

    def describe(self) -> str:
        return f"Dense({self.in_features}, {self.out_features})"

    def _bound(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if (self.weight is None or self.bias is None or self.grad_weight is None
                or self.grad_bias is None):
            raise ConfigError("Dense layer is not part of a Sequential model yet")
        return self.weight, self.bias, self.grad_weight, self.grad_bias


class ReLU(Layer):
    """Elementwise ``max(x, 0)``."""

    def __init__(self) -> None:
        self._positive: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._positive = x > 0
        return np.where(self._positive, x, x.dtype.type(0))

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        if self._positive is None:
            raise ConfigError("ReLU.backward called before forward")
        return np.where(self._positive, grad_out, grad_out.dtype.type(0))


class Tanh(Layer):
    """Elementwise hyperbolic tangent."""

    def __init__(self) -> None:
        self._output: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._output = np.tanh(x)
        return self._output

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        if self._output is None:
            raise ConfigError("Tanh.backward called before forward")
        return grad_out * (1 - self._output * self._output)


class Sequential:
    """Layers applied in order, all parameters in one flat buffer.

    Attributes:
        params: 1-D contiguous array holding every parameter, in :meth:`parameter_layout`
            order. Layers hold views into it: write into it in place (``params[...] = v``),
            never rebind it.
        grads: 1-D array of the same size and dtype; :meth:`backward` overwrites it.
        layers: the layers, in order.
        dtype: the parameter dtype (float32 unless asked otherwise).

    Args:
        *layers: the layers.
        seed: integer seed of the initial parameters; the same seed gives bit-identical
            parameters on every machine.
        dtype: float32 (the default, what travels on the wire) or float64 (for checks).

    Raises:
        ConfigError: no layers, a non-layer, a negative or non-integer seed, or another dtype.
    """

    def __init__(self, *layers: Layer, seed: int = 0, dtype: Any = np.float32):
        if not layers:
            raise ConfigError("Sequential needs at least one layer")
        for index, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise ConfigError(f"layer {index} is a {type(layer).__name__}, not a Layer")
        if len({id(layer) for layer in layers}) != len(layers):
            raise ConfigError("the same layer object appears twice in Sequential")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ConfigError(f"Sequential dtype must be float32 or float64, got {self.dtype}")
        self.layers: tuple[Layer, ...] = tuple(layers)
        self._layout = [
            (f"{index}.{name}", tuple(int(d) for d in shape))
            for index, layer in enumerate(self.layers)
            for name, shape in layer.parameter_shapes()
        ]
        total = sum(math.prod(shape) for _, shape in self._layout)
        self.params = np.zeros(total, dtype=self.dtype)
        self.grads = np.zeros(total, dtype=self.dtype)
        offset = 0
        self._starts: list[int] = []  # where each layer's parameters begin in the buffers
        self._param_layers = {index for index, layer in enumerate(self.layers)
                              if layer.parameter_shapes()}
        for layer in self.layers:
            self._starts.append(offset)
            param_views, grad_views = [], []
            for _, shape in layer.parameter_shapes():
                size = math.prod(shape)
                param_views.append(self.params[offset:offset + size].reshape(shape))
                grad_views.append(self.grads[offset:offset + size].reshape(shape))
                offset += size
            layer.bind(param_views, grad_views)
        self.initialize(seed)

    @property
    def num_params(self) -> int:
        """Number of scalar parameters (the length of ``params``)."""
        return int(self.params.size)

    def initialize(self, seed: int) -> None:
        """Reset every parameter from ``seed``, layer by layer in buffer order.

        Raises:
            ConfigError: the seed is not a non-negative integer.
        """
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        rng = np.random.default_rng(int(seed))
        for layer in self.layers:
            layer.initialize(rng)
        self.grads[...] = 0

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Run the layers on a batch ``x`` of shape (batch, features); returns the output.

        The input is converted to the model's dtype first.
        """
        out = np.asarray(x, dtype=self.dtype)
        for layer in self.layers:
            out = layer.forward(out)
        return out

    def backward(self, grad_out: np.ndarray,
                 on_ready: Callable[[int], None] | None = None,
                 input_grad: bool = True) -> np.ndarray | None:
        """Back-propagate ``grad_out`` (d loss / d output of the last forward).

        Overwrites ``grads`` with d loss / d params; nothing accumulates across calls.

        Args:
            grad_out: d loss / d output.
            on_ready: called as ``on_ready(start)`` after each layer with parameters, once
                ``grads[start:]`` holds final values (the layers' gradients are laid out in
                order, so backward finishes the buffer from its end): a caller can send them
                while the earlier layers still compute.
            input_grad: False: stop at the first layer with parameters, computing only its
                parameter gradients (``Layer.param_backward``): training needs no d loss /
                d input, which for a first Dense layer costs as much as its weights'.

        Returns:
            d loss / d input, or None when ``input_grad`` is False.
        """
        grad = np.asarray(grad_out, dtype=self.dtype)
        # without input_grad, backward ends at the first layer with parameters
        last = 0 if input_grad else min(self._param_layers, default=len(self.layers))
        for index in range(len(self.layers) - 1, last - 1, -1):
            layer = self.layers[index]
            if index == last and not input_grad:
                if on_ready is None:
                    layer.param_backward(grad)
                else:
                    layer.param_backward(grad, functools.partial(
                        _report_from, on_ready, self._starts[index]))
            else:
                grad = layer.backward(grad)
            if on_ready is not None and index in self._param_layers:
                on_ready(self._starts[index])
        return grad if input_grad else None

    @property
    def ready_points(self) -> list[int]:
        """Where :meth:`backward` with ``input_grad=False`` reports ``grads`` final from on,
        ascending: where each layer with parameters begins, and the points inside the first
        of them that its ``param_backward`` reports."""
        if not self._param_layers:
            return []
        first = min(self._param_layers)
        inside = [self._starts[first] + offset
                  for offset in self.layers[first].ready_offsets()]
        return sorted({*(self._starts[index] for index in self._param_layers), *inside})

    def load_params(self, values: np.ndarray) -> None:
        """Copy ``values`` into ``params`` in place (the layers' views stay valid).

        Raises:
            ConfigError: ``values`` does not have ``num_params`` elements.
        """
        values = np.asarray(values)
        if values.shape != self.params.shape:
            raise ConfigError(
                f"parameters of shape {values.shape} do not fit a model with "
                f"{self.num_params} parameters"
            )
        self.params[...] = values

    def parameter_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """Return (name, shape) of every parameter in buffer order, e.g. ('0.weight', (64, 32))."""
        return list(self._layout)

    def schema_hash(self) -> str:
        """Return the hex SHA-256 of the model's architecture, dtype and parameter layout.

        Two models with the same hash can exchange ``params`` and ``grads`` buffers; nodes
        compare it to refuse a peer training a different model.
        """
        schema = {
            "dtype": self.dtype.str,
            "layers": [layer.describe() for layer in self.layers],
            "params": [[name, list(shape)] for name, shape in self._layout],
        }
        text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        inner = ", ".join(layer.describe() for layer in self.layers)
        return f"Sequential({inner}; {self.num_params} params, {self.dtype})"


def _report_from(on_ready: Callable[[int], None], start: int, offset: int) -> None:
    """A layer's ``on_ready(offset)`` as the model's: offsets count from its ``start``."""
    on_ready(start + offset)


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of softmax(logits) against integer labels, and its gradient.

    Stable for large logits (log-sum-exp with the row maximum subtracted). The loss is the
    mean over the batch, so the gradient carries a 1/batch factor.

    Args:
        logits: shape (batch, classes), float.
        labels: shape (batch,), integers in [0, classes).

    Returns:
        (loss, d loss / d logits) with the gradient in the logits' dtype.

    Raises:
        ConfigError: shapes disagree, the batch is empty or a label is out of range.
    """
    logits = np.asarray(logits)
    labels = _check_labels(logits, labels)
    batch = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    sum_exp = exp.sum(axis=1, keepdims=True)
    rows = np.arange(batch)
    log_likelihood = shifted[rows, labels] - np.log(sum_exp[:, 0])
    loss = float(-log_likelihood.mean())
    grad = exp / sum_exp
    grad[rows, labels] -= 1
    grad /= batch
    return loss, grad


def mse_loss(pred: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean squared error over all elements (so also a mean over the batch), and its gradient.

    Args:
        pred: shape (batch, outputs).
        target: same shape as ``pred``.

    Returns:
        (loss, d loss / d pred) with the gradient in ``pred``'s dtype.

    Raises:
        ConfigError: shapes differ or the batch is empty.
    """
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ConfigError(f"mse_loss: pred shape {pred.shape} != target shape {target.shape}")
    if pred.size == 0:
        raise ConfigError("mse_loss of an empty batch is undefined")
    diff = pred - target.astype(pred.dtype, copy=False)
    loss = float(np.mean(diff * diff))
    grad = diff * pred.dtype.type(2.0 / pred.size)
    return loss, grad


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose largest logit is at the true label.

    Raises:
        ConfigError: shapes disagree, the batch is empty or a label is out of range.
    """
    logits = np.asarray(logits)
    labels = _check_labels(logits, labels)
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def _check_labels(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if logits.ndim != 2:
        raise ConfigError(f"logits must have shape (batch, classes), got {logits.shape}")
    if labels.shape != (logits.shape[0],):
        raise ConfigError(
            f"labels must have shape ({logits.shape[0]},) to match logits, got {labels.shape}"
        )
    if logits.shape[0] == 0:
        raise ConfigError("a loss over an empty batch is undefined")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ConfigError(
            f"labels must lie in [0, {logits.shape[1]}), got range "
            f"[{labels.min()}, {labels.max()}]"
        )
    return labels


def _is_positive_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and bool(value > 0)
