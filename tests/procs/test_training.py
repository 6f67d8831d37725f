"""ringtrain.train.trainer across real node processes: every claim of the module docstring, checked
against a one-process oracle that trains on the same samples with the whole global batch."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

from ringtrain.errors import ConfigError
from ringtrain.node.node import Node
from ringtrain.testing import run_local
from ringtrain.train.checkpoint import content_hash
from ringtrain.train.datasets import load_digits
from ringtrain.train.nn import Dense, Sequential, Tanh, softmax_cross_entropy
from ringtrain.train.optim import SGD, Adam, Optimizer
from ringtrain.train.sharding import DataPosition, Sampler
from ringtrain.train.sync import DistributedOptimizer
from ringtrain.train.trainer import NonFiniteGradientError, Trainer

SAMPLES = 200  # a slice of the digits: each run takes a second, not ten
BATCH = 8
TOLERANCE = 1e-9  # float64: only summation order differs from the oracle


def _data() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    return digits.x[:SAMPLES], digits.y[:SAMPLES]


def _model() -> Sequential:
    return Sequential(Dense(64, 16), Tanh(), Dense(16, 10), seed=1, dtype=np.float64)


def _optimizer(model: Sequential, kind: str) -> Optimizer:
    if kind == "adam":
        return Adam(model.params, lr=0.01)
    return SGD(model.params, lr=0.1, momentum=0.9)


def _oracle(global_batches: list[int], optimizer: str, steps: int) -> np.ndarray:
    """One process, one batch per step: the global batch of step i is global_batches[i]."""
    x, y = _data()
    model = _model()
    opt = _optimizer(model, optimizer)
    sampler, at = Sampler(len(x), seed=0), DataPosition()
    for step in range(steps):
        (indices,), at = sampler.next_batches(at, [global_batches[step]])
        _, grad = softmax_cross_entropy(model.forward(x[indices]), y[indices])
        model.backward(grad)
        opt.step(model.grads)
    return model.params.copy()


def _summary(trainer: Trainer, reports: list) -> dict:
    return {"params": trainer.model.params.copy(), "version": trainer.version,
            "indices": [(r.epoch, r.indices.copy()) for r in reports],
            "global": [sum(r.batch_sizes) for r in reports],
            "compute": [r.compute_seconds for r in reports],
            "sizes": [r.batch_sizes for r in reports],
            "applied": [r.applied for r in reports], "lost": trainer.lost_steps,
            "bytes": trainer.node.bytes_sent, "early_buckets": trainer.early_buckets}


def _train(node: Node, epochs: int, optimizer: str = "sgd", max_steps: int | None = None,
           trainer_class: type[Trainer] = Trainer, **options) -> dict:
    x, y = _data()
    model = _model()
    trainer = trainer_class(node, model, _optimizer(model, optimizer), x, y, batch_size=BATCH,
                            **options)
    reports: list = []
    trainer.fit(epochs, on_step=reports.append, max_steps=max_steps)
    return _summary(trainer, reports)


def _assert_identical_across_nodes(results: list[dict]) -> None:
    for result in results[1:]:
        np.testing.assert_array_equal(result["params"], results[0]["params"])
        assert result["version"] == results[0]["version"]


def _assert_every_sample_once_per_epoch(results: list[dict], epochs: range) -> None:
    for epoch in epochs:
        seen = np.concatenate([i for r in results for e, i in r["indices"] if e == epoch])
        assert sorted(seen.tolist()) == list(range(SAMPLES)), f"epoch {epoch}"


@pytest.mark.parametrize("size", [1, 2, 4])
def test_n_nodes_with_batch_b_equal_one_process_with_batch_n_b(size):
    results = run_local(_train, size, args=(2,), kwargs={"share_every": 3}, timeout=60)
    _assert_identical_across_nodes(results)
    _assert_every_sample_once_per_epoch(results, range(2))
    global_batches = results[0]["global"]
    assert set(global_batches[:-1]) <= {size * BATCH, SAMPLES % (size * BATCH)}
    expected = _oracle(global_batches, "sgd", len(global_batches))
    difference = np.abs(results[0]["params"] - expected).max()
    print(f"N={size}: {len(global_batches)} steps, max |param - oracle| = {difference:.2e}")
    assert difference < TOLERANCE


# with 64-byte buckets: the last layer, then the first layer's weight rows 48-63, 32-47 and
# 16-31 (rows 0-15 go with the control values)
EARLY_BUCKETS = [(64 * 16 + 16, 64 * 16 + 16 + 16 * 10 + 10), (48 * 16, 64 * 16 + 16),
                 (32 * 16, 48 * 16), (16 * 16, 32 * 16)]


@pytest.mark.parametrize("size", [2, 4])
def test_gradient_sent_during_backward_still_equals_one_process(size):
    # 64-byte buckets: the last layer's gradient leaves while the first one's is computed
    results = run_local(_train, size, args=(2,), kwargs={"bucket_bytes": 64}, timeout=60)
    _assert_identical_across_nodes(results)
    assert results[0]["early_buckets"] == EARLY_BUCKETS
    global_batches = results[0]["global"]
    expected = _oracle(global_batches, "sgd", len(global_batches))
    assert np.abs(results[0]["params"] - expected).max() < TOLERANCE


class _Slowed(Trainer):
    """Compute takes ``seconds_per_sample`` more per sample, as on a slower device."""

    seconds_per_sample = 0.0

    def compute_gradients(self, x, y):
        time.sleep(self.seconds_per_sample * len(x))
        return super().compute_gradients(x, y)


def _speed_run(node: Node, adaptive: bool) -> dict:
    # rank 0 three times as fast as rank 1
    _Slowed.seconds_per_sample = [0.0002, 0.0006][node.rank]
    return _train(node, 10, max_steps=40, trainer_class=_Slowed, adaptive=adaptive,
                  share_every=4)


def _spread(results: list[dict], skip: int) -> float:
    compute = np.array([r["compute"] for r in results])[:, skip:]
    return float(np.median(compute.max(axis=0) - compute.min(axis=0)))


def test_speed_policy_gives_slow_nodes_fewer_samples_and_stays_exact():
    fixed = run_local(_speed_run, 2, args=(False,), timeout=60)
    adaptive = run_local(_speed_run, 2, args=(True,), timeout=60)
    for results in (fixed, adaptive):
        _assert_identical_across_nodes(results)
        expected = _oracle(results[0]["global"], "sgd", len(results[0]["global"]))
        assert np.abs(results[0]["params"] - expected).max() < TOLERANCE
    spread_fixed, spread_adaptive = _spread(fixed, 8), _spread(adaptive, 8)
    last_sizes = adaptive[0]["sizes"][-1]
    print(f"step-time spread (median over steps 9-40): adaptive off {spread_fixed * 1e3:.2f} ms,"
          f" on {spread_adaptive * 1e3:.2f} ms; last split {last_sizes}")
    assert last_sizes[0] > last_sizes[1]
    if spread_fixed < 0.002:
        pytest.skip(f"too noisy to compare: spread with adaptive off only "
                    f"{spread_fixed * 1e3:.2f} ms")
    assert spread_adaptive < 0.6 * spread_fixed


def _local_and_sync(node: Node) -> dict:
    sync = _train(node, 2, average_every=1)
    before = node.bytes_sent
    local = _train(node, 2, average_every=4)
    local["bytes"] = node.bytes_sent - before
    local["sync_bytes"] = sync["bytes"]
    x, y = _data()
    model = _model()
    model.load_params(local["params"])
    local["loss"], _ = softmax_cross_entropy(model.forward(x), y)
    local["initial_loss"], _ = softmax_cross_entropy(_model().forward(x), y)
    return local


def test_local_sgd_averages_every_k_steps_and_communicates_less():
    results = run_local(_local_and_sync, 2, timeout=60)
    _assert_identical_across_nodes(results)
    _assert_every_sample_once_per_epoch(results, range(2))
    result = results[0]
    assert np.isfinite(result["params"]).all()
    assert result["loss"] < 0.7 * result["initial_loss"]
    print(f"bytes sent per node: every step {result['sync_bytes']}, "
          f"local SGD k=4 {result['bytes']}")
    # each average moves parameters and momentum (2 buffers) once per 4 steps: about half
    assert result["bytes"] < 0.7 * result["sync_bytes"]


class _Poisoned(Trainer):
    """Rank 1's gradient is NaN at the steps in ``bad_steps``."""

    bad_steps: frozenset[int] = frozenset()

    def compute_gradients(self, x, y):
        loss = super().compute_gradients(x, y)
        if self.node.rank == 1 and self.step_count + 1 in self.bad_steps:
            self.model.grads[3] = math.nan
        return loss


