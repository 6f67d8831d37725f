"""Atomic, self-verifying checkpoints of a training state, one ``.npz`` file each.

A checkpoint file ``ckpt-<step>.npz`` holds the flat parameters (``params``), every optimizer
array (``optimizer/<name>``) and one JSON string (``meta``) with the step, epoch, data
position, generation, optimizer scalars, the caller's metadata and a :func:`content_hash`
that :func:`load` verifies. Nothing is pickled; files load with ``allow_pickle=False``.

A save writes a hidden temporary file in the same directory, fsyncs it, renames it over the
final name with :func:`os.replace` and fsyncs the directory: a crash at any point leaves
either the old set of checkpoints or the new one, never a torn file under a checkpoint name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ringtrain.errors import RingtrainError

__all__ = ["CheckpointError", "TrainingState", "content_hash", "latest", "load", "save"]

logger = logging.getLogger(__name__)

FORMAT_NAME = "ringtrain-checkpoint"
FORMAT_VERSION = 1
_NAME_PATTERN = re.compile(r"^ckpt-(\d{12,})\.npz$")
_PARAMS_KEY = "params"
_META_KEY = "meta"
_OPTIMIZER_PREFIX = "optimizer/"


class CheckpointError(RingtrainError):
    """A checkpoint could not be written, or a file is not a valid, intact checkpoint.

    Attributes:
        path: the file or directory concerned.
    """

    def __init__(self, message: str, *, path: Path | str):
        self.path = Path(path)
        super().__init__(f"{message} ({self.path})")


@dataclass(frozen=True, eq=False)
class TrainingState:
    """Everything a node needs to resume training.

    Attributes:
        params: the model's flat parameter buffer (1-D float array).
        optimizer_state: the optimizer's ``state_dict()``: arrays, ints and floats.
        step: global steps completed.
        epoch: the training epoch of the data position.
        position: samples of that epoch's permutation already consumed.
        generation: the membership generation the state was produced in.
        metadata: anything else JSON can hold (e.g. the model's schema hash, the job name).
    """

    params: np.ndarray
    optimizer_state: Mapping[str, np.ndarray | int | float]
    step: int
    epoch: int
    position: int
    generation: int
    metadata: Mapping[str, Any] = field(default_factory=dict)


def content_hash(params: np.ndarray, optimizer_state: Mapping[str, np.ndarray | int | float]
                 ) -> str:
    """Return a 16-hex-digit SHA-256 prefix over the parameters and the optimizer state.

    Covers the params bytes, then each optimizer entry in key order: its name, and for an
    array its dtype, shape and bytes, for a number its JSON text. Equal hashes on two
    nodes mean bit-identical states.
    """
    digest = hashlib.sha256()
    _hash_array(digest, np.asarray(params))
    for name in sorted(optimizer_state):
        value = optimizer_state[name]
        digest.update(name.encode("utf-8") + b"\0")
        if isinstance(value, np.ndarray):
            _hash_array(digest, value)
        else:
            digest.update(json.dumps(_plain_number(name, value)).encode("ascii") + b"\0")
    return digest.hexdigest()[:16]


def save(directory: str | os.PathLike[str], state: TrainingState, *, keep: int | None = 3
         ) -> Path:
    """Write ``state`` atomically as ``directory/ckpt-<step>.npz``; keep the newest ``keep``.

    Args:
        directory: where checkpoints live; created if missing.
        state: what to save.
        keep: how many checkpoints to leave, counting this one (None keeps all). Those with
            lower steps are deleted once the new one is durable; the new one never is.

    Returns:
        the path written.

    Raises:
        CheckpointError: bad state or keep, or the file could not be written (the previous
            checkpoints are then untouched).
    """
    directory = Path(directory)
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise CheckpointError(f"keep must be a positive integer or None, got {keep!r}",
                              path=directory)
    arrays = _arrays_to_write(state, directory)
    final = directory / f"ckpt-{state.step:012d}.npz"
    temporary = directory / f".{final.name}.{os.getpid()}.tmp"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            with open(temporary, "wb") as handle:
                np.savez(handle, **arrays)  # type: ignore[arg-type]  # stubs: allow_pickle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _fsync_directory(directory)
    except OSError as exc:
        raise CheckpointError(f"could not write checkpoint for step {state.step}: {exc}",
                              path=final) from exc
    logger.info("saved checkpoint step=%d generation=%d to %s",
                state.step, state.generation, final)
    if keep is not None:
        _delete_older(directory, keep, spare=final)
    return final


def load(path: str | os.PathLike[str]) -> TrainingState:
    """Read a checkpoint and verify its content hash.

    Raises:
        CheckpointError: the file is missing, unreadable, not a ringtrain checkpoint, of an
            unknown format version, or its content does not match its hash.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            entries = {name: archive[name] for name in archive.files}
        meta = json.loads(str(entries.pop(_META_KEY)))
        params = entries.pop(_PARAMS_KEY)
    except Exception as exc:
        # A damaged file fails inside zipfile, numpy's header parser (tokenize, ast) or json
        # with many exception types; to the caller they all mean "not an intact checkpoint".
        raise CheckpointError(f"cannot read checkpoint: {exc!r}", path=path) from exc
    optimizer_arrays = {name[len(_OPTIMIZER_PREFIX):]: array for name, array in entries.items()
                        if name.startswith(_OPTIMIZER_PREFIX)}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError("not a ringtrain checkpoint: wrong format name", path=path)
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format version {meta.get('version')!r}, this ringtrain reads "
            f"{FORMAT_VERSION}", path=path)
    try:
        optimizer_state: dict[str, np.ndarray | int | float] = {
            **optimizer_arrays, **meta["optimizer_scalars"]}
        state = TrainingState(
            params=params,
            optimizer_state=optimizer_state,
            step=int(meta["step"]),
            epoch=int(meta["epoch"]),
            position=int(meta["position"]),
            generation=int(meta["generation"]),
            metadata=meta["metadata"],
        )
        stored_hash = meta["content_hash"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint metadata incomplete: {exc!r}", path=path) from exc
    actual_hash = content_hash(state.params, state.optimizer_state)
    if actual_hash != stored_hash:
        raise CheckpointError(
            f"checkpoint content hash mismatch: stored {stored_hash}, computed {actual_hash}",
            path=path)
    return state


def latest(directory: str | os.PathLike[str]) -> Path | None:
    """Return the checkpoint with the highest step in ``directory``, or None if there is none.

    Temporary files of interrupted saves are ignored.
    """
    checkpoints = _checkpoints_by_step(Path(directory))
    return checkpoints[-1] if checkpoints else None


def _arrays_to_write(state: TrainingState, directory: Path) -> dict[str, np.ndarray]:
    params = np.asarray(state.params)
    if params.ndim != 1 or not np.issubdtype(params.dtype, np.floating):
        raise CheckpointError(
            f"params must be a 1-D float array, got shape {params.shape} dtype {params.dtype}",
            path=directory)
    for name in ("step", "epoch", "position", "generation"):
        value = getattr(state, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise CheckpointError(f"{name} must be a non-negative integer, got {value!r}",
                                  path=directory)
    arrays = {_PARAMS_KEY: params}
    scalars: dict[str, int | float] = {}
    for name, value in state.optimizer_state.items():
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise CheckpointError(f"optimizer state {name!r} is an object array",
                                      path=directory)
            arrays[_OPTIMIZER_PREFIX + name] = value
        else:
            scalars[name] = _plain_number(name, value, path=directory)
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "step": int(state.step),
        "epoch": int(state.epoch),
        "position": int(state.position),
        "generation": int(state.generation),
        "optimizer_scalars": scalars,
        "metadata": dict(state.metadata),
        "content_hash": content_hash(params, state.optimizer_state),
    }
    try:
        meta_text = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"metadata is not JSON-serialisable: {exc}",
                              path=directory) from exc
    arrays[_META_KEY] = np.array(meta_text)
    return arrays


