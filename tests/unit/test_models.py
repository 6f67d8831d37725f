"""Model files, int8 export, architectures and versions: pure, no sockets.

The int8 check trains the digits model for a few epochs (well under a second) and holds the
issue's goal: the int8 file within 1 point of float32 on the test split.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ringtrain.errors import ConfigError
from ringtrain.models import (
    ModelFileError,
    SavedModel,
    Version,
    export_model,
    list_versions,
    load_model,
    read_tensors,
    write_tensors,
)
from ringtrain.models.architecture import build, describe
from ringtrain.models.quantize import dequantize, quantize
from ringtrain.node.node import Node
from ringtrain.train.checkpoint import TrainingState, save
from ringtrain.train.datasets import load_digits
from ringtrain.train.nn import Dense, ReLU, Sequential, Tanh, accuracy, softmax_cross_entropy
from ringtrain.train.optim import SGD, Adam
from ringtrain.train.trainer import Trainer

VERSION = Version("job", 2, 40, "00112233445566ff", "")


def trained_digits_model(epochs: int = 10) -> tuple[Sequential, np.ndarray, np.ndarray]:
    train, test = load_digits().split(0.2, 0)
    model = Sequential(Dense(64, 64), ReLU(), Dense(64, 10), seed=0)
    optimizer = Adam(model.params, lr=0.01)
    for epoch in range(epochs):
        order = np.random.default_rng(epoch).permutation(len(train))
        for start in range(0, len(order), 64):
            rows = order[start:start + 64]
            _, grad = softmax_cross_entropy(model.forward(train.x[rows]), train.y[rows])
            model.backward(grad)
            optimizer.step(model.grads)
    return model, test.x, test.y


def test_architecture_round_trips_and_refuses_anything_else():
    model = Sequential(Dense(8, 5), Tanh(), Dense(5, 3), ReLU(), seed=3, dtype=np.float64)
    spec = describe(model)
    assert spec == {"layers": ["Dense(8, 5)", "Tanh()", "Dense(5, 3)", "ReLU()"],
                    "dtype": "float64"}
    rebuilt = build(spec["layers"], spec["dtype"])
    assert rebuilt.schema_hash() == model.schema_hash()
    for bad in (["__import__('os')"], ["Dense(8)"], ["Dense(0, 3)"], ["Conv(3, 3)"], [],
                ["Dense(8, 5)", "Dense(4, 2)"], "Dense(8, 5)", [7]):
        with pytest.raises(ConfigError):
            build(bad)
    with pytest.raises(ConfigError, match="dtype"):
        build(["ReLU()"], "int8")


def test_quantize_per_channel_error_is_half_a_step_per_column():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((50, 7)).astype(np.float32) * np.array(
        [1e-3, 1, 10, 100, 0, 1, 1], dtype=np.float32)
    weight[:, 5] = 0.0
    q, scale = quantize(weight)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (7,)
    assert np.abs(q).max() <= 127
    restored = dequantize(q, scale)
    # each column keeps its own precision: the tiny column is not crushed by the large one
    assert (np.abs(restored - weight) <= scale / 2 * (1 + 1e-6)).all()
    assert np.array_equal(restored[:, 5], np.zeros(50))
    with pytest.raises(ConfigError):
        quantize(np.full((2, 2), np.nan))
    with pytest.raises(ConfigError):
        dequantize(q, scale[:3])


def test_tensor_file_round_trip_and_safetensors_compatibility(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
               "b": np.array([-3, 4], dtype=np.int8), "c": np.zeros((0, 4), dtype=np.float64)}
    path = tmp_path / "t.safetensors"
    size = write_tensors(path, tensors, {"note": "hello"})
    assert size == path.stat().st_size
    back, metadata = read_tensors(path)
    assert metadata == {"note": "hello"}
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value)
    numpy_st = pytest.importorskip("safetensors.numpy")
    theirs = numpy_st.load_file(str(path))
    assert all(np.array_equal(theirs[n], tensors[n]) for n in tensors)
    other = tmp_path / "theirs.safetensors"
    numpy_st.save_file({"w": np.ones((3, 2), dtype=np.float32)}, str(other),
                       metadata={"k": "v"})
    mine, meta = read_tensors(other)
    assert meta == {"k": "v"} and np.array_equal(mine["w"], np.ones((3, 2)))


def _file(path, header, data=b""):
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize("header, data, message", [
    ({"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unknown dtype"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "outside"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "do not hold"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "v": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "overlap"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "shape"),
    ({"__metadata__": {"a": 1}}, b"", "text to text"),
    ([1, 2], b"", "not a JSON object"),
])
def test_damaged_tensor_files_are_refused_naming_the_entry(tmp_path, header, data, message):
    with pytest.raises(ModelFileError, match=message):
        read_tensors(_file(tmp_path / "bad.safetensors", header, data))


def test_a_huge_header_length_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(ModelFileError, match="header length"):
        read_tensors(path)


def test_float_export_reproduces_the_model_bit_for_bit(tmp_path):
    model = Sequential(Dense(6, 4), Tanh(), Dense(4, 3), seed=5)
    source = SavedModel(model, VERSION, tmp_path / "src")
    path, _ = export_model(source, tmp_path / "m.safetensors")
    loaded = load_model(path)
    x = np.random.default_rng(1).standard_normal((9, 6)).astype(np.float32)
    assert np.array_equal(loaded.forward(x), model.forward(x))
    assert loaded.version.parent == VERSION.content_hash
    assert (loaded.version.job, loaded.version.generation, loaded.version.step) == ("job", 2, 40)
    # a flipped byte in a tensor is caught by the content hash
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="content hash mismatch"):
        load_model(path)


def test_int8_export_is_smaller_and_within_one_point_on_the_digits(tmp_path):
    model, x, y = trained_digits_model()
    source = SavedModel(model, VERSION, tmp_path / "src")
    _, float_size = export_model(source, tmp_path / "f32.safetensors")
    path, int8_size = export_model(source, tmp_path / "i8.safetensors", "int8")
    loaded = load_model(path)
    assert loaded.quantization == "int8"
    base, quantised = accuracy(model.forward(x), y), accuracy(loaded.forward(x), y)
    print(f"\ndigits: float32 {float_size} bytes accuracy {base:.4f}; int8 {int8_size} bytes "
          f"accuracy {quantised:.4f}; {float_size / int8_size:.2f}x smaller")
    assert abs(quantised - base) <= 0.01
    assert float_size / int8_size > 3.0  # biases and scales stay float32 in a model this small


def test_checkpoints_carry_versions_in_a_chain(tmp_path):
    train, _ = load_digits().split(0.2, 0)
    model = Sequential(Dense(64, 16), Tanh(), Dense(16, 10), seed=1)
    with Node(insecure=True, job="chain") as node:
        trainer = Trainer(node, model, SGD(model.params, lr=0.1), train.x, train.y,
                          batch_size=32, checkpoint_dir=tmp_path, checkpoint_every=2)
        for _ in range(4):
            trainer.step()
    entries = list_versions(tmp_path)
    assert [(e.kind, e.version.step) for e in entries] == [("checkpoint", 2), ("checkpoint", 4)]
    first, second = entries[0].version, entries[1].version
    assert first.job == second.job == "chain"
    assert first.parent == "" and second.parent == first.content_hash
    loaded = load_model(tmp_path)  # a run directory: its newest checkpoint
    assert loaded.version == second
    assert np.array_equal(loaded.model.params, model.params)


def test_a_checkpoint_without_architecture_is_refused_with_the_reason(tmp_path):
    save(tmp_path, TrainingState(np.zeros(3, dtype=np.float32), {}, 1, 0, 0, 1, {}))
    with pytest.raises(ModelFileError, match="does not record its architecture"):
        load_model(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="no checkpoint"):
        load_model(tmp_path / "empty")
    with pytest.raises(ModelFileError, match="no such model file"):
        load_model(tmp_path / "missing.safetensors")


def test_an_int8_file_runs_with_numpy_alone(tmp_path):
    """examples/numpy_only_inference.py imports numpy and nothing of ringtrain; run in a
    process with ringtrain made unimportable, it gives load_model's predictions."""
    import subprocess
    import sys
    from pathlib import Path

    model, x, _ = trained_digits_model(epochs=2)
    path, _ = export_model(SavedModel(model, VERSION, tmp_path), tmp_path / "m.safetensors",
                           "int8")
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "ringtrain.py").write_text("raise ImportError('numpy only here')\n")
    script = Path(__file__).parents[2] / "examples" / "numpy_only_inference.py"
    done = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "x.npy")],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    printed = np.array([int(line) for line in done.stdout.split()])
    assert np.array_equal(printed, load_model(path).predict(x))
