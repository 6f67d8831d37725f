"""Collectives: what each one computes. Building a collective is pure: it turns the caller's
arrays into a flat working buffer, a descriptor (what was called, with which shapes, dtype and
op), a ring plan and a finisher that turns the buffer back into the caller's result. The
:class:`~ringtrain.ring.runner.RingRunner` then executes the plan.

Agreement on shape and dtype: every data message carries the 8-byte digest of its sender's
descriptor, and the first message a node sends in a collective carries the descriptor itself.
A node checks the digest of every message before touching its payload, so mismatched data is
never combined. The node that sees a mismatch aborts the collective on every member (ABORT
names both nodes and both descriptors). Because completing a collective needs data that was
accepted across every link of the ring (see ``ring.broadcast_plan``), no node can complete a
collective that another node rejected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..comm.wire import canonical_json, digest_of, dtype_code
from ..errors import ConfigError, ProtocolError
from . import plan as ring
from .compression import Codec, check_supported

REDUCE_OPS: dict[str, np.ufunc] = {"sum": np.add, "mean": np.add, "max": np.maximum,
                                   "min": np.minimum}
NO_PLAN = ring.Plan((), ())  # a one-round all-reduce follows no ring plan


@dataclass
class Collective:
    """One collective, ready to run on a ring of ``world_size`` at ``rank``."""

    name: str
    descriptor: dict[str, Any]
    buffer: np.ndarray  # flat, contiguous, the node's own copy
    plan: ring.Plan
    combine: np.ufunc | None  # None: segments overwrite, never reduce
    finish: Callable[[np.ndarray], Any]
    compressed: Compressed | None = None  # how segments are encoded, if they are
    direct: bool = False  # small: one round of all-to-all instead of the ring plan
    digest: bytes = field(init=False)
    descriptor_frame: bytes = field(init=False)  # what the first message carries

    def __post_init__(self) -> None:
        self.descriptor_frame, self.digest = wire_form(self.descriptor)

    def compress_slow_links(self, slow: Sequence[bool], rank: int) -> None:
        """Compress only where the ring's links are slow: ``slow[r]`` tells whether rank r's
        link to its successor is. Reduce-scatter then encodes only over slow links (the
        partial sums on fast links stay exact); all-gather still travels encoded on every
        link, so that every member decodes the same bytes and ends bit-identical. With no
        slow link the collective runs uncompressed, and what earlier calls left out (the
        error-feedback residual) joins this result. Every member must pass the same."""
        compressed = self.compressed
        if compressed is None:
            return
        if not any(slow):
            if compressed.residual is not None:
                exact = self.buffer[:compressed.exact_from]
                np.add(exact, compressed.residual, out=exact)
                compressed.residual[...] = 0
            self.compressed = None
            return
        compressed.send_encoded = slow[rank]
        compressed.receive_encoded = slow[rank - 1]


WIRE_FORMS_KEPT = 256  # descriptors whose wire form is remembered (a training loop has few)
_wire_forms: dict[str, tuple[bytes, bytes]] = {}


def wire_form(descriptor: dict[str, Any]) -> tuple[bytes, bytes]:
    """(descriptor frame, digest) of a descriptor. A training loop calls the same few
    collectives again and again: their JSON and digest are computed once, by their
    ``repr`` (cheaper than both, and equal for equal descriptors built the same way)."""
    key = repr(descriptor)
    known = _wire_forms.get(key)
    if known is not None:
        return known
    shown = summary(descriptor)
    frame = canonical_json(shown)
    known = frame, digest_of(descriptor, frame if shown is descriptor else None)
    if len(_wire_forms) >= WIRE_FORMS_KEPT:
        _wire_forms.pop(next(iter(_wire_forms)))
    _wire_forms[key] = known
    return known


@dataclass
class Compressed:
    """How a compressed all-reduce encodes its segments (see ``compression``).

    Elements from ``exact_from`` on travel uncompressed (the weight of a weighted mean: a
    quantized sum of weights would skew every value). ``residual`` receives, element by
    element, what this node's encodings left out: the partial sums it sends in reduce-scatter
    and its own chunk in all-gather, each element exactly once, so the residuals of all nodes
    add up to (true sum - result). Adding them to the next call's contributions is error
    feedback that loses nothing over time.
    """

    codec: Codec
    exact_from: int
    gather_hop: int  # the owner's first all-gather send: it quantizes its own final chunk
    residual: np.ndarray | None  # None: no error feedback
    scratch: np.ndarray  # one segment of decoded values
    send_encoded: bool = True  # reduce-scatter encodes what we send (a slow outgoing link)
    receive_encoded: bool = True  # ... and what we receive (a slow incoming link)

    def cut(self, transfer: ring.Transfer) -> int:
        """Where a segment's encoded part ends and its exact part begins."""
        return min(max(transfer.start, self.exact_from), transfer.stop)

    def encodes(self, transfer: ring.Transfer, sending: bool) -> bool:
        """Whether a segment we send (or receive) travels encoded: always in all-gather,
        in reduce-scatter only over a compressed link."""
        if transfer.hop >= self.gather_hop:
            return True
        return self.send_encoded if sending else self.receive_encoded