def _poisoned_run(node: Node, bad_steps: frozenset[int], compression: str | None = None
                  ) -> dict | str:
    _Poisoned.bad_steps = bad_steps
    try:
        return _train(node, 1, trainer_class=_Poisoned, max_nonfinite=3, compression=compression)
    except NonFiniteGradientError as exc:
        return f"{type(exc).__name__} at step {exc.step}: {exc}"


@pytest.mark.parametrize("compression", [None, "int8"])
def test_a_nan_on_one_node_skips_the_step_everywhere(compression):
    results = run_local(_poisoned_run, 3, args=(frozenset({4, 5}), compression), timeout=60)
    _assert_identical_across_nodes(results)
    for result in results:
        assert np.isfinite(result["params"]).all()
        assert [i for i, ok in enumerate(result["applied"], 1) if not ok] == [4, 5]


class _PoisonableDense(Dense):
    """A Dense layer whose weight gradient is NaN while ``poisoned``; the gradient it passes
    back stays finite, so only its own part of the model's gradient is NaN."""

    poisoned = False

    def bind(self, params: list[np.ndarray], grads: list[np.ndarray]) -> None:
        super().bind(params, grads)
        self.grad_views = grads

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        grad_in = super().backward(grad_out)
        if self.poisoned:
            self.grad_views[0][...] = math.nan
        return grad_in


