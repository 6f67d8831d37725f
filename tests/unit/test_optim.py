"""ringtrain.train.optim: steps against hand-computed values, a float64 oracle, state round trip."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from ringtrain.errors import ConfigError
from ringtrain.train.optim import SGD, Adam


def _buffers(dtype: type = np.float64) -> tuple[np.ndarray, np.ndarray]:
    return np.array([1.0, 2.0], dtype=dtype), np.array([0.5, -1.0], dtype=dtype)


def test_sgd_plain_step():
    params, grads = _buffers()
    SGD(params, lr=0.1).step(grads)
    np.testing.assert_allclose(params, [0.95, 2.1], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(grads, [0.5, -1.0])  # the gradient is not touched


def test_sgd_momentum_two_steps():
    params, grads = _buffers()
    optimizer = SGD(params, lr=0.1, momentum=0.9)
    optimizer.step(grads)  # velocity = g
    np.testing.assert_allclose(params, [0.95, 2.1], atol=1e-15)
    optimizer.step(grads)  # velocity = 0.9 g + g = 1.9 g
    np.testing.assert_allclose(params, [0.855, 2.29], atol=1e-15)


def test_sgd_weight_decay_pulls_towards_zero():
    params = np.array([1.0, 2.0])
    SGD(params, lr=0.1, weight_decay=0.5).step(np.zeros(2))
    np.testing.assert_allclose(params, [0.95, 1.9], atol=1e-15)


def test_adam_first_step_moves_each_parameter_by_lr():
    # After bias correction the first step is lr * g / (|g| + eps), about lr * sign(g).
    params, grads = _buffers()
    Adam(params, lr=0.01).step(grads)
    np.testing.assert_allclose(params, [0.99, 2.01], atol=1e-9)


def _adam_oracle(params: np.ndarray, gradients: list[np.ndarray], lr: float,
                 beta1: float, beta2: float, eps: float) -> np.ndarray:
    """Adam as in the paper, one element at a time in float64."""
    params = [float(p) for p in params]
    m = [0.0] * len(params)
    v = [0.0] * len(params)
    for t, grad in enumerate(gradients, start=1):
        for i, g in enumerate(grad):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            m_hat = m[i] / (1 - beta1 ** t)
            v_hat = v[i] / (1 - beta2 ** t)
            params[i] -= lr * m_hat / (math.sqrt(v_hat) + eps)
    return np.array(params)


def _sgd_oracle(params: np.ndarray, gradients: list[np.ndarray], lr: float,
                momentum: float, weight_decay: float) -> np.ndarray:
    params = [float(p) for p in params]
    velocity = [0.0] * len(params)
    for grad in gradients:
        for i, g in enumerate(grad):
            g = g + weight_decay * params[i]
            velocity[i] = momentum * velocity[i] + g
            params[i] -= lr * velocity[i]
    return np.array(params)


def test_adam_matches_the_paper_over_several_steps():
    rng = np.random.default_rng(0)
    start = rng.normal(size=9)
    gradients = [rng.normal(size=9) for _ in range(6)]
    params = start.copy()
    optimizer = Adam(params, lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    for grad in gradients:
        optimizer.step(grad)
    expected = _adam_oracle(start, gradients, lr=0.05, beta1=0.8, beta2=0.95, eps=1e-6)
    np.testing.assert_allclose(params, expected, rtol=1e-12, atol=1e-14)
    assert optimizer.steps == 6


def test_sgd_matches_the_oracle_over_several_steps():
    rng = np.random.default_rng(1)
    start = rng.normal(size=9)
    gradients = [rng.normal(size=9) for _ in range(6)]
    params = start.copy()
    optimizer = SGD(params, lr=0.05, momentum=0.7, weight_decay=0.01)
    for grad in gradients:
        optimizer.step(grad)
    expected = _sgd_oracle(start, gradients, lr=0.05, momentum=0.7, weight_decay=0.01)
    np.testing.assert_allclose(params, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make", [
    lambda p: SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda p: Adam(p, lr=1e-3),
])
def test_steps_are_bit_identical_for_identical_inputs(make):
    rng = np.random.default_rng(2)
    start = rng.normal(size=1001).astype(np.float32)
    gradients = [rng.normal(size=1001).astype(np.float32) for _ in range(5)]
    results = []
    for _ in range(2):
        params = start.copy()
        optimizer = make(params)
        for grad in gradients:
            optimizer.step(grad)
        assert params.dtype == np.float32
        results.append(params.tobytes())
    assert results[0] == results[1]
    assert results[0] != start.tobytes()


@pytest.mark.parametrize("make", [
    lambda p: SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda p: Adam(p, lr=1e-2, betas=(0.5, 0.9), eps=1e-7),
])
def test_state_round_trip_resumes_bit_identically(make):
    rng = np.random.default_rng(3)
    gradients = [rng.normal(size=17).astype(np.float32) for _ in range(6)]
    params = rng.normal(size=17).astype(np.float32)
    optimizer = make(params)
    for grad in gradients[:3]:
        optimizer.step(grad)
    state = optimizer.state_dict()
    assert all(isinstance(v, (np.ndarray, int, float)) for v in state.values())

    resumed_params = params.copy()
    resumed = make(resumed_params)
    resumed.lr = 123.0  # hyperparameters come back from the state too
    resumed.load_state_dict(state)
    for grad in gradients[3:]:
        optimizer.step(grad)
        resumed.step(grad)
    assert resumed_params.tobytes() == params.tobytes()


def test_state_dict_arrays_are_copies():
    params, grads = _buffers()
    optimizer = Adam(params, lr=0.1)
    state = optimizer.state_dict()
    optimizer.step(grads)
    assert np.all(state["exp_avg"] == 0)
    assert state["steps"] == 0


def test_bad_arguments_are_refused():
    params, grads = _buffers()
    for bad in [
        lambda: SGD(params, lr=0.0),
        lambda: SGD(params, lr=float("nan")),
        lambda: SGD(params, lr=0.1, momentum=1.0),
        lambda: SGD(params, lr=0.1, weight_decay=-1),
        lambda: SGD(params.reshape(2, 1), lr=0.1),
        lambda: SGD(params.astype(np.int64), lr=0.1),
        lambda: SGD(np.zeros(4)[::2], lr=0.1),
        lambda: Adam(params, lr=0.1, betas=(0.9,)),
        lambda: Adam(params, lr=0.1, eps=0),
        lambda: SGD(params, lr=0.1).step(grads.astype(np.float32)),
        lambda: SGD(params, lr=0.1).step(np.zeros(3)),
        lambda: Adam(params, lr=0.1).load_state_dict({"lr": 0.1}),
        lambda: SGD(params, lr=0.1).load_state_dict(
            {"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "velocity": np.zeros(3)}),
        lambda: Adam(params, lr=0.1).load_state_dict(
            {**Adam(params, lr=0.1).state_dict(), "steps": -1}),
    ]:
        with pytest.raises(ConfigError):
            bad()


def test_cosine_schedule_decays_from_one_to_its_floor():
    from ringtrain.train.schedule import Cosine

    schedule = Cosine(floor=0.2)
    assert schedule.factor(0.0) == 1.0
    assert schedule.factor(0.5) == pytest.approx(0.6)
    assert schedule.factor(1.0) == pytest.approx(0.2)
    assert schedule.factor(-1.0) == 1.0 and schedule.factor(2.0) == pytest.approx(0.2)
    factors = [Cosine().factor(p / 100) for p in range(100)]
    assert all(a > b > 0 for a, b in itertools.pairwise(factors))
    for floor in (-0.1, 1.0, "0.5", float("nan")):
        with pytest.raises(ConfigError, match="Cosine floor must be in"):
            Cosine(floor=floor)