_native_dtypes: dict[np.dtype, np.dtype] = {}  # dtype -> its native-order twin, if reducible
_dtype_names: dict[np.dtype, str] = {}  # of native reducible dtypes (numpy computes a name)


def _native(dtype: np.dtype) -> np.dtype:
    """``dtype`` in native byte order; ConfigError if the wire cannot carry it."""
    native = _native_dtypes.get(dtype)
    if native is not None:
        return native
    native = dtype.newbyteorder("=")
    try:
        dtype_code(native)
    except ProtocolError:
        # the caller's argument, not a peer's bytes: a ConfigError like every other bad argument
        raise ConfigError(f"dtype {native} cannot be reduced; use float16/32/64 or an "
                          f"(unsigned) integer of 8 to 64 bits") from None
    _native_dtypes[dtype] = native  # at most two per wire dtype: a small table
    _dtype_names[native] = native.name
    return native


def _flat_copy(arrays: Sequence[np.ndarray], extra: int = 0) -> tuple[np.ndarray, np.dtype]:
    dtypes = {np.dtype(a.dtype) for a in arrays}
    if len(dtypes) != 1:
        raise ConfigError(f"arrays of one collective must share a dtype, got "
                          f"{sorted(map(str, dtypes))}")
    dtype = _native(dtypes.pop())
    total = sum(a.size for a in arrays)
    buffer = np.empty(total + extra, dtype=dtype)
    offset = 0
    for a in arrays:
        buffer[offset:offset + a.size] = np.ravel(a)
        offset += a.size
    return buffer, dtype


def _unflatten(buffer: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    out, offset = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(buffer[offset:offset + size].reshape(shape))
        offset += size
    return out


def _as_arrays(arrays: Sequence[Any]) -> list[np.ndarray]:
    return [np.asarray(a) for a in arrays]


def _check_op(op: str, dtype: np.dtype, weight: float | None) -> None:
    if op not in REDUCE_OPS:
        raise ConfigError(f"op must be one of {sorted(REDUCE_OPS)}, got {op!r}")
    if op == "mean" and dtype.kind != "f":
        raise ConfigError(f"op 'mean' needs a floating dtype, got {dtype}; use op='sum'")
    if weight is not None:
        if op != "mean":
            raise ConfigError(f"weight is only meaningful with op='mean', got op={op!r}")
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"weight must be finite and >= 0, got {weight!r}")