def _nan_bucket_run(node: Node, bad_steps: frozenset[int]) -> dict:
    """Rank 1's last layer (the bucket sent during backward) has a NaN gradient at
    ``bad_steps``; the rest of its gradient stays finite."""
    x, y = _data()
    last = _PoisonableDense(16, 10)
    model = Sequential(Dense(64, 16), Tanh(), last, seed=1, dtype=np.float64)
    trainer = Trainer(node, model, _optimizer(model, "sgd"), x, y, batch_size=BATCH,
                      bucket_bytes=64, max_nonfinite=3)
    applied = []
    for step in range(1, 8):
        last.poisoned = node.rank == 1 and step in bad_steps
        applied.append(trainer.step().applied)
    return {"params": model.params.copy(), "version": trainer.version, "applied": applied,
            "early_buckets": trainer.early_buckets}


def test_a_nan_in_a_bucket_sent_during_backward_skips_the_step_everywhere():
    results = run_local(_nan_bucket_run, 3, args=(frozenset({4, 5}),), timeout=60)
    _assert_identical_across_nodes(results)
    for result in results:
        assert result["early_buckets"] == EARLY_BUCKETS
        assert np.isfinite(result["params"]).all()
        assert [i for i, ok in enumerate(result["applied"], 1) if not ok] == [4, 5]


def test_too_many_nonfinite_steps_in_a_row_stop_every_node():
    results = run_local(_poisoned_run, 2, args=(frozenset(range(3, 100)),), timeout=60)
    for result in results:
        assert result.startswith("NonFiniteGradientError at step 5:")
        assert "3 steps in a row" in result


def test_checkpoint_resume_equals_an_uninterrupted_run(tmp_path: Path):
    options = {"adaptive": False, "checkpoint_every": 5, "optimizer": "adam"}
    whole = run_local(_train, 2, args=(2,), kwargs={**options, "checkpoint_dir": tmp_path / "a"})
    first = run_local(_train, 2, args=(2,), kwargs={**options, "checkpoint_dir": tmp_path / "b",
                                                  "max_steps": 13})
    assert len(first[0]["applied"]) == 13
    resumed = run_local(_train, 2, args=(2,), kwargs={**options,
                                                    "checkpoint_dir": tmp_path / "b"})
    _assert_identical_across_nodes(resumed)
    assert [r["lost"] for r in resumed] == [3, 3]
    assert len(resumed[0]["applied"]) == len(whole[0]["applied"]) - 10
    np.testing.assert_array_equal(resumed[0]["params"], whole[0]["params"])
    assert resumed[0]["version"] == whole[0]["version"]


def test_resume_on_more_nodes_reshards_without_dropping_a_sample(tmp_path: Path):
    options = {"adaptive": False, "checkpoint_every": 5, "checkpoint_dir": tmp_path}
    first = run_local(_train, 2, args=(1,), kwargs={**options, "max_steps": 10})
    resumed = run_local(_train, 4, args=(1,), kwargs=options)
    _assert_identical_across_nodes(resumed)
    # epoch 0 read by 2 nodes for 10 steps, then by 4 nodes from the same position
    _assert_every_sample_once_per_epoch(first + resumed, range(1))
    global_batches = first[0]["global"] + resumed[0]["global"]
    expected = _oracle(global_batches, "sgd", len(global_batches))
    assert np.abs(resumed[0]["params"] - expected).max() < TOLERANCE
    assert content_hash(resumed[0]["params"], {}) == content_hash(resumed[3]["params"], {})


