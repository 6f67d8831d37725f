"""Model versions: which job, generation and step a saved model comes from, its content
hash, and the version it was made from (its parent).

Checkpoints record the version in their JSON ``meta`` (the Trainer writes ``job``,
``parent`` and the architecture into its metadata); model files in their ``__metadata__``.
A run directory's checkpoints chain from parent to child (each names the checkpoint saved or
resumed from before it), and an exported model names the checkpoint it was exported from.
:func:`list_versions` reads only headers, so listing a directory of large models is quick.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .tensorfile import ModelFileError, read_header

__all__ = ["MODEL_FORMAT", "Version", "VersionEntry", "checkpoint_version", "list_versions",
           "tensors_hash"]

MODEL_FORMAT = "ringtrain-model"
MODEL_SUFFIX = ".safetensors"
_CHECKPOINT_NAME = re.compile(r"^ckpt-(\d{12,})\.npz$")


@dataclass(frozen=True)
class Version:
    """One model version.

    Attributes:
        job: the job that trained it ("" when unknown: a checkpoint of an older ringtrain).
        generation: the membership generation it was saved in.
        step: global training steps behind it.
        content_hash: 16 hex digits over its content (a checkpoint: parameters and optimizer
            state; a model file: its tensors).
        parent: the content hash of the version it was made from ("" for none).
    """

    job: str
    generation: int
    step: int
    content_hash: str
    parent: str = ""

    def __str__(self) -> str:
        parent = f" parent {self.parent}" if self.parent else ""
        return (f"job {self.job or '?'} generation {self.generation} step {self.step} hash "
                f"{self.content_hash}{parent}")

    def metadata(self) -> dict[str, str]:
        """As text fields of a model file's metadata."""
        return {"job": self.job, "generation": str(self.generation), "step": str(self.step),
                "content_hash": self.content_hash, "parent": self.parent}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], path: Path) -> Version:
        """Read back :meth:`metadata`.

        Raises:
            ModelFileError: a field is missing or not a number where one is due.
        """
        try:
            return cls(metadata.get("job", ""), int(metadata["generation"]),
                       int(metadata["step"]), metadata["content_hash"],
                       metadata.get("parent", ""))
        except (KeyError, ValueError) as exc:
            raise ModelFileError(f"model file metadata lacks a version field: {exc!r}",
                                 path=path) from exc


@dataclass(frozen=True)
class VersionEntry:
    """A file of a run directory and the version it holds.

    Attributes:
        path: the file.
        version: its version.
        kind: ``checkpoint``, ``float32``/``float64`` (a model file) or ``int8``.
        size: the file's size in bytes.
    """

    path: Path
    version: Version
    kind: str
    size: int


def checkpoint_version(meta: Mapping[str, object]) -> Version:
    """The version recorded in a checkpoint's ``meta`` (see ``train.checkpoint``)."""
    extra = meta.get("metadata")
    extra = extra if isinstance(extra, dict) else {}
    return Version(str(extra.get("job", "")), int(meta["generation"]),  # type: ignore[arg-type]
                   int(meta["step"]), str(meta["content_hash"]),  # type: ignore[arg-type]
                   str(extra.get("parent") or ""))


def tensors_hash(tensors: Mapping[str, np.ndarray]) -> str:
    """16 hex digits of SHA-256 over the tensors in name order: name, dtype, shape, bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}\0{array.dtype.str}{list(array.shape)}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def list_versions(directory: str | os.PathLike[str]) -> list[VersionEntry]:
    """Every checkpoint and model file in ``directory`` with its version, by step then name.

    Files that are neither (or damaged) are skipped; read them with ``load_model`` to see why.

    Raises:
        ModelFileError: ``directory`` is not a directory.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelFileError("not a run directory", path=directory)
    found = []
    for path in sorted(directory.iterdir()):
        entry = _entry(path)
        if entry is not None:
            found.append(entry)
    return sorted(found, key=lambda e: (e.version.step, e.kind != "checkpoint", e.path.name))


def _entry(path: Path) -> VersionEntry | None:
    try:
        if _CHECKPOINT_NAME.match(path.name):
            with np.load(path, allow_pickle=False) as archive:
                meta = json.loads(str(archive["meta"]))
            return VersionEntry(path, checkpoint_version(meta), "checkpoint",
                                path.stat().st_size)
        if path.suffix == MODEL_SUFFIX:
            _, metadata, _ = read_header(path)
            if metadata.get("format") != MODEL_FORMAT:
                return None
            kind = "int8" if metadata.get("quantization") == "int8" else \
                metadata.get("dtype", "?")
            return VersionEntry(path, Version.from_metadata(metadata, path), kind,
                                path.stat().st_size)
    except Exception:  # noqa: BLE001 - a damaged file fails in zipfile, numpy or json alike
        return None
    return None