def all_reduce(arrays: Sequence[Any], op: str, weight: float | None, rank: int, world_size: int,
               segment_elements: Callable[[np.dtype], int], codec: Codec | None = None,
               feedback_key: Any = None, owned: bool = False, direct_bytes: int = 0
               ) -> Collective:
    """Reduce a list of arrays (fused into one buffer) across the ring.

    With ``op="mean"`` and a ``weight``, each node's arrays are scaled by its weight and the
    sum is divided by the sum of the weights (which travels as one extra element of the
    buffer, so it costs no extra pass).

    With a ``codec`` (float sum or mean only), segments travel compressed; the result is the
    same on every node, within the codec's error of the exact reduction. With error feedback,
    the codec keeps this node's residual under ``feedback_key`` (default: the descriptor, i.e.
    the shapes, dtype and op) and adds it to the next call with that key.

    ``owned``: the caller hands over its arrays (a private copy): a single contiguous
    native-order array then becomes the working buffer itself, saving a copy of the whole
    gradient in time and memory.

    ``direct_bytes``: an uncompressed buffer of at most this many bytes (and one segment) is
    reduced in one round (see ``RingRunner._exchange``) instead of 2(N-1) ring hops: for
    small messages latency, not bandwidth, is what counts.
    """
    arrays = _as_arrays(arrays)
    if not arrays:
        raise ConfigError("all_reduce needs at least one array")
    weighted = weight is not None
    first = arrays[0]
    if (owned and len(arrays) == 1 and not weighted and first.flags.c_contiguous
            and first.flags.writeable and first.dtype.isnative and first.size > 0):
        buffer, dtype = first.reshape(-1), _native(first.dtype)
    else:
        buffer, dtype = _flat_copy(arrays, extra=1 if weighted else 0)
    _check_op(op, dtype, weight)
    shapes = [tuple(a.shape) for a in arrays]
    if weighted:
        np.multiply(buffer[:-1], dtype.type(weight), out=buffer[:-1])
        buffer[-1] = weight

    def finish(result: np.ndarray) -> list[np.ndarray]:
        if op == "mean":
            if weighted:
                total = result[-1]
                if not total > 0:
                    raise ConfigError("the weights of all nodes sum to 0: no weighted mean")
                result = result[:-1]
                np.divide(result, total, out=result)
            else:
                np.divide(result, dtype.type(world_size), out=result)
        return _unflatten(result, shapes)

    descriptor = {"collective": "all_reduce", "op": op, "dtype": _dtype_names[dtype],
                  "shapes": [list(s) for s in shapes], "weighted": weighted}
    elements = segment_elements(dtype)
    direct = codec is None and buffer.nbytes <= min(direct_bytes, elements * dtype.itemsize)
    if direct:
        descriptor["one_round"] = True  # members must agree on the algorithm, too
    plan = NO_PLAN if direct else ring.all_reduce_plan(rank, world_size, buffer.size, elements)
    if codec is None:
        return Collective("all_reduce", descriptor, buffer, plan, REDUCE_OPS[op], finish,
                          direct=direct)
    check_supported(codec, dtype, op)
    descriptor["compression"] = codec.spec()
    exact_from = buffer.size - 1 if weighted else buffer.size
    # a segment's payload must fit where its raw bytes would (the wire's size limit)
    largest = max(codec.payload_bytes(elements, dtype),
                  codec.payload_bytes(elements - 1, dtype) + dtype.itemsize)
    if largest > elements * dtype.itemsize:
        raise ConfigError(f"compression {codec.spec()} would make segments of {elements} "
                          f"{dtype} values larger ({largest} bytes), not smaller")
    residual = codec.residual(digest_of(descriptor) if feedback_key is None else feedback_key,
                              exact_from, dtype)
    if residual is not None and world_size == 1:
        # nothing is encoded on a ring of one: what earlier calls left out joins the result.
        # Otherwise each element's residual joins it when this node encodes that element
        # (exactly once: Codec.encode_feedback), which saves two passes over the buffer here.
        np.add(buffer[:exact_from], residual, out=buffer[:exact_from])
        residual[...] = 0
    compressed = Compressed(codec, exact_from, world_size - 1, residual,
                            np.empty(min(elements, buffer.size), dtype=dtype))
    return Collective("all_reduce", descriptor, buffer, plan, REDUCE_OPS[op], finish, compressed)


