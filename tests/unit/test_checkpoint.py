"""ringtrain.train.checkpoint: round trip, atomic replacement, damage detection, retention."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from ringtrain.errors import RingtrainError
from ringtrain.train import checkpoint
from ringtrain.train.checkpoint import (
    CheckpointError,
    TrainingState,
    content_hash,
    latest,
    load,
    save,
)
from ringtrain.train.optim import SGD, Adam


def _state(step: int = 10, optimizer: str = "adam") -> TrainingState:
    rng = np.random.default_rng(step)
    params = rng.normal(size=257).astype(np.float32)
    make = Adam if optimizer == "adam" else SGD
    opt = make(params.copy(), lr=1e-3)
    opt.step(rng.normal(size=257).astype(np.float32))
    return TrainingState(params=params, optimizer_state=opt.state_dict(), step=step, epoch=2,
                         position=96, generation=4,
                         metadata={"schema_hash": "ab" * 32, "job": "digits"})


def _assert_same(got: TrainingState, want: TrainingState) -> None:
    assert got.params.dtype == want.params.dtype
    assert got.params.tobytes() == want.params.tobytes()
    assert set(got.optimizer_state) == set(want.optimizer_state)
    for key, value in want.optimizer_state.items():
        if isinstance(value, np.ndarray):
            assert got.optimizer_state[key].dtype == value.dtype
            np.testing.assert_array_equal(got.optimizer_state[key], value)
        else:
            assert got.optimizer_state[key] == value
            assert type(got.optimizer_state[key]) is type(value)
    assert (got.step, got.epoch, got.position, got.generation) == (
        want.step, want.epoch, want.position, want.generation)
    assert dict(got.metadata) == dict(want.metadata)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_round_trip_restores_everything(tmp_path, optimizer):
    state = _state(optimizer=optimizer)
    path = save(tmp_path, state)
    assert path == tmp_path / "ckpt-000000000010.npz"
    restored = load(path)
    _assert_same(restored, state)
    # The optimizer state loads straight back into an optimizer.
    make = Adam if optimizer == "adam" else SGD
    make(restored.params.copy(), lr=1.0).load_state_dict(restored.optimizer_state)


def test_content_hash_is_short_stable_and_sensitive():
    state = _state()
    digest = content_hash(state.params, state.optimizer_state)
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert digest == content_hash(state.params.copy(), dict(state.optimizer_state))
    flipped = state.params.copy()
    flipped.view(np.uint32)[100] ^= 1  # one bit of one parameter
    assert content_hash(flipped, state.optimizer_state) != digest
    changed_lr = {**state.optimizer_state, "lr": 2e-3}
    assert content_hash(state.params, changed_lr) != digest
    assert content_hash(state.params.astype(np.float64), state.optimizer_state) != digest


def test_latest_picks_the_highest_step_and_ignores_temporary_files(tmp_path):
    assert latest(tmp_path) is None
    assert latest(tmp_path / "missing") is None
    for step in (5, 120, 30):
        save(tmp_path, _state(step), keep=None)
    (tmp_path / ".ckpt-000000000999.npz.123.tmp").write_bytes(b"half a file")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert latest(tmp_path) == tmp_path / "ckpt-000000000120.npz"


def test_keep_retains_only_the_newest(tmp_path):
    for step in range(1, 7):
        save(tmp_path, _state(step), keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt-000000000005.npz", "ckpt-000000000006.npz"]


def test_keep_never_deletes_the_checkpoint_just_written(tmp_path):
    for step in (50, 60):
        save(tmp_path, _state(step), keep=2)
    written = save(tmp_path, _state(40), keep=2)  # a run restarted from an older state
    assert written.exists()


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    good = _state(1)
    save(tmp_path, good)

    def crash_mid_write(handle, **arrays):
        handle.write(b"PK\x03\x04 torn")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.np, "savez", crash_mid_write)
    with pytest.raises(CheckpointError, match="step 2"):
        save(tmp_path, _state(2))
    monkeypatch.undo()

    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000000000001.npz"]
    assert latest(tmp_path) == tmp_path / "ckpt-000000000001.npz"
    _assert_same(load(latest(tmp_path)), good)


def test_crash_before_the_rename_leaves_no_torn_file_under_the_final_name(tmp_path, monkeypatch):
    good = _state(7)
    save(tmp_path, good)

    def fail_replace(src, dst):
        raise OSError(5, "Input/output error")

    # Same step as the existing file: the old content must survive the failed overwrite.
    monkeypatch.setattr(checkpoint.os, "replace", fail_replace)
    with pytest.raises(CheckpointError):
        save(tmp_path, _state(7, optimizer="sgd"))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000000000007.npz"]
    _assert_same(load(tmp_path / "ckpt-000000000007.npz"), good)


def test_a_flipped_byte_is_detected(tmp_path):
    path = save(tmp_path, _state())
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load(path)


def test_a_truncated_file_is_detected(tmp_path):
    path = save(tmp_path, _state())
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(CheckpointError, match="cannot read"):
        load(path)


def test_params_that_do_not_match_the_stored_hash_are_detected(tmp_path):
    # A well-formed archive whose content was changed after hashing: only the hash can tell.
    path = save(tmp_path, _state())
    with np.load(path, allow_pickle=False) as archive:
        entries = {name: archive[name] for name in archive.files}
    entries["params"] = entries["params"] + np.float32(1e-3)
    with open(path, "wb") as handle:
        np.savez(handle, **entries)
    with pytest.raises(CheckpointError, match="hash mismatch"):
        load(path)


def test_foreign_and_pickled_files_are_refused(tmp_path):
    missing = tmp_path / "nothing.npz"
    with pytest.raises(CheckpointError):
        load(missing)
    pickled = tmp_path / "pickled.npz"
    with open(pickled, "wb") as handle:
        np.savez(handle, params=np.zeros(2), meta=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError):
        load(pickled)
    foreign = tmp_path / "foreign.npz"
    with open(foreign, "wb") as handle:
        np.savez(handle, params=np.zeros(2), meta=np.array(json.dumps({"format": "other"})))
    with pytest.raises(CheckpointError, match="format"):
        load(foreign)
    assert issubclass(CheckpointError, RingtrainError)


def test_bad_states_are_refused_before_anything_is_written(tmp_path):
    good = _state()
    bad_states = [
        TrainingState(good.params.reshape(1, -1), good.optimizer_state, 1, 0, 0, 0),
        TrainingState(good.params, good.optimizer_state, -1, 0, 0, 0),
        TrainingState(good.params, {"lr": "fast"}, 1, 0, 0, 0),
        TrainingState(good.params, {"lr": True}, 1, 0, 0, 0),
        TrainingState(good.params, good.optimizer_state, 1, 0, 0, 0, metadata={"x": object()}),
    ]
    for state in bad_states:
        with pytest.raises(CheckpointError):
            save(tmp_path / "out", state)
    with pytest.raises(CheckpointError):
        save(tmp_path / "out", good, keep=0)
    assert not (tmp_path / "out").exists()


def test_save_creates_the_directory_and_is_fsynced(tmp_path, monkeypatch):
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = save(tmp_path / "a" / "b", _state())
    assert Path(path).exists()
    assert len(synced) == 2  # the file, then its directory
