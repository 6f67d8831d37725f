"""Tensors in a file a device with only numpy can read: the safetensors layout.

A file is an 8-byte little-endian header length N, N bytes of JSON, then the raw tensors.
The JSON maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets into the data after the header) and ``__metadata__`` to a string-to-string map.
The same files load with the ``safetensors`` library (tests check that both ways); reading
needs nothing but numpy and json, and nothing in a file is ever executed or unpickled.

A header is bounded (:data:`MAX_HEADER_BYTES`) and checked entry by entry: known dtype,
integer shape, offsets inside the data, tensors neither overlapping nor leaving gaps. A bad
file raises :class:`ModelFileError` naming the file and the entry.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import RingtrainError

__all__ = ["ModelFileError", "read_header", "read_tensors", "write_tensors"]

MAX_HEADER_BYTES = 16 << 20
_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
           "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I8": np.dtype("i1"),
           "U8": np.dtype("u1")}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_ALIGN = 8  # the header is padded with spaces so the data starts 8-byte aligned


class ModelFileError(RingtrainError):
    """A model file could not be written, or is not an intact model file.

    Attributes:
        path: the file concerned.
    """

    def __init__(self, message: str, *, path: str | os.PathLike[str]):
        self.path = Path(path)
        super().__init__(f"{message} ({self.path})")


def write_tensors(path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray],
                  metadata: Mapping[str, str]) -> int:
    """Write ``tensors`` (in name order) and ``metadata`` atomically; returns the file size.

    Raises:
        ModelFileError: a dtype the format has no code for, a non-text metadata value, or
            the file could not be written.
    """
    path = Path(path)
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ModelFileError("metadata keys and values must be text", path=path)
    blobs, offset = [], 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        dtype = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
        if dtype not in _CODES:
            raise ModelFileError(f"tensor {name!r} has dtype {array.dtype}, which the format "
                                 f"cannot hold", path=path)
        blob = np.ascontiguousarray(array, dtype=dtype).tobytes()
        header[name] = {"dtype": _CODES[dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % _ALIGN)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(len(text).to_bytes(8, "little"))
            handle.write(text)
            for blob in blobs:
                handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise ModelFileError(f"could not write the model file: {exc}", path=path) from exc
    return 8 + len(text) + offset


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensor entries, metadata, where the data starts) of a file, reading only its header.

    Raises:
        ModelFileError: unreadable, or the header is not a valid one.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 2 <= size <= MAX_HEADER_BYTES:
                raise ModelFileError(f"header length {size} is not in [2, "
                                     f"{MAX_HEADER_BYTES}]: not a model file", path=path)
            raw = handle.read(size)
            total = os.fstat(handle.fileno()).st_size
    except OSError as exc:
        raise ModelFileError(f"cannot read the model file: {exc}", path=path) from exc
    if len(raw) != size:
        raise ModelFileError(f"file ends inside its {size}-byte header", path=path)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"header is not JSON: {exc}", path=path) from exc
    if not isinstance(header, dict):
        raise ModelFileError("header is not a JSON object", path=path)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ModelFileError("__metadata__ is not a map of text to text", path=path)
    _check_entries(header, total - 8 - size, path)
    return header, metadata, 8 + size


def read_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors by name, metadata) of a file; arrays are read-only, native byte order.

    Raises:
        ModelFileError: unreadable, or not a valid file.
    """
    entries, metadata, start = read_header(path)
    try:
        with open(path, "rb") as handle:
            handle.seek(start)
            data = handle.read()
    except OSError as exc:
        raise ModelFileError(f"cannot read the model file: {exc}", path=path) from exc
    tensors = {}
    for name, entry in entries.items():
        begin, end = entry["data_offsets"]
        array = np.frombuffer(data, dtype=_DTYPES[entry["dtype"]], offset=begin,
                              count=(end - begin) // _DTYPES[entry["dtype"]].itemsize)
        tensors[name] = array.reshape(entry["shape"]).astype(
            _DTYPES[entry["dtype"]].newbyteorder("="), copy=False)
    return tensors, metadata


def _check_entries(entries: dict[str, object], data_bytes: int, path: Path) -> None:
    spans = []
    for name, entry in entries.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ModelFileError(f"tensor {name!r}: entry must hold dtype, shape and "
                                 f"data_offsets", path=path)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPES:
            raise ModelFileError(f"tensor {name!r}: unknown dtype {dtype!r}; known: "
                                 f"{sorted(_DTYPES)}", path=path)
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ModelFileError(f"tensor {name!r}: shape {shape!r} is not a list of "
                                 f"non-negative integers", path=path)
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise ModelFileError(f"tensor {name!r}: data_offsets {offsets!r} outside the "
                                 f"{data_bytes} bytes of data", path=path)
        if offsets[1] - offsets[0] != math.prod(shape) * _DTYPES[dtype].itemsize:
            raise ModelFileError(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes do not "
                                 f"hold shape {shape} of {dtype}", path=path)
        spans.append((offsets[0], offsets[1], name))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise ModelFileError(f"tensor {name!r} starts at byte {begin}, expected {at} "
                                 f"(tensors must neither overlap nor leave gaps)", path=path)
        at = end
    if at != data_bytes:
        raise ModelFileError(f"tensors end at byte {at} of {data_bytes} bytes of data",
                             path=path)
