"""ringtrain.train.nn: gradients vs finite differences, the flat buffers, determinism, schema."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from ringtrain.errors import ConfigError
from ringtrain.train.nn import (
    Dense,
    Layer,
    ReLU,
    Sequential,
    Tanh,
    accuracy,
    mse_loss,
    softmax_cross_entropy,
)
from ringtrain.train.optim import SGD


def _mlp(seed: int = 0, dtype: type = np.float32) -> Sequential:
    return Sequential(Dense(6, 5), Tanh(), Dense(5, 4), ReLU(), Dense(4, 3), seed=seed, dtype=dtype)


def _numeric_gradient(loss_of_params, params: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(params)
    for i in range(params.size):
        saved = params[i]
        params[i] = saved + eps
        plus = loss_of_params()
        params[i] = saved - eps
        minus = loss_of_params()
        params[i] = saved
        grad[i] = (plus - minus) / (2 * eps)
    return grad


def test_backward_matches_finite_differences_for_cross_entropy():
    rng = np.random.default_rng(1)
    model = _mlp(dtype=np.float64)
    # Non-zero biases so ReLU inputs sit away from the kink at 0.
    model.params[...] += rng.normal(0, 0.3, model.num_params)
    x = rng.normal(size=(7, 6))
    y = rng.integers(0, 3, size=7)

    loss, dlogits = softmax_cross_entropy(model.forward(x), y)
    dx = model.backward(dlogits)

    expected = _numeric_gradient(lambda: softmax_cross_entropy(model.forward(x), y)[0],
                                 model.params)
    np.testing.assert_allclose(model.grads, expected, rtol=1e-5, atol=1e-8)

    expected_dx = _numeric_gradient(lambda: softmax_cross_entropy(model.forward(x), y)[0],
                                    x.reshape(-1)).reshape(x.shape)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-5, atol=1e-8)


def test_backward_matches_finite_differences_for_mse():
    rng = np.random.default_rng(2)
    model = Sequential(Dense(3, 4), Tanh(), Dense(4, 2), seed=3, dtype=np.float64)
    x = rng.normal(size=(5, 3))
    target = rng.normal(size=(5, 2))
    _, dpred = mse_loss(model.forward(x), target)
    model.backward(dpred)
    expected = _numeric_gradient(lambda: mse_loss(model.forward(x), target)[0], model.params)
    np.testing.assert_allclose(model.grads, expected, rtol=1e-6, atol=1e-9)


def test_linear_regression_gradient_is_the_closed_form():
    rng = np.random.default_rng(4)
    model = Sequential(Dense(3, 1), seed=0, dtype=np.float64)
    x = rng.normal(size=(8, 3))
    target = rng.normal(size=(8, 1))
    pred = model.forward(x)
    _, dpred = mse_loss(pred, target)
    model.backward(dpred)
    residual = pred - target
    weight, bias = model.layers[0].weight, model.layers[0].bias
    np.testing.assert_allclose(pred, x @ weight + bias)
    np.testing.assert_allclose(model.layers[0].grad_weight, 2 / 8 * x.T @ residual)
    np.testing.assert_allclose(model.layers[0].grad_bias, 2 / 8 * residual.sum(axis=0))


def test_layers_are_views_into_the_flat_buffers():
    model = _mlp()
    dense = model.layers[0]
    assert np.shares_memory(dense.weight, model.params)
    assert np.shares_memory(dense.grad_weight, model.grads)
    model.params[0] = 123.0
    assert dense.weight[0, 0] == np.float32(123.0)
    assert model.params.dtype == model.grads.dtype == np.float32
    assert model.params.flags.c_contiguous and model.params.ndim == 1
    assert model.num_params == 6 * 5 + 5 + 5 * 4 + 4 + 4 * 3 + 3


def test_backward_overwrites_grads_instead_of_accumulating():
    rng = np.random.default_rng(5)
    model = _mlp()
    x, y = rng.normal(size=(4, 6)), rng.integers(0, 3, size=4)
    _, dlogits = softmax_cross_entropy(model.forward(x), y)
    model.backward(dlogits)
    first = model.grads.copy()
    model.backward(dlogits)
    np.testing.assert_array_equal(model.grads, first)
    assert np.any(first != 0)


def test_same_seed_gives_bit_identical_parameters():
    a, b = _mlp(seed=7), _mlp(seed=7)
    assert a.params.tobytes() == b.params.tobytes()
    assert a.params.tobytes() != _mlp(seed=8).params.tobytes()
    a.params[...] = 0
    a.initialize(7)
    assert a.params.tobytes() == b.params.tobytes()


def test_initial_parameters_are_pinned_across_machines():
    # If this changes, nodes on different numpy versions would start from different models.
    model = Sequential(Dense(64, 32), ReLU(), Dense(32, 10), seed=0)
    digest = hashlib.sha256(model.params.tobytes()).hexdigest()
    assert digest == "32e482c3e0947b9df1ae3a4b62f0123553e97e78a4f1821fca174258db826b29"


def test_initialisation_is_glorot_uniform_weights_and_zero_biases():
    model = Sequential(Dense(64, 32), seed=0)
    limit = np.sqrt(6 / (64 + 32))
    assert np.abs(model.layers[0].weight).max() <= limit
    assert np.abs(model.layers[0].weight).max() > 0.9 * limit
    assert np.all(model.layers[0].bias == 0)


def test_parameter_layout_lists_names_and_shapes_in_buffer_order():
    model = _mlp()
    assert model.parameter_layout() == [
        ("0.weight", (6, 5)), ("0.bias", (5,)),
        ("2.weight", (5, 4)), ("2.bias", (4,)),
        ("4.weight", (4, 3)), ("4.bias", (3,)),
    ]
    # The first parameter starts the buffer, the last ends it.
    assert np.shares_memory(model.layers[0].weight, model.params[:30])
    assert np.shares_memory(model.layers[4].bias, model.params[-3:])


def test_schema_hash_identifies_the_architecture_not_the_values():
    base = _mlp(seed=0).schema_hash()
    assert len(base) == 64 and int(base, 16) >= 0
    assert _mlp(seed=99).schema_hash() == base
    assert _mlp(dtype=np.float64).schema_hash() != base
    swapped = Sequential(Dense(6, 5), ReLU(), Dense(5, 4), ReLU(), Dense(4, 3))
    assert swapped.schema_hash() != base
    wider = Sequential(Dense(6, 5), Tanh(), Dense(5, 5), ReLU(), Dense(5, 3))
    assert wider.schema_hash() != base


def test_softmax_cross_entropy_matches_the_definition_and_is_stable():
    logits = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    labels = np.array([2, 0])
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    loss, grad = softmax_cross_entropy(logits, labels)
    assert loss == pytest.approx(-np.mean(np.log(probs[[0, 1], labels])))
    np.testing.assert_allclose(grad, (probs - np.eye(3)[labels]) / 2)

    huge = np.array([[1e4, 0.0, -1e4]], dtype=np.float32)
    loss, grad = softmax_cross_entropy(huge, np.array([1]))
    assert np.isfinite(loss) and loss == pytest.approx(1e4)
    assert np.all(np.isfinite(grad)) and grad.dtype == np.float32


def test_accuracy_counts_argmax_hits():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert accuracy(logits, np.array([1, 0, 0, 0])) == 0.75


@pytest.mark.parametrize("logits, labels", [
    (np.zeros((2, 3)), np.array([0, 3])),
    (np.zeros((2, 3)), np.array([0, -1])),
    (np.zeros((2, 3)), np.array([0])),
    (np.zeros((2, 3)), np.array([0.0, 1.0])),
    (np.zeros((0, 3)), np.zeros(0, dtype=int)),
    (np.zeros(3), np.array([0])),
])
def test_bad_labels_are_refused(logits, labels):
    with pytest.raises(ConfigError):
        softmax_cross_entropy(logits, labels)
    with pytest.raises(ConfigError):
        accuracy(logits, labels)


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError):
        Dense(0, 3)
    with pytest.raises(ConfigError):
        Sequential()
    with pytest.raises(ConfigError):
        Sequential(Dense(2, 2), seed=-1)
    with pytest.raises(ConfigError):
        Sequential(Dense(2, 2), dtype=np.int32)
    dense = Dense(2, 2)
    with pytest.raises(ConfigError):
        Sequential(dense, dense)
    with pytest.raises(ConfigError):
        _mlp().forward(np.zeros((2, 5)))
    with pytest.raises(ConfigError):
        mse_loss(np.zeros((2, 1)), np.zeros((2, 2)))
    with pytest.raises(ConfigError):
        _mlp().load_params(np.zeros(3))
    with pytest.raises(ConfigError):
        Sequential(Dense(2, 2)).backward(np.zeros((1, 2)))


def test_load_params_copies_in_place():
    model = _mlp()
    views_before = model.layers[0].weight
    values = np.arange(model.num_params, dtype=np.float64)
    model.load_params(values)
    assert model.layers[0].weight is views_before
    np.testing.assert_array_equal(model.params, values.astype(np.float32))


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 2e-5)])
def test_one_big_batch_equals_the_weighted_mean_of_sub_batches(dtype, rtol):
    """The data-parallel identity: a member's mean-loss gradient weighted by its sample count.

    One model on the union batch gets the same gradient as N members on disjoint sub-batches
    whose gradients are combined as sum(n_i * grad_i) / sum(n_i), so one SGD step agrees too.
    """
    rng = np.random.default_rng(6)
    sizes = [8, 8, 5, 11]  # uneven on purpose: the last step of an epoch is short
    x = rng.normal(size=(sum(sizes), 6))
    y = rng.integers(0, 3, size=sum(sizes))

    whole = _mlp(seed=3, dtype=dtype)
    _, dlogits = softmax_cross_entropy(whole.forward(x), y)
    whole.backward(dlogits)

    members = [_mlp(seed=3, dtype=dtype) for _ in sizes]
    bounds = np.cumsum([0, *sizes])
    weighted_sum = np.zeros(whole.num_params, dtype=np.float64)
    for member, start, stop in zip(members, bounds[:-1], bounds[1:], strict=True):
        _, dlogits = softmax_cross_entropy(member.forward(x[start:stop]), y[start:stop])
        member.backward(dlogits)
        weighted_sum += (stop - start) * member.grads.astype(np.float64)
    combined = (weighted_sum / sum(sizes)).astype(dtype)
    np.testing.assert_allclose(combined, whole.grads, rtol=rtol, atol=rtol * 1e-2)

    # The same step on every member keeps them equal to the single model.
    SGD(whole.params, lr=0.1).step(whole.grads)
    for member in members:
        SGD(member.params, lr=0.1).step(combined)
        np.testing.assert_allclose(member.params, whole.params, rtol=rtol, atol=rtol * 1e-2)

    # And an unweighted mean is not the same thing when sizes differ: the test can fail.
    unweighted = np.mean([m.grads.astype(np.float64) for m in members], axis=0)
    assert not np.allclose(unweighted, whole.grads, rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.parametrize("input_grad", [True, False])
def test_backward_reports_gradients_final_from_the_end(input_grad):
    rng = np.random.default_rng(2)
    model = _mlp(dtype=np.float64)
    x, y = rng.normal(size=(5, 6)), rng.integers(0, 3, size=5)
    _, dlogits = softmax_cross_entropy(model.forward(x), y)
    model.backward(dlogits)
    final = model.grads.copy()
    model.grads[...] = np.nan  # whatever backward has not written yet
    seen: list[tuple[int, np.ndarray]] = []
    model.backward(dlogits, on_ready=lambda start: seen.append((start, model.grads.copy())),
                   input_grad=input_grad)
    layers = [5 * 6 + 5 + 5 * 4 + 4, 6 * 5 + 5, 0]  # where the three Dense layers begin
    # without the input gradient, the first layer's weight comes in row blocks (rows 1, 3, 4
    # of 6 begin the blocks after the first), the last rows first
    inside = [] if input_grad else [4 * 5, 3 * 5, 1 * 5]
    assert [start for start, _ in seen] == layers[:2] + inside + [0]
    assert model.ready_points == sorted(layers + [4 * 5, 3 * 5, 1 * 5])
    for start, grads in seen:  # when reported, everything from start on is final
        np.testing.assert_array_equal(grads[start:], final[start:])
        assert np.isnan(grads[:start]).all()


class _Doubling(Layer):
    """A custom layer with no parameters and no param_backward of its own."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        return 2 * x

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        return 2 * grad_out


def test_backward_without_input_gradient_stops_at_the_first_layer_with_parameters():
    rng = np.random.default_rng(3)
    model = Sequential(_Doubling(), Dense(6, 5), Tanh(), Dense(5, 3), seed=1, dtype=np.float64)
    x, y = rng.normal(size=(4, 6)), rng.integers(0, 3, size=4)
    _, dlogits = softmax_cross_entropy(model.forward(x), y)
    assert model.backward(dlogits) is not None
    full = model.grads.copy()
    first = model.layers[1]
    first.backward = lambda grad_out: pytest.fail("the first Dense computed d loss / d input")
    assert model.backward(dlogits, input_grad=False) is None
    np.testing.assert_array_equal(model.grads, full)