def _mismatched(node: Node) -> str:
    x, y = _data()
    model = Sequential(Dense(64, 16 + node.rank), Tanh(), Dense(16 + node.rank, 10), seed=1)
    try:
        Trainer(node, model, SGD(model.params, lr=0.1), x, y, batch_size=BATCH)
    except ConfigError as exc:
        return str(exc)
    return "no error"


def test_members_training_different_models_are_refused_with_both_named():
    messages = run_local(_mismatched, 2, timeout=60)
    assert messages[0] == messages[1]
    assert "members disagree on model: rank 0 (node-00) has '" in messages[0]
    assert "rank 1 (node-01) has '" in messages[0]


def _loss_on_all_data(params: np.ndarray) -> float:
    x, y = _data()
    model = _model32()
    model.load_params(params)
    return softmax_cross_entropy(model.forward(x), y)[0]


def _model32() -> Sequential:
    return Sequential(Dense(64, 16), Tanh(), Dense(16, 10), seed=1, dtype=np.float32)


def _compressed_and_exact(node: Node) -> dict:
    """Train a float32 model with int8 compression, then again without, on the same node."""
    x, y = _data()
    out: dict = {}
    for name, compression in (("int8", "int8"), ("exact", None)):
        model = _model32()
        before = node.bytes_sent
        trainer = Trainer(node, model, Adam(model.params, lr=0.01), x, y, batch_size=BATCH,
                          compression=compression)
        reports: list = []
        trainer.fit(3, on_step=reports.append)
        out[name] = {"params": model.params.copy(), "version": trainer.version,
                     "bytes": node.bytes_sent - before,
                     "applied": all(r.applied for r in reports)}
    return out


def test_int8_compressed_training_is_bit_identical_on_every_node_and_learns():
    results = run_local(_compressed_and_exact, 3, timeout=60)
    _assert_identical_across_nodes([r["int8"] for r in results])
    int8, exact = results[0]["int8"], results[0]["exact"]
    assert int8["applied"]
    initial = _loss_on_all_data(_model32().params)
    compressed_loss, exact_loss = _loss_on_all_data(int8["params"]), \
        _loss_on_all_data(exact["params"])
    print(f"loss on all data: initial {initial:.3f}, exact {exact_loss:.3f}, int8 "
          f"{compressed_loss:.3f}; bytes sent by rank 0: exact {exact['bytes']}, int8 "
          f"{int8['bytes']}")
    assert compressed_loss < 0.5 * initial
    assert compressed_loss < 1.1 * exact_loss  # error feedback: int8 costs little accuracy
    assert not np.array_equal(int8["params"], exact["params"])  # the gradient was compressed


def _steps_of_unequal_weight(node: Node) -> dict:
    params = np.zeros(1000, np.float32)
    optimizer = DistributedOptimizer(node, SGD(params, lr=1.0), compression="int4")
    grads = np.random.default_rng(node.rank).standard_normal(params.size).astype(np.float32)
    optimizer.step(grads, 1000.0)  # a full batch on every member
    first = params.copy()
    optimizer.step(np.zeros_like(params), 1.0)  # a last, tiny batch with a zero gradient
    return {"first": first, "second": params.copy(), "grads": grads}


def test_a_small_compressed_step_after_a_large_one_does_not_amplify_the_left_out_error():
    """Error feedback owes the next step what the codec left out of this one, as a share of
    the mean gradient: a step of 3 samples after one of 3,000 moves the model by about that
    error (half an int4 level at each of the ring's three encodings), not by it times
    3,000 / 3 (carried as a part of the weighted sum, the residual was divided by the small
    step's weight)."""
    results = run_local(_steps_of_unequal_weight, 3, timeout=60)
    mean = np.mean([r["grads"] for r in results], axis=0)
    bound = 3 * np.abs(mean).max() / 7 / 2
    for r in results:
        assert np.abs(r["first"] + mean).max() <= bound
        moved = np.abs(r["second"] - r["first"]).max()
        assert moved <= bound, f"a step of 3 samples moved the model by {moved:.3g}"
        np.testing.assert_array_equal(r["second"], results[0]["second"])


def _refused(node: Node, **options) -> str:
    x, y = _data()
    model = _model()
    try:
        Trainer(node, model, SGD(model.params, lr=0.1), x, y, batch_size=BATCH, **options)
    except ConfigError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize(("options", "message"), [
    ({"compression": "int3"}, "unknown compression 'int3'"),
    ({"compression": "int8", "average_every": 4}, "local SGD"),
])
def test_bad_compression_settings_are_refused(options, message):
    assert message in run_local(_refused, 1, kwargs=options, timeout=60)[0]