def _plain_number(name: str, value: object, path: Path | str = "<memory>") -> int | float:
    """Return an optimizer scalar as a Python int or float, which JSON round-trips exactly."""
    if isinstance(value, bool):
        raise CheckpointError(f"optimizer state {name!r} is a bool, not a number", path=path)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    raise CheckpointError(
        f"optimizer state {name!r} must be an array, int or float, got {type(value).__name__}",
        path=path)


def _hash_array(digest: Any, array: np.ndarray) -> None:
    header = f"{array.dtype.str}{list(array.shape)}\0"
    digest.update(header.encode("ascii"))
    digest.update(np.ascontiguousarray(array).tobytes())


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable. Platforms that cannot open a directory (Windows)
    # lack O_DIRECTORY; there the rename is as durable as the OS makes it.
    if not hasattr(os, "O_DIRECTORY"):
        return
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _checkpoints_by_step(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    found = [(int(match.group(1)), entry) for entry in directory.iterdir()
             if (match := _NAME_PATTERN.match(entry.name))]
    return [entry for _, entry in sorted(found)]


def _delete_older(directory: Path, keep: int, spare: Path) -> None:
    # ``spare`` is the checkpoint just written: never delete it, even if older ones with
    # higher steps exist (a run restarted from an earlier checkpoint).
    for old in _checkpoints_by_step(directory)[:-keep]:
        if old == spare:
            continue
        try:
            old.unlink()
        except OSError as exc:
            # A stale old checkpoint costs only disk space; the new one is already durable.
            logger.warning("could not delete old checkpoint %s: %s", old, exc)