def reduce_scatter(array: Any, op: str, rank: int, world_size: int,
                   segment_elements: Callable[[np.dtype], int]) -> Collective:
    """Reduce a flattened array; rank r receives chunk r (``ring.chunk_bounds`` of its size)."""
    array = np.asarray(array)
    buffer, dtype = _flat_copy([array])
    _check_op(op, dtype, None)
    start, stop = ring.chunk_bounds(buffer.size, world_size)[rank]

    def finish(result: np.ndarray) -> np.ndarray:
        mine = result[start:stop]
        if op == "mean":
            np.divide(mine, dtype.type(world_size), out=mine)
        return mine

    descriptor = {"collective": "reduce_scatter", "op": op, "dtype": _dtype_names[dtype],
                  "shapes": [list(array.shape)]}
    plan = ring.reduce_scatter_plan(rank, world_size, buffer.size, segment_elements(dtype))
    return Collective("reduce_scatter", descriptor, buffer, plan, REDUCE_OPS[op], finish)


def all_gather(array: Any, rank: int, world_size: int,
               segment_elements: Callable[[np.dtype], int]) -> Collective:
    """Every node's array, stacked in rank order: shape (world_size, *array.shape)."""
    array = np.asarray(array)
    own, dtype = _flat_copy([array])
    buffer = np.empty(own.size * world_size, dtype=dtype)
    buffer[rank * own.size:(rank + 1) * own.size] = own
    descriptor = {"collective": "all_gather", "dtype": _dtype_names[dtype],
                  "shapes": [list(array.shape)]}
    plan = ring.all_gather_plan(rank, world_size, own.size, segment_elements(dtype))
    return Collective("all_gather", descriptor, buffer, plan, None,
                      lambda result: result.reshape((world_size, *array.shape)))


def broadcast(array: Any, root: int, rank: int, world_size: int,
              segment_elements: Callable[[np.dtype], int]) -> Collective:
    """The root's array on every node. Other nodes pass an array of the same shape and dtype
    (its values are ignored)."""
    array = np.asarray(array)
    if not 0 <= root < world_size:
        raise ConfigError(f"root must be a rank in [0, {world_size}), got {root}")
    buffer, dtype = _flat_copy([array])
    descriptor = {"collective": "broadcast", "root": root, "dtype": _dtype_names[dtype],
                  "shapes": [list(array.shape)]}
    plan = ring.broadcast_plan(rank, world_size, root, buffer.size, segment_elements(dtype))
    return Collective("broadcast", descriptor, buffer, plan, None,
                      lambda result: result.reshape(array.shape))


SHOWN_SHAPES = 8  # a descriptor of more arrays is abbreviated in messages and on the wire


def summary(descriptor: dict[str, Any]) -> dict[str, Any]:
    """The descriptor, with a long list of shapes cut to its first few plus the number of
    arrays and elements. Digests are always of the full descriptor; this is for people, and
    keeps the descriptor frame within ``wire.MAX_DESCRIPTOR_BYTES`` and ABORTs within
    ``wire.MAX_CONTROL_BYTES`` whatever the number of arrays fused."""
    shapes = descriptor.get("shapes")
    if not isinstance(shapes, list) or len(shapes) <= SHOWN_SHAPES or "arrays" in descriptor:
        return descriptor  # short, or a summary already (as a peer's descriptor frame is)
    elements = sum(math.prod(s) for s in shapes  # a peer's frame may hold anything
                   if isinstance(s, list) and all(type(d) is int for d in s))
    return {**descriptor, "shapes": [*shapes[:SHOWN_SHAPES], "..."], "arrays": len(shapes),
            "elements": elements}


def describe(descriptor: dict[str, Any]) -> str:
    """A descriptor as a person reads it: ``all_reduce(shapes=[(3,)], dtype=float32, op=sum)``."""
    name = descriptor.get("collective", "?")
    args = [f"{k}={v}" for k, v in sorted(summary(descriptor).items()) if k != "collective"]
    return f"{name}({', '.join(args)})"
