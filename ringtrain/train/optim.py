"""Optimizers that update one flat parameter buffer in place from one flat gradient buffer.

Each step is a handful of whole-buffer elementwise numpy operations (no reductions, no
per-element Python). Elementwise IEEE arithmetic is correctly rounded, so members that start
from the same parameters and apply the same all-reduced gradient stay bit-identical.

State for checkpoints is a flat ``dict[str, np.ndarray | int | float]``: no pickle needed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ringtrain.errors import ConfigError

__all__ = ["Optimizer", "SGD", "Adam", "OptimizerState"]

OptimizerState = dict[str, np.ndarray | int | float]
"""What ``state_dict`` returns: numbers and arrays only, so a checkpoint needs no pickle."""


class Optimizer:
    """Base of the optimizers: holds the parameter buffer and checks gradients against it.

    Args:
        params: the model's flat parameter buffer (1-D, contiguous, float32 or float64);
            updated in place by :meth:`step`.
        lr: learning rate, a finite number > 0. May be changed between steps (schedules).

    Raises:
        ConfigError: the buffer is not a contiguous 1-D float array, or lr is not > 0.
    """

    def __init__(self, params: np.ndarray, lr: float):
        if not isinstance(params, np.ndarray) or params.ndim != 1:
            raise ConfigError("optimizer params must be a 1-D numpy array (the flat buffer)")
        if params.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ConfigError(f"optimizer params must be float32 or float64, got {params.dtype}")
        if not params.flags.c_contiguous or not params.flags.writeable:
            raise ConfigError("optimizer params must be a contiguous, writeable buffer")
        self.params = params
        self.lr = _check_number("lr", lr, low=0.0, low_inclusive=False)
        self._scratch = np.empty_like(params)

    def step(self, grads: np.ndarray) -> None:
        """Update ``params`` in place from ``grads`` (not modified).

        Raises:
            ConfigError: ``grads`` does not match ``params`` in shape and dtype.
        """
        raise NotImplementedError

    def state_dict(self) -> OptimizerState:
        """Return hyperparameters and state as numbers and array copies."""
        raise NotImplementedError

    def load_state_dict(self, state: Mapping[str, np.ndarray | int | float]) -> None:
        """Restore hyperparameters and state from :meth:`state_dict` output.

        Raises:
            ConfigError: a key is missing or unknown, or an array does not fit ``params``.
        """
        raise NotImplementedError

    def _check_grads(self, grads: np.ndarray) -> None:
        if not isinstance(grads, np.ndarray):
            raise ConfigError(f"grads must be a numpy array, got {type(grads).__name__}")
        if grads.shape != self.params.shape or grads.dtype != self.params.dtype:
            raise ConfigError(
                f"grads {grads.shape} {grads.dtype} do not match params "
                f"{self.params.shape} {self.params.dtype}"
            )

    def _check_state_shape(self, state: Mapping[str, np.ndarray | int | float],
                      expected: set[str]) -> None:
        if set(state) != expected:
            raise ConfigError(
                f"{type(self).__name__} state needs keys {sorted(expected)}, "
                f"got {sorted(state)}"
            )
        for key in expected:
            value = state[key]
            if isinstance(value, np.ndarray) and value.shape != self.params.shape:
                raise ConfigError(
                    f"{type(self).__name__} state {key!r} has shape {value.shape}, "
                    f"params have {self.params.shape}"
                )


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum and L2 weight decay.

    Per step, with ``g`` the gradient: ``g += weight_decay * params``;
    ``velocity = momentum * velocity + g`` (the first step starts from zero velocity);
    ``params -= lr * velocity``, or with Nesterov momentum ``params -= lr * (g + momentum *
    velocity)``. With momentum 0 that is ``params -= lr * g``. The same update rule as
    ``torch.optim.SGD`` without dampening.

    Args:
        params: the flat parameter buffer.
        lr: learning rate (> 0).
        momentum: in [0, 1).
        weight_decay: L2 coefficient, >= 0.
        nesterov: Nesterov momentum (DiLoCo's outer optimizer).
    """

    def __init__(self, params: np.ndarray, lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        super().__init__(params, lr)
        self.momentum = _check_number("momentum", momentum, low=0.0, high=1.0)
        self.weight_decay = _check_number("weight_decay", weight_decay, low=0.0)
        self.nesterov = bool(nesterov)
        self.velocity = np.zeros_like(params)

    def step(self, grads: np.ndarray) -> None:
        self._check_grads(grads)
        direction = grads
        if self.weight_decay:
            np.multiply(self.params, self.weight_decay, out=self._scratch)
            self._scratch += grads
            direction = self._scratch
        if self.momentum:
            self.velocity *= self.momentum
            self.velocity += direction
            if self.nesterov and direction is self._scratch:  # g + momentum * velocity
                self._scratch += self.momentum * self.velocity
            elif self.nesterov:
                np.multiply(self.velocity, self.momentum, out=self._scratch)
                self._scratch += direction
                direction = self._scratch
            else:
                direction = self.velocity
        np.multiply(direction, self.lr, out=self._scratch)
        self.params -= self._scratch

    def state_dict(self) -> OptimizerState:
        return {
            "lr": float(self.lr),
            "momentum": float(self.momentum),
            "weight_decay": float(self.weight_decay),
            "nesterov": int(self.nesterov),
            "velocity": self.velocity.copy(),
        }

    def load_state_dict(self, state: Mapping[str, np.ndarray | int | float]) -> None:
        # "nesterov" came later: a state without it is plain momentum
        state = {"nesterov": 0, **state}
        self._check_state_shape(state, {"lr", "momentum", "weight_decay", "nesterov",
                                        "velocity"})
        lr = _check_number("lr", state["lr"], low=0.0, low_inclusive=False)
        momentum = _check_number("momentum", state["momentum"], low=0.0, high=1.0)
        weight_decay = _check_number("weight_decay", state["weight_decay"], low=0.0)
        velocity = _check_array("velocity", state["velocity"])
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.nesterov = bool(state["nesterov"])
        np.copyto(self.velocity, velocity, casting="same_kind")


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015) with bias correction, the update rule of ``torch.optim.Adam``.

    Per step ``t`` (from 1): ``m = b1*m + (1-b1)*g``; ``v = b2*v + (1-b2)*g*g``;
    ``params -= (lr / (1 - b1**t)) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)``.

    Args:
        params: the flat parameter buffer.
        lr: learning rate (> 0).
        betas: (b1, b2), each in [0, 1).
        eps: added to the denominator, > 0.
    """

    def __init__(self, params: np.ndarray, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ConfigError(f"betas must be a pair of numbers, got {betas!r}")
        self.beta1 = _check_number("betas[0]", betas[0], low=0.0, high=1.0)
        self.beta2 = _check_number("betas[1]", betas[1], low=0.0, high=1.0)
        self.eps = _check_number("eps", eps, low=0.0, low_inclusive=False)
        self.steps = 0
        self.exp_avg = np.zeros_like(params)
        self.exp_avg_sq = np.zeros_like(params)
        self._denominator = np.empty_like(params)

    def step(self, grads: np.ndarray) -> None:
        self._check_grads(grads)
        self.steps += 1
        # Bias corrections in Python floats: the same doubles on every machine.
        bias_correction1 = 1.0 - self.beta1 ** self.steps
        bias_correction2 = 1.0 - self.beta2 ** self.steps
        step_size = self.lr / bias_correction1

        self.exp_avg *= self.beta1
        np.multiply(grads, 1.0 - self.beta1, out=self._scratch)
        self.exp_avg += self._scratch

        self.exp_avg_sq *= self.beta2
        np.multiply(grads, grads, out=self._scratch)
        self._scratch *= 1.0 - self.beta2
        self.exp_avg_sq += self._scratch

        np.sqrt(self.exp_avg_sq, out=self._denominator)
        self._denominator /= math.sqrt(bias_correction2)
        self._denominator += self.eps
        np.divide(self.exp_avg, self._denominator, out=self._scratch)
        self._scratch *= step_size
        self.params -= self._scratch

    def state_dict(self) -> OptimizerState:
        return {
            "lr": float(self.lr),
            "beta1": float(self.beta1),
            "beta2": float(self.beta2),
            "eps": float(self.eps),
            "steps": int(self.steps),
            "exp_avg": self.exp_avg.copy(),
            "exp_avg_sq": self.exp_avg_sq.copy(),
        }

    def load_state_dict(self, state: Mapping[str, np.ndarray | int | float]) -> None:
        self._check_state_shape(
            state, {"lr", "beta1", "beta2", "eps", "steps", "exp_avg", "exp_avg_sq"})
        lr = _check_number("lr", state["lr"], low=0.0, low_inclusive=False)
        beta1 = _check_number("beta1", state["beta1"], low=0.0, high=1.0)
        beta2 = _check_number("beta2", state["beta2"], low=0.0, high=1.0)
        eps = _check_number("eps", state["eps"], low=0.0, low_inclusive=False)
        steps = state["steps"]
        if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 0:
            raise ConfigError(f"Adam state 'steps' must be a non-negative integer, got {steps!r}")
        exp_avg = _check_array("exp_avg", state["exp_avg"])
        exp_avg_sq = _check_array("exp_avg_sq", state["exp_avg_sq"])
        self.lr, self.beta1, self.beta2, self.eps, self.steps = lr, beta1, beta2, eps, int(steps)
        np.copyto(self.exp_avg, exp_avg, casting="same_kind")
        np.copyto(self.exp_avg_sq, exp_avg_sq, casting="same_kind")


def _check_number(name: str, value: object, *, low: float, high: float | None = None,
                  low_inclusive: bool = True) -> float:
    """Return ``value`` as a float if it is a finite real in the allowed range."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    number = float(value)
    too_low = number < low if low_inclusive else number <= low
    if not math.isfinite(number) or too_low or (high is not None and number >= high):
        bounds = f"{'[' if low_inclusive else '('}{low}, {high if high is not None else 'inf'})"
        raise ConfigError(f"{name} must lie in {bounds}, got {value!r}")
    return number


def _check_array(name: str, value: object) -> np.ndarray:
    if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating):
        raise ConfigError(f"optimizer state {name!r} must be a float array, got {value!r}")
    return value
