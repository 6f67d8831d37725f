"""Inference across 4 real node processes on 127.0.0.1: a batch split by speed, refused
versions, ensemble fusion. One cluster runs every case (a process costs about half a second
to start); the parent computes the single-process reference and checks."""

from __future__ import annotations

import numpy as np
import pytest

from ringtrain.errors import MismatchError
from ringtrain.infer import RingInference, fuse
from ringtrain.testing import run_local
from ringtrain.train.datasets import load_digits
from ringtrain.train.nn import Dense, ReLU, Sequential, accuracy, softmax_cross_entropy
from ringtrain.train.optim import Adam
from ringtrain.train.sharding import split_proportional

NODES = 4
HALF_SPEED = [2.0, 2.0, 2.0, 1.0]  # node 3 at half speed
TIMEOUT = 90.0


def digits_model(seed: int = 0) -> Sequential:
    return Sequential(Dense(64, 32), ReLU(), Dense(32, 10), seed=seed)


def train_local(model: Sequential, x: np.ndarray, y: np.ndarray, epochs: int) -> None:
    optimizer = Adam(model.params, lr=0.01)
    for epoch in range(epochs):
        order = np.random.default_rng(epoch).permutation(len(x))
        for start in range(0, len(order), 32):
            rows = order[start:start + 32]
            _, grad = softmax_cross_entropy(model.forward(x[rows]), y[rows])
            model.backward(grad)
            optimizer.step(model.grads)


def node_cases(node, params: np.ndarray, batch: np.ndarray) -> dict:
    model = digits_model()
    model.load_params(params)
    out: dict = {}
    # 1. the batch on rank 0 only (broadcast), equal speeds
    first = RingInference(node, model, speed=1.0).run(batch if node.rank == 0 else None)
    out["equal"] = (first.outputs, first.shares)
    # 2. the batch on every member, node 3 at half speed
    slow = RingInference(node, model, speed=HALF_SPEED[node.rank]).run(batch)
    out["half"] = (slow.outputs, slow.shares)
    # 3. node 2 holds another version: refused on every member
    other = digits_model()
    other.load_params(params + (1e-3 if node.rank == 2 else 0.0))
    try:
        RingInference(node, other, speed=1.0).run(batch)
        out["mismatch"] = None
    except MismatchError as exc:
        out["mismatch"] = str(exc)
    # 4. ensemble: each member trains its own model on its own quarter of the training set
    train, test = load_digits().split(0.2, 0)
    shard = np.array_split(np.arange(len(train)), node.world_size)[node.rank]
    own = digits_model(seed=node.rank)
    train_local(own, train.x[shard], train.y[shard], epochs=20)
    fusion = fuse(node, own, test.x, weight=float(len(shard)))
    out["ensemble"] = (accuracy(own.forward(test.x), test.y),
                       float(np.mean(fusion.predictions == test.y)), fusion.describe(),
                       fusion.weights)
    return out


@pytest.fixture(scope="module")
def setting():
    train, test = load_digits().split(0.2, 0)
    model = digits_model()
    train_local(model, train.x, train.y, epochs=3)
    batch = test.x[:357]  # 357 = 4 x 89 + 1: does not divide evenly
    results = run_local(node_cases, NODES, args=(model.params.copy(), batch), timeout=TIMEOUT)
    return model, batch, results


def test_four_nodes_return_the_single_process_predictions_in_order(setting):
    model, batch, results = setting
    reference = model.forward(batch)
    for rank, result in enumerate(results):
        outputs, shares = result["equal"]
        assert sum(shares) == len(batch) and len(set(shares)) == 2, shares
        assert np.array_equal(np.argmax(outputs, 1), np.argmax(reference, 1)), rank
        # BLAS may block a matrix product differently for fewer rows: the last bits can differ
        assert np.allclose(outputs, reference, rtol=1e-5, atol=1e-5), rank


def test_a_node_at_half_speed_gets_half_the_share(setting):
    model, batch, results = setting
    expected = split_proportional(len(batch), HALF_SPEED)
    for result in results:
        outputs, shares = result["half"]
        assert list(shares) == expected, shares
        assert np.array_equal(np.argmax(outputs, 1), np.argmax(model.forward(batch), 1))
    print(f"\nshares with node 3 at half speed: {expected}")


def test_members_holding_different_versions_are_refused_naming_both(setting):
    _, _, results = setting
    messages = {result["mismatch"] for result in results}
    assert len(messages) == 1, messages
    message = messages.pop()
    assert message is not None and "node-00" in message and "node-02" in message, message


def test_ensemble_of_disjoint_shards_beats_the_mean_single_model(setting):
    _, _, results = setting
    singles = [result["ensemble"][0] for result in results]
    fused = {result["ensemble"][1] for result in results}
    assert len(fused) == 1
    fused_accuracy = fused.pop()
    print(f"\nsingle models {[round(s, 4) for s in singles]} mean {np.mean(singles):.4f}; "
          f"fused {fused_accuracy:.4f}; {results[0]['ensemble'][2]}")
    assert fused_accuracy > np.mean(singles)
    assert results[0]["ensemble"][3] == pytest.approx(
        {f"node-0{i}": 0.25 for i in range(4)}, abs=0.01)
