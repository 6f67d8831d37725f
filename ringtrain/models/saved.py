"""Load a saved model and run it; export it as a float or int8 model file.

:func:`load_model` takes a model file (``.safetensors``, float or int8), a checkpoint
(``ckpt-*.npz``) or a run directory (its newest checkpoint) and returns a
:class:`SavedModel`: the numpy model, its :class:`~.versions.Version`, and ``predict``. An
int8 file is dequantised on load (weights ``q * scale``), so it runs on any numpy.

:func:`export_model` writes a model file whose parent is the version it was made from.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..train.checkpoint import content_hash, latest
from ..train.checkpoint import load as load_checkpoint
from ..train.nn import Dense, Sequential
from . import architecture
from .quantize import dequantize, quantize
from .tensorfile import ModelFileError, read_tensors, write_tensors
from .versions import MODEL_FORMAT, MODEL_SUFFIX, Version, checkpoint_version, tensors_hash

__all__ = ["QUANTIZATIONS", "SavedModel", "export_model", "load_model"]

QUANTIZATIONS = ("none", "int8")
FORMAT_VERSION = "1"
_SCALE = ".scale"  # an int8 weight "i.weight" has its scales in "i.weight.scale"


@dataclass(frozen=True, eq=False)
class SavedModel:
    """A model loaded from disk.

    Attributes:
        model: the numpy model, parameters loaded.
        version: which version it is.
        path: the file it came from.
        quantization: ``none`` or ``int8`` (dequantised to float32 on load).
    """

    model: Sequential
    version: Version
    path: Path
    quantization: str = "none"

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The model's outputs (logits) for a batch of shape (n, features)."""
        return self.model.forward(x)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The class of each row: the index of its largest output (int64)."""
        return np.argmax(self.forward(x), axis=1).astype(np.int64)


def load_model(path: str | os.PathLike[str]) -> SavedModel:
    """Load a model file, a checkpoint, or a run directory's newest checkpoint.

    Raises:
        ModelFileError: nothing to load there, a damaged or foreign file, a content hash
            that does not match, or a checkpoint without its architecture.
        CheckpointError: a damaged checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        newest = latest(path)
        if newest is None:
            raise ModelFileError("no checkpoint (ckpt-*.npz) in this run directory", path=path)
        path = newest
    if not path.exists():
        raise ModelFileError("no such model file", path=path)
    if path.suffix == ".npz":
        return _from_checkpoint(path)
    return _from_model_file(path)


def export_model(source: SavedModel, out: str | os.PathLike[str],
                 quantization: str = "none") -> tuple[Path, int]:
    """Write ``source`` as a model file; returns (path, size in bytes).

    With ``int8``, every Dense weight is stored as int8 with one float32 scale per output
    column; biases stay float32. The file's parent is ``source``'s content hash.

    Raises:
        ConfigError: an unknown quantization.
        ModelFileError: the file could not be written.
    """
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    out = Path(out)
    model = source.model
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in model.parameter_layout():
        size = math.prod(shape)
        value = model.params[offset:offset + size].reshape(shape)
        offset += size
        layer = model.layers[int(name.split(".")[0])]
        if quantization == "int8" and isinstance(layer, Dense) and name.endswith(".weight"):
            tensors[name], tensors[name + _SCALE] = quantize(value)
        else:
            tensors[name] = value.astype(np.float32) if quantization == "int8" else value
    digest = tensors_hash(tensors)
    version = Version(source.version.job, source.version.generation, source.version.step,
                      digest, source.version.content_hash)
    spec = architecture.describe(model)
    metadata = {"format": MODEL_FORMAT, "format_version": FORMAT_VERSION,
                "quantization": quantization, "layers": json.dumps(spec["layers"]),
                "dtype": "float32" if quantization == "int8" else spec["dtype"],
                "schema": model.schema_hash(), **version.metadata()}
    if out.suffix != MODEL_SUFFIX:
        raise ConfigError(f"a model file's name ends in {MODEL_SUFFIX}, got {out.name!r}")
    return out, write_tensors(out, tensors, metadata)


def _from_checkpoint(path: Path) -> SavedModel:
    state = load_checkpoint(path)
    metadata = dict(state.metadata)
    if "layers" not in metadata:
        raise ModelFileError("this checkpoint does not record its architecture (saved by a "
                             "ringtrain before model versions); it can resume training, "
                             "but not be loaded as a model", path=path)
    model = _build(metadata["layers"], metadata.get("dtype", "float32"), path)
    if state.params.shape != model.params.shape:
        raise ModelFileError(f"checkpoint holds {state.params.size} parameters, its "
                             f"architecture {model.num_params}", path=path)
    model.load_params(state.params)
    meta = {"generation": state.generation, "step": state.step,
            "content_hash": content_hash(state.params, state.optimizer_state),
            "metadata": metadata}
    return SavedModel(model, checkpoint_version(meta), path)


def _from_model_file(path: Path) -> SavedModel:
    tensors, metadata = read_tensors(path)
    if metadata.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"not a ringtrain model file (format {metadata.get('format')!r}, "
                             f"expected {MODEL_FORMAT!r})", path=path)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"model file format version {metadata.get('format_version')!r}, "
                             f"this ringtrain reads {FORMAT_VERSION}", path=path)
    version = Version.from_metadata(metadata, path)
    actual = tensors_hash(tensors)
    if actual != version.content_hash:
        raise ModelFileError(f"content hash mismatch: stored {version.content_hash}, "
                             f"computed {actual}", path=path)
    try:
        layers = json.loads(metadata.get("layers", ""))
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"layers metadata is not JSON: {exc}", path=path) from exc
    model = _build(layers, metadata.get("dtype", "float32"), path)
    quantization = metadata.get("quantization", "none")
    if quantization not in QUANTIZATIONS:
        raise ModelFileError(f"unknown quantization {quantization!r}", path=path)
    expected = {name for name, _ in model.parameter_layout()}
    scales = {name[:-len(_SCALE)] for name in tensors if name.endswith(_SCALE)}
    if set(tensors) - {n + _SCALE for n in scales} != expected or not scales <= expected:
        raise ModelFileError(f"tensors {sorted(tensors)} do not match the architecture's "
                             f"parameters {sorted(expected)}", path=path)
    flat = []
    for name, shape in model.parameter_layout():
        value = tensors[name]
        if name in scales:
            try:
                value = dequantize(value, tensors[name + _SCALE], model.dtype)
            except ConfigError as exc:
                raise ModelFileError(f"tensor {name!r}: {exc}", path=path) from exc
        if value.shape != shape or value.dtype.kind not in "f" + ("i" if name in scales else ""):
            raise ModelFileError(f"tensor {name!r} has shape {value.shape} ({value.dtype}), "
                                 f"the architecture needs {shape} floats", path=path)
        flat.append(np.asarray(value, dtype=model.dtype).ravel())
    model.load_params(np.concatenate(flat))
    return SavedModel(model, version, path, quantization)


def _build(layers: object, dtype: object, path: Path) -> Sequential:
    try:
        return architecture.build(layers, dtype)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise ModelFileError(f"bad architecture: {exc}", path=path) from exc
