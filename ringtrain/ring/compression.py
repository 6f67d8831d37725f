"""Gradient compression codecs: pure numpy, no I/O.

A codec turns ``count`` floating values into a payload of bytes and back. The ring runner
(``collectives``) uses one per compressed all-reduce: in reduce-scatter every node encodes the
partial sums it sends and decodes what it receives into scratch space before adding it in;
in all-gather the owner of a chunk replaces its values by ``decode(encode(values))`` and every
other node decodes the very same payload bytes, so every node ends bit-identical.

    codec         payload of n values                      error
    fp16          n float16                                ~2^-11 relative, saturates at 65504
    int8          float32 scale, then n int8 (scale/127)   max|x| / 254 per segment
    int4          float32 scale, then n/2 bytes (scale/7)  max|x| / 14 per segment
    topk:R        k = ceil(R n) uint32 indices, k values   everything outside the k largest |x|

Error feedback: what a node's quantization left out is kept (:class:`Codec.residuals`, one
array per tensor key) and added to that node's next contribution, so over many calls nothing
is lost, only delayed. ``int8``, ``int4`` and ``topk`` use it by default, ``fp16`` does not
need it.
:meth:`Codec.encode_feedback` adds what earlier calls left out, encodes and records what this
call leaves out, all in one call; ``int8`` fuses the steps (no second decoding pass, no pass
over the whole buffer before the collective starts). A non-finite segment leaves a zero
residual: its NaN or Inf reaches every node through the result, and carried over it would
poison every later call.

Speed: the codecs run on every segment of every hop, so they avoid temporaries: work arrays
are per thread and reused (:func:`scratch`), ``int8`` quantizes in float32 with one
multiplication by the reciprocal of its scale, rounds in place and casts once.

Decoding is exact arithmetic on IEEE numbers (casts and one multiplication per value), so two
machines decode the same payload to the same bits. A payload is a peer's bytes: its length
is checked by the runner, and top-k indices are checked here (:class:`ProtocolError`).
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

from ..errors import ConfigError, ProtocolError

FP16_MAX = float(np.finfo(np.float16).max)
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32
SCALE_BYTES = 4  # int8, int4: one float32 scale in front of the values
INT4_LEVELS = 7.0  # int4 values are integers in [-7, 7] ...
INT4_ZERO = 8  # ... stored as nibbles in [1, 15] (8 is zero)
_INT4_PAIRS = np.array([[(b & 0x0F) - INT4_ZERO, (b >> 4) - INT4_ZERO] for b in range(256)],
                       np.float32)  # a byte's (low, high) levels
INDEX_DTYPE = np.dtype("<u4")
FLOATS = (np.dtype("float16"), np.dtype("float32"), np.dtype("float64"))
SCRATCH_LIMIT = 1 << 22  # elements: larger work arrays are allocated per call, not kept


class _Scratch(threading.local):
    """One reusable work array per dtype and thread."""

    def __init__(self) -> None:
        self.arrays: dict[np.dtype, np.ndarray] = {}


_SCRATCH = _Scratch()


def scratch(size: int, dtype: np.dtype | type) -> np.ndarray:
    """A work array of ``size`` elements (contents undefined), reused by later calls from this
    thread: a codec holds it only until it returns."""
    dtype = np.dtype(dtype)
    if size > SCRATCH_LIMIT:
        return np.empty(size, dtype)
    current = _SCRATCH.arrays.get(dtype)
    if current is None or current.size < size:
        current = _SCRATCH.arrays[dtype] = np.empty(size, dtype)
    return current[:size]


class Codec:
    """A lossy encoding of float segments, with per-tensor error-feedback state.

    Args:
        error_feedback: keep what quantization left out and add it to the next call.
    """

    name = "none"

    def __init__(self, error_feedback: bool = True):
        self.error_feedback = error_feedback
        self.residuals: dict[Any, np.ndarray] = {}

    def spec(self) -> str:
        """The codec as it appears in a collective's descriptor (nodes must agree on it)."""
        return self.name + ("+ef" if self.error_feedback else "")

    def payload_bytes(self, count: int, dtype: np.dtype) -> int:
        """The exact payload size of ``count`` values of ``dtype``."""
        raise NotImplementedError

    def encode(self, values: np.ndarray, out: np.ndarray) -> None:
        """Write the payload of ``values`` into ``out`` (uint8, ``payload_bytes`` long)."""
        raise NotImplementedError

    def decode(self, payload: np.ndarray, out: np.ndarray) -> None:
        """Write the values a payload (uint8) stands for into ``out`` (their dtype and count).

        Raises:
            ProtocolError: the payload cannot be a valid encoding of ``out.size`` values.
        """
        raise NotImplementedError

    def encode_feedback(self, values: np.ndarray, out: np.ndarray,
                        residual: np.ndarray | None = None, replace: bool = False) -> None:
        """Encode with error feedback: ``residual`` (like ``values``, same dtype) holds on entry
        what earlier calls left out of these elements, and on exit what this call leaves out.
        The payload encodes ``c = values + residual``; then ``residual = c - decode(payload)``
        (zeros where that is not finite). With ``replace``, ``values = decode(payload)``, bit
        for bit. Without ``residual`` this is :meth:`encode` (and the replacement)."""
        if residual is None:
            self.encode(values, out)
            if replace:
                decoded = scratch(values.size, values.dtype)
                self.decode(out, decoded)
                values[...] = decoded
            return
        corrected = np.add(values, residual, out=scratch(values.size, values.dtype))
        self.encode(corrected, out)
        self.decode(out, residual)
        if replace:
            values[...] = residual
        _left_out(corrected, residual, residual)

    def round_trip(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(payload, decode(payload)) of ``values``; for tests and the owner's chunk."""
        payload = np.empty(self.payload_bytes(values.size, values.dtype), np.uint8)
        self.encode(values, payload)
        decoded = np.empty_like(values)
        self.decode(payload, decoded)
        return payload, decoded

    def residual(self, key: Any, size: int, dtype: np.dtype) -> np.ndarray | None:
        """The error-feedback array of tensor ``key`` (zeros the first time), or None when
        error feedback is off. A key whose size or dtype changed starts again from zeros."""
        if not self.error_feedback:
            return None
        current = self.residuals.get(key)
        if current is None or current.size != size or current.dtype != dtype:
            current = self.residuals[key] = np.zeros(size, dtype=dtype)
        return current

    def __repr__(self) -> str:
        return f"<codec {self.spec()}>"


class Fp16(Codec):
    """Half precision on the wire: halves float32 traffic, quarters float64."""

    name = "fp16"

    def __init__(self, error_feedback: bool = False):
        super().__init__(error_feedback)

    def payload_bytes(self, count: int, dtype: np.dtype) -> int:
        return 2 * count

    def encode(self, values: np.ndarray, out: np.ndarray) -> None:
        half = out.view(np.float16)
        if values.dtype == np.float16:
            half[...] = values
        else:
            # clip first: a float32 beyond 65504 would become inf, which is not a rounding
            np.clip(values, -FP16_MAX, FP16_MAX, out=half, casting="unsafe")

    def decode(self, payload: np.ndarray, out: np.ndarray) -> None:
        if payload.size != 2 * out.size:
            raise ProtocolError("fp16 payload", f"{2 * out.size} bytes", f"{payload.size} bytes")
        out[...] = payload.view(np.float16)


class _Scaled(Codec):
    """Integers in [-``levels``, ``levels``] with one float32 scale per segment
    (max|x| / ``levels``), rounded to nearest; subclasses say how the integers are packed."""

    levels: float

    def encode(self, values: np.ndarray, out: np.ndarray) -> None:
        self.encode_feedback(values, out)

    def encode_feedback(self, values: np.ndarray, out: np.ndarray,
                        residual: np.ndarray | None = None, replace: bool = False) -> None:
        """Quantizes in one pass, then takes the decoded values from the rounded floats still
        in hand instead of decoding the payload again: the same float32 products as
        :meth:`decode`, so replaced values are bit for bit what every other node decodes."""
        scale_bytes, packed = out[:SCALE_BYTES], out[SCALE_BYTES:]
        if values.size == 0:
            scale_bytes.view("<f4")[0] = 0.0
            return
        corrected = values if residual is None else \
            np.add(values, residual, out=scratch(values.size, values.dtype))
        # two read-only passes instead of abs(): no temporary of the segment's size
        peak = max(float(corrected.max()), -float(corrected.min()))
        ratio = peak / self.levels  # a float64 segment's may be beyond float32: scale Inf
        scale = np.float32(math.inf) if ratio > FLOAT32_MAX else np.float32(ratio)
        scale_bytes.view("<f4")[0] = scale
        if not (math.isfinite(scale) and scale > 0):
            # all zeros, or too small for a float32 scale (decodes to zeros), or a NaN/Inf
            # (decodes to the non-finite scale everywhere, so every node sees it)
            self._pack_zeros(packed)
            if residual is not None:
                residual[...] = corrected if scale == 0 else 0
            if replace:
                values[...] = scale
            return
        # the residual is overwritten last: a float32 one doubles as the rounding work array
        rounded = residual if residual is not None and residual.dtype == np.float32 else \
            scratch(values.size, np.float32)
        if scale >= FLOAT32_TINY:
            # |corrected * (1 / scale)| <= levels (1 + 3 * 2^-24): rounds to at most levels
            np.multiply(corrected, np.float32(1.0) / scale, out=rounded, casting="same_kind")
        else:  # a subnormal scale: its reciprocal may overflow, and it is coarse, so clip
            np.divide(corrected, scale, out=rounded, casting="same_kind")
            np.clip(rounded, -self.levels, self.levels, out=rounded)
        np.rint(rounded, out=rounded)
        self._pack(rounded, packed)
        if residual is None and not replace:
            return
        decoded = np.multiply(rounded, scale, out=rounded)
        if values.dtype != decoded.dtype:
            decoded = decoded.astype(values.dtype)  # as decode() casts its float32 products
        if replace:
            # rint leaves -0.0 where decode() has +0.0: adding +0.0 makes the bits the same
            np.add(decoded, decoded.dtype.type(0), out=values)
        if residual is not None:
            np.subtract(corrected, decoded, out=residual)

    def _pack(self, rounded: np.ndarray, packed: np.ndarray) -> None:
        """Write the integers ``rounded`` holds (float32, in range) into ``packed``."""
        raise NotImplementedError

    def _pack_zeros(self, packed: np.ndarray) -> None:
        """Write integers that are all zero into ``packed``."""
        raise NotImplementedError


class Int8(_Scaled):
    """8-bit integers with one float32 scale per segment (max|x| / 127), rounded to nearest."""

    name = "int8"
    levels = 127.0

    def payload_bytes(self, count: int, dtype: np.dtype) -> int:
        return SCALE_BYTES + count

    def _pack(self, rounded: np.ndarray, packed: np.ndarray) -> None:
        packed.view(np.int8)[...] = rounded  # integers in [-127, 127]: the cast is exact

    def _pack_zeros(self, packed: np.ndarray) -> None:
        packed[...] = 0

    def decode(self, payload: np.ndarray, out: np.ndarray) -> None:
        if payload.size != SCALE_BYTES + out.size:
            raise ProtocolError("int8 payload", f"{SCALE_BYTES + out.size} bytes",
                                f"{payload.size} bytes")
        scale = payload[:SCALE_BYTES].view("<f4")[0]
        quantized = payload[SCALE_BYTES:].view(np.int8)
        if not math.isfinite(scale):
            out[...] = scale  # NaN or Inf everywhere: the non-finite input stays visible
        elif out.dtype == np.float32:
            np.copyto(out, quantized)  # two plain passes beat one buffered mixed-type one
            np.multiply(out, scale, out=out)
        else:
            np.multiply(quantized, scale, out=out, casting="unsafe")


class Int4(_Scaled):
    """4-bit integers, two to a byte, with one float32 scale per segment (max|x| / 7), rounded
    to nearest: an eighth of float32 traffic. Meant for DiLoCo's pseudo-gradient (Streaming
    DiLoCo sends its outer gradient in 4 bits) with error feedback."""

    name = "int4"
    levels = INT4_LEVELS

    def payload_bytes(self, count: int, dtype: np.dtype) -> int:
        return SCALE_BYTES + (count + 1) // 2

    def _pack(self, rounded: np.ndarray, packed: np.ndarray) -> None:
        # byte = (low + 8) + 16 (high + 8), in [17, 255]: exact in float32, cast once
        size, pairs = rounded.size, rounded.size // 2
        byte = np.multiply(rounded[1:2 * pairs:2], 16, out=np.empty(pairs, np.float32))
        byte += rounded[0:2 * pairs:2]
        byte += INT4_ZERO * 17
        packed[:pairs] = byte
        if size % 2:
            packed[pairs] = rounded[size - 1] + INT4_ZERO * 17  # the padding nibble is zero

    def _pack_zeros(self, packed: np.ndarray) -> None:
        packed[...] = INT4_ZERO * 0x11  # both nibbles zero

    def decode(self, payload: np.ndarray, out: np.ndarray) -> None:
        if payload.size != self.payload_bytes(out.size, out.dtype):
            raise ProtocolError("int4 payload", f"{self.payload_bytes(out.size, out.dtype)} "
                                f"bytes", f"{payload.size} bytes")
        scale = payload[:SCALE_BYTES].view("<f4")[0]
        if not math.isfinite(scale):
            out[...] = scale  # NaN or Inf everywhere: the non-finite input stays visible
            return
        # each byte's two levels from a table: one gather instead of five passes
        levels = np.take(_INT4_PAIRS, payload[SCALE_BYTES:], axis=0).reshape(-1)[:out.size]
        if out.dtype == np.float32:
            np.multiply(levels, scale, out=out)  # float32 products: every node decodes alike
        else:
            levels *= scale
            out[...] = levels


class TopK(Codec):
    """The ``ratio`` fraction of values largest in magnitude (at least one), as (index, value)
    pairs; the rest are zero.

    Args:
        ratio: fraction of values kept, in (0, 1].
    """

    name = "topk"

    def __init__(self, ratio: float = 0.01, error_feedback: bool = True):
        if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
            raise ConfigError(f"top-k ratio must be in (0, 1], got {ratio!r}")
        super().__init__(error_feedback)
        self.ratio = float(ratio)

    def spec(self) -> str:
        return f"topk:{self.ratio:g}" + ("+ef" if self.error_feedback else "")

    def kept(self, count: int) -> int:
        """How many values a segment of ``count`` keeps."""
        return min(count, max(1, math.ceil(self.ratio * count))) if count else 0

    def payload_bytes(self, count: int, dtype: np.dtype) -> int:
        return self.kept(count) * (INDEX_DTYPE.itemsize + np.dtype(dtype).itemsize)

    def encode(self, values: np.ndarray, out: np.ndarray) -> None:
        k = self.kept(values.size)
        if k == 0:
            return
        if k == values.size:
            indices = np.arange(k)
        else:
            indices = np.argpartition(np.abs(values), values.size - k)[values.size - k:]
            indices.sort()  # sorted indices: deterministic layout, friendly scatter
        index_bytes = k * INDEX_DTYPE.itemsize
        out[:index_bytes].view(INDEX_DTYPE)[...] = indices
        out[index_bytes:].view(values.dtype)[...] = values[indices]

    def decode(self, payload: np.ndarray, out: np.ndarray) -> None:
        k = self.kept(out.size)
        if payload.size != self.payload_bytes(out.size, out.dtype):
            raise ProtocolError("top-k payload", f"{self.payload_bytes(out.size, out.dtype)} "
                                f"bytes", f"{payload.size} bytes")
        out[...] = 0
        if k == 0:
            return
        index_bytes = k * INDEX_DTYPE.itemsize
        indices = payload[:index_bytes].view(INDEX_DTYPE)
        if int(indices.max()) >= out.size:
            raise ProtocolError("top-k index", f"below {out.size}", int(indices.max()))
        out[indices] = payload[index_bytes:].view(out.dtype)


def _left_out(values: np.ndarray, decoded: np.ndarray, residual: np.ndarray) -> None:
    """residual = values - decoded, with zeros where that is not finite."""
    np.subtract(values, decoded, out=residual)
    finite = np.isfinite(residual)
    if not finite.all():
        residual[~finite] = 0


def get_codec(spec: str | Codec | None) -> Codec | None:
    """A codec from its name: ``none``, ``fp16``, ``int8``, ``int4``, ``topk`` (1 %) or
    ``topk:RATIO``,
    optionally with ``+ef`` / ``-ef`` to force error feedback on or off; a :class:`Codec`
    passes through.

    Raises:
        ConfigError: an unknown name or a bad ratio.
    """
    if spec is None or isinstance(spec, Codec):
        return spec
    if not isinstance(spec, str):
        raise ConfigError(f"compression must be a codec name or a Codec, got {spec!r}")
    text, feedback = spec.strip().lower(), None
    for suffix, value in (("+ef", True), ("-ef", False)):
        if text.endswith(suffix):
            text, feedback = text[: -len(suffix)], value
    name, _, argument = text.partition(":")
    codec: Codec
    if name == "none" and not argument:
        return None
    if name == "fp16" and not argument:
        codec = Fp16()
    elif name == "int8" and not argument:
        codec = Int8()
    elif name == "int4" and not argument:
        codec = Int4()
    elif name == "topk":
        try:
            ratio = float(argument) if argument else 0.01
        except ValueError:
            raise ConfigError(f"top-k ratio must be a number, got {argument!r}") from None
        codec = TopK(ratio)
    else:
        raise ConfigError(f"unknown compression {spec!r}: use none, fp16, int8, int4, topk or "
                          f"topk:RATIO (optionally +ef or -ef)")
    if feedback is not None:
        codec.error_feedback = feedback
    return codec


def check_supported(codec: Codec, dtype: np.dtype, op: str) -> None:
    """Compression applies to float sums and means only.

    Raises:
        ConfigError: another dtype or op.
    """
    if np.dtype(dtype) not in FLOATS:
        raise ConfigError(f"compression {codec.spec()} needs float16/32/64 values, got {dtype}")
    if op not in ("sum", "mean"):
        raise ConfigError(f"compression {codec.spec()} works with op 'sum' or 'mean', got {op!r}")
