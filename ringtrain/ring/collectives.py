"""Collectives: what each one computes, and the runner that moves a plan's segments.

Building a collective is pure: it turns the caller's arrays into a flat working buffer, a
descriptor (what was called, with which shapes, dtype and op), a ring plan and a finisher that
turns the buffer back into the caller's result. The :class:`RingRunner` then executes the plan:
it sends the plan's first segments, and for every segment that arrives from the predecessor it
checks the header, reduces or copies the payload into the buffer with a numpy ufunc
(``out=``, in place, no per-element Python) and forwards the same region to the successor.

Agreement on shape and dtype: every data message carries the 8-byte digest of its sender's
descriptor, and the first message a node sends in a collective carries the descriptor itself.
A node checks the digest of every message before touching its payload, so mismatched data is
never combined. The node that sees a mismatch aborts the collective on every member (ABORT
names both nodes and both descriptors). Because completing a collective needs data that was
accepted across every link of the ring (see ``ring.broadcast_plan``), no node can complete a
collective that another node rejected.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..comm.mailbox import Mailbox, Message
from ..comm.shm import SharedMemoryLanes
from ..comm.transport import Transport
from ..comm.wire import (
    FLAG_DESCRIPTOR,
    FLAG_SHM,
    HEADER_SIZE,
    Header,
    MessageKind,
    canonical_json,
    decode_control,
    digest_of,
    dtype_code,
    encode_control,
)
from ..errors import (
    CollectiveError,
    CollectiveTimeout,
    ConfigError,
    MismatchError,
    PeerFailedError,
    ProtocolError,
    TransportError,
)
from ..membership.protocol import View
from ..observe.recorder import FlightRecorder
from . import plan as ring
from .compression import Codec, check_supported, get_codec

log = logging.getLogger(__name__)

PROGRESS_FACTOR = 8.0  # progress deadline = this x the smoothed longest gap between segments
REDUCE_OPS: dict[str, np.ufunc] = {"sum": np.add, "mean": np.add, "max": np.maximum,
                                   "min": np.minimum}
TRACK_BYTES = 64 * 1024  # smaller segments are copied by pyzmq anyway; larger ones are tracked
NO_PLAN = ring.Plan((), ())  # a one-round all-reduce follows no ring plan
LANE_POLL = 0.0005  # seconds between looks at a full shared-memory lane or door
SERVICE_INTERVAL = 0.005  # seconds between membership turns while a collective moves data
PROBE_SEGMENT_BYTES = 256 * 1024  # a link probe's segments: this size, or segment_bytes if less


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


class RingRunner:
    """Runs collectives of one node over its transport. Not thread-safe: one caller thread.

    The progress deadline (how long the runner waits for the next segment before blaming a
    member) adapts: it is ``PROGRESS_FACTOR`` times the smoothed longest wait between segments
    of recent collectives, kept between ``progress_floor`` and ``progress_cap``.

    Args:
        transport: the node's sockets; links are named by peer node id.
        mailbox: where validated messages wait.
        node_id: this node's id.
        job: the 64-bit job id stamped on every message.
        progress_floor, progress_cap: bounds of the adaptive progress deadline, seconds.
        service: the node's membership work, called from the wait loop at most every
            ``SERVICE_INTERVAL`` seconds; returns None, or (why, suspect) to abort the
            collective because a member failed.
        poll_interval: longest single wait, so ``service`` runs at least about this often.
        lanes: shared-memory lanes to successors on this host, or None (TCP only).
    """

    def __init__(self, transport: Transport, mailbox: Mailbox, node_id: str, job: int,
                 progress_floor: float, progress_cap: float,
                 service: Callable[[View], tuple[str, str | None] | None],
                 poll_interval: float, lanes: SharedMemoryLanes | None = None):
        self.transport = transport
        self.mailbox = mailbox
        self.node_id = node_id
        self.job = job
        self.progress_floor = progress_floor
        self.progress_cap = progress_cap
        self.service = service
        self.poll_interval = poll_interval
        self.lanes = lanes
        self.progress_timeout = progress_cap
        self._slowest_wait = 0.0  # smoothed longest gap between segments, seconds
        self.bytes_sent = 0
        self.messages_sent = 0
        self.stage = "idle"  # for hang diagnostics: what the runner is waiting for
        # observe: counters and the flight recorder (ringtrain.observe.recorder) --------------
        self.messages_received = 0
        self.bytes_out: dict[str, int] = {}  # payload bytes sent to each peer
        self.bytes_in: dict[str, int] = {}  # payload bytes received from each peer
        self.waiting: dict[str, Any] = {}  # structured self.stage: from / to whom, counts
        self.recorder = FlightRecorder(node_id)
        self._codecs: dict[str, Codec] = {}
        # peer -> time.monotonic() of its last accepted segment: a sign of life. A busy link's
        # send queue is full of segments, so heartbeats on it are dropped; the data is not.
        self.heard: dict[str, float] = {}
        self._service_due = 0.0  # time.monotonic() of the next membership turn

    def codec(self, compression: str | Codec | None) -> Codec | None:
        """The codec for a ``compression`` argument: a name gives this node's one codec of
        that name, so its error-feedback state lasts from call to call; a :class:`Codec`
        is used as it is."""
        if compression is None or isinstance(compression, Codec):
            return compression
        if compression not in self._codecs:
            codec = get_codec(compression)
            if codec is None:
                return None
            self._codecs[compression] = codec
        return self._codecs[compression]

    def segment_elements(self, dtype: np.dtype) -> int:
        """How many elements of ``dtype`` fit in one segment."""
        return max(1, self.transport.settings.segment_bytes // np.dtype(dtype).itemsize)

    def run(self, collective: Collective, view: View, sequence: int, deadline: float,
            step: int = 0) -> Any:
        """Execute ``collective`` as collective number ``sequence`` of ``view``.

        Raises:
            MismatchError: members called different collectives, shapes or dtypes.
            PeerFailedError: a member stopped sending or receiving, or sent garbage.
            CollectiveTimeout: ``deadline`` passed.
        """
        record = self.recorder.collective_started(
            collective.name, collective.digest, collective.buffer.nbytes, view.generation,
            sequence, step, view.rank, view.members, self._counters)
        if view.world_size == 1:
            self.recorder.collective_finished(record)
            return collective.finish(collective.buffer)
        try:
            if collective.direct:
                self._exchange(collective, view, sequence, deadline, step)
            else:
                self._move(collective, view, sequence, deadline, step)
        except BaseException as exc:
            self.recorder.collective_finished(record, exc)
            if self.lanes is not None:  # its slots may hold segments nobody will release
                self.lanes.reset(view.members[ring.successor(view.rank, view.world_size)])
            raise
        finally:
            self.stage = "idle"
            self.waiting = {}
            self.mailbox.retire(view.generation, sequence)
        self.recorder.collective_finished(record)
        return collective.finish(collective.buffer)

    def _counters(self) -> tuple[int, int, dict[str, int], dict[str, int], dict[str, Any]]:
        """What the flight recorder reads when a collective starts, ends, or is looked at."""
        return (self.messages_sent, self.messages_received, self.bytes_out, self.bytes_in,
                self.waiting)

    def _header(self, collective: Collective, view: View, sequence: int, step: int,
                transfer: ring.Transfer, with_descriptor: bool, shared: bool = False) -> Header:
        dtype, nbytes = _wire_shape(collective, transfer, sending=True)
        flags = (FLAG_DESCRIPTOR if with_descriptor else 0) | (FLAG_SHM if shared else 0)
        return Header(kind=MessageKind.DATA, job=self.job, generation=view.generation,
                      sequence=sequence, sender=view.rank, step=step, hop=transfer.hop,
                      chunk=transfer.chunk, segment=transfer.segment, dtype=dtype,
                      flags=flags, digest=collective.digest, nbytes=nbytes)

    def _move(self, collective: Collective, view: View, sequence: int, deadline: float,
              step: int) -> None:
        plan, buffer = collective.plan, collective.buffer
        successor = view.members[ring.successor(view.rank, view.world_size)]
        predecessor = view.members[ring.predecessor(view.rank, view.world_size)]
        predecessor_rank = ring.predecessor(view.rank, view.world_size)
        descriptor_frame = collective.descriptor_frame
        # what to send next, with the payload to forward unchanged (compressed all-gather)
        pending: deque[tuple[ring.Transfer, Any]] = deque((t, None) for t in plan.first_sends)
        trackers = []
        described = False
        received = 0
        last_progress = time.monotonic()
        longest_gap = 0.0
        progress_deadline = last_progress + self.progress_timeout
        where = f"{collective.name} #{sequence} of generation {view.generation}"
        # a successor on this host reads our segments from shared memory (see shm.py)
        lane = self.lanes.outbound(successor, view.generation) if (
            collective.compressed is None and self.lanes is not None
            and self.lanes.reaches(successor)) else None
        # segments arrive in plan order only if all take one path: the door (lane references,
        # or every message fits a datagram) or all ZeroMQ
        spin = self.transport.settings.spin_seconds if self._local(predecessor) else 0.0
        largest = max((r.transfer.stop - r.transfer.start for r in plan.receives), default=0)
        door = lane is not None or (self.lanes is not None and self.lanes.door_takes(
            successor, HEADER_SIZE + largest * buffer.itemsize + len(descriptor_frame)))
        while received < len(plan.receives) or pending:
            # 1. send as much as the successor's queue (or lane) takes
            lane_full = False
            while pending:
                transfer, forward = pending[0]
                header = self._header(collective, view, sequence, step, transfer, not described,
                                      shared=lane is not None)
                if lane is not None:
                    payload = lane.write(buffer[transfer.start:transfer.stop])
                    if payload is None:
                        lane_full = True
                        break
                    big = False
                elif collective.compressed is None:
                    payload = buffer[transfer.start:transfer.stop]
                    big = header.nbytes >= TRACK_BYTES
                else:
                    # a fresh array or a received frame, never our buffer: no need to track
                    payload = forward if forward is not None else \
                        _encode(collective, transfer)
                    big = False
                frames = [header.pack(), payload]
                if not described:
                    frames.append(descriptor_frame)
                try:
                    sent = self._send(successor, frames, big, door)
                except TransportError as exc:
                    raise PeerFailedError(f"{where}: cannot send to successor {successor}: {exc}",
                                          peer=successor, generation=view.generation,
                                          collective=sequence) from exc
                if sent is False:
                    lane_full = door and self._local(successor)
                    break
                if lane is not None:
                    lane.commit()
                if big:
                    trackers.append(sent)
                described = True
                pending.popleft()
                self.bytes_sent += header.nbytes
                self.messages_sent += 1
                self.bytes_out[successor] = self.bytes_out.get(successor, 0) + header.nbytes
                now = time.monotonic()
                longest_gap = max(longest_gap, now - last_progress)
                last_progress, progress_deadline = now, now + self.progress_timeout
            # 2. take in every segment that has arrived
            while received < len(plan.receives):
                message = self.mailbox.next_data(view.generation, sequence)
                if message is None:
                    break
                expected = plan.receives[received]
                forward = self._accept(collective, view, sequence, message, expected,
                                       predecessor, predecessor_rank)
                received += 1
                if expected.then is not None:
                    pending.append((expected.then, forward))
                now = time.monotonic()
                longest_gap = max(longest_gap, now - last_progress)
                last_progress, progress_deadline = now, now + self.progress_timeout
            if received == len(plan.receives) and not pending:
                break
            self._check_abandoned(view, sequence, where)
            if received < len(plan.receives) and self.mailbox.has_data(view.generation,
                                                                        sequence):
                continue  # membership work took in our data: use it before waiting
            # 3. wait for traffic, bounded by both deadlines
            now = time.monotonic()
            if now >= deadline:
                raise CollectiveTimeout(f"{where} missed its deadline "
                                        f"({received}/{len(plan.receives)} segments received, "
                                        f"{len(pending)} waiting to be sent)",
                                        generation=view.generation, collective=sequence)
            if now >= progress_deadline:
                if pending:
                    # we had data for the successor all along and it took none: it is stuck,
                    # whatever our predecessor did (which may only be waiting on us)
                    culprit, what = successor, "stopped accepting data"
                else:
                    culprit, what = predecessor, "sent nothing"
                raise PeerFailedError(f"{where}: {culprit} {what} for "
                                      f"{self.progress_timeout:.1f} s "
                                      f"({received}/{len(plan.receives)} segments received)",
                                      peer=culprit, generation=view.generation,
                                      collective=sequence)
            if spin and not pending and now < last_progress + spin:
                self._yield_and_look()  # the predecessor is on this host: its data is due now
                continue
            self.stage = (f"{where}: {received}/{len(plan.receives)} segments received from "
                          f"{predecessor}, {len(pending)} waiting for {successor}")
            self.waiting = {"from": predecessor if received < len(plan.receives) else None,
                            "to": successor if pending else None, "received": received,
                            "expected": len(plan.receives), "unsent": len(pending)}
            # a full lane frees up without a message telling us: look again soon
            poll = LANE_POLL if lane_full else self.poll_interval
            self.mailbox.pump(min(deadline, progress_deadline, now + poll) - now,
                              writable=successor if pending and not lane_full else None,
                              links=self._links_due(now))
        self._learn_gap(longest_gap)
        # the caller may change the buffer once we return: wait until libzmq let go of it
        for tracker in trackers:
            remaining = deadline - time.monotonic()
            try:
                tracker.wait(max(remaining, 0.001))
            except Exception as exc:  # zmq.NotDone: the successor never took the data
                raise PeerFailedError(f"{where}: successor {successor} did not take the last "
                                      f"segments", peer=successor, generation=view.generation,
                                      collective=sequence) from exc

    def take_turn(self) -> bool:
        """Whether a membership turn is due (they come at most every ``SERVICE_INTERVAL``
        while collectives flow, in the runner's waits and between collectives alike); if
        so, the next one is due that much later."""
        now = time.monotonic()
        if now < self._service_due:
            return False
        self._service_due = now + SERVICE_INTERVAL
        return True

    def _yield_and_look(self) -> None:
        """Wait for data due within microseconds without sleeping: give the core to whoever
        is runnable (the sender, typically), then take in what arrived
        (``Settings.spin_seconds``: a sleep and its wake-up cost more)."""
        os.sched_yield()
        self.mailbox.pump(0.0, links=False)

    def _links_due(self, now: float) -> bool:
        """Whether a wait should also watch the outgoing links: their traffic (replies to
        membership) is only handled at a membership turn, so until one is due a wait
        watches only where data comes in, which costs fewer system calls."""
        return now >= self._service_due

    def _local(self, peer: str) -> bool:
        """Whether ``peer`` is on this host (its door and lanes free up with no message
        to wake us: a blocked send there is retried every ``LANE_POLL``)."""
        return self.lanes is not None and self.lanes.reaches(peer)

    def _send(self, peer: str, frames: list, track: bool = False, door: bool = True) -> Any:
        """Send a DATA message: through ``peer``'s door when ``door`` allows it, the peer is
        on this host and the message fits a datagram, else over ZeroMQ (see
        ``Transport.try_send``). A door and a ZeroMQ link do not keep order between them:
        messages that must arrive in order go all through one (``door=False`` for a
        stream whose larger messages take ZeroMQ)."""
        lanes = self.lanes
        if door and lanes is not None and lanes.reaches(peer) and lanes.door_takes(
                peer, sum(memoryview(f).nbytes for f in frames)):
            return lanes.send(peer, frames)
        return self.transport.try_send(peer, frames, track=track)

    def _learn_gap(self, gap: float) -> None:
        """Adapt the progress deadline to the gaps this ring really has."""
        smoothed = 0.8 * self._slowest_wait + 0.2 * gap
        self._slowest_wait = gap if self._slowest_wait == 0 else smoothed
        self.progress_timeout = min(self.progress_cap,
                                    max(self.progress_floor, PROGRESS_FACTOR * self._slowest_wait))

    def _accept(self, collective: Collective, view: View, sequence: int, message: Message,
                expected: ring.Receive, predecessor: str, predecessor_rank: int) -> Any:
        """Check a segment and take it into the buffer. Returns the payload to forward
        unchanged, when the segment is compressed and only copied (all-gather), else None."""
        header = message.header
        where = f"{collective.name} #{sequence} of generation {view.generation}"
        self._check_digest(collective, view, sequence, message)
        if message.origin != predecessor or header.sender != predecessor_rank:
            raise PeerFailedError(f"{where}: data from {message.origin} (rank {header.sender}), "
                                  f"but only the predecessor {predecessor} sends to this node",
                                  peer=message.origin, generation=view.generation,
                                  collective=sequence)
        transfer = expected.transfer
        got = (header.hop, header.chunk, header.segment, header.nbytes,
               header.dtype)
        want = (transfer.hop, transfer.chunk, transfer.segment,
                *reversed(_wire_shape(collective, transfer, sending=False)))
        if got != want:
            raise PeerFailedError(f"{where}: {predecessor} sent (hop, chunk, segment, nbytes, "
                                  f"dtype) = {got}, expected {want}", peer=predecessor,
                                  generation=view.generation, collective=sequence)
        release = None
        if header.flags & FLAG_SHM:
            try:
                if collective.compressed is not None or self.lanes is None:
                    raise ProtocolError("flags", "no shared-memory reference here",
                                        "FLAG_SHM", predecessor)
                shared, release = self.lanes.receive(predecessor, message.payload,
                                                     header.nbytes)
                parts = [shared]
            except ProtocolError as exc:
                raise PeerFailedError(f"{where}: {predecessor} sent a bad shared-memory "
                                      f"reference: {exc}", peer=predecessor,
                                      generation=view.generation, collective=sequence) from exc
        elif collective.compressed is not None:
            try:
                return _decode(collective, expected, message.payload)
            except ProtocolError as exc:
                raise PeerFailedError(f"{where}: {predecessor} sent a bad compressed segment "
                                      f"(hop {transfer.hop}, chunk {transfer.chunk}, segment "
                                      f"{transfer.segment}): {exc}", peer=predecessor,
                                      generation=view.generation, collective=sequence) from exc
        else:
            parts = message.payload_parts  # pieces of whole elements: no need to join them
        region = collective.buffer[transfer.start:transfer.stop]
        for part in parts:
            incoming = np.frombuffer(part, dtype=collective.buffer.dtype)
            target, region = region[:incoming.size], region[incoming.size:]
            if expected.reduce:
                collective.combine(target, incoming, out=target)
            else:
                target[...] = incoming
        if release is not None:
            release()
        return None

    def _check_abandoned(self, view: View, sequence: int, where: str) -> None:
        """Raise if a member aborted this collective, or the ring is changing under it."""
        abort = self.mailbox.aborts.get((view.generation, sequence))
        if abort is not None:
            raise _error_from_abort(abort, where, view.generation, sequence)
        if not self.take_turn():
            return  # membership work between every two segments would cost more than it saves
        failure = self.service(view)
        if failure is not None:
            why, suspect = failure
            raise PeerFailedError(f"{where} abandoned: {why}", peer=suspect,
                                  generation=view.generation, collective=sequence)

    def _check_digest(self, collective: Collective, view: View, sequence: int,
                      message: Message) -> None:
        """Raise MismatchError, naming both calls, if a member's segment belongs to another
        collective. Checked before anything else in a message is trusted or used."""
        if message.origin not in view.members:
            return  # not a member: the caller rejects it
        self.heard[message.origin] = time.monotonic()
        self.messages_received += 1
        self.bytes_in[message.origin] = self.bytes_in.get(message.origin, 0) + \
            message.header.nbytes
        if message.header.digest == collective.digest:
            return
        theirs = "a different collective"
        if message.descriptor is not None:
            try:
                theirs = describe(decode_control(message.descriptor, {}, message.origin,
                                                 "descriptor"))
            except ProtocolError:
                pass
        raise MismatchError(
            f"collective mismatch in generation {view.generation}, collective {sequence}: "
            f"node {self.node_id} (rank {view.rank}) called {describe(collective.descriptor)} "
            f"but node {message.origin} (rank {view.members.index(message.origin)}) called "
            f"{theirs}", generation=view.generation, collective=sequence)

    def _exchange(self, collective: Collective, view: View, sequence: int, deadline: float,
                  step: int) -> None:
        """A small all-reduce in one round: send the whole buffer to every other member, take
        one buffer from each, and add them all in rank order, so every member computes the
        very same sum. Latency is one hop instead of 2(N-1)."""
        buffer = collective.buffer
        where = f"{collective.name} #{sequence} of generation {view.generation}"
        whole = ring.Transfer(0, view.rank, 0, 0, buffer.size)
        header = self._header(collective, view, sequence, step, whole, True)
        frames = [header.pack(), buffer.tobytes(), collective.descriptor_frame]
        unsent = [m for m in view.members if m != self.node_id]
        contributions: dict[int, np.ndarray] = {view.rank: buffer}  # unchanged until the end
        progress_deadline = time.monotonic() + self.progress_timeout
        same_host = all(self._local(m) for m in unsent)
        spin_until = time.monotonic() + self.transport.settings.spin_seconds \
            if same_host else 0.0
        while unsent or len(contributions) < view.world_size:
            for member in list(unsent):
                try:
                    sent = self._send(member, frames)
                except TransportError as exc:
                    raise PeerFailedError(f"{where}: cannot send to {member}: {exc}",
                                          peer=member, generation=view.generation,
                                          collective=sequence) from exc
                if sent is not False:
                    unsent.remove(member)
                    self.bytes_sent += buffer.nbytes
                    self.messages_sent += 1
                    self.bytes_out[member] = self.bytes_out.get(member, 0) + buffer.nbytes
                    progress_deadline = time.monotonic() + self.progress_timeout
            while (message := self.mailbox.next_data(view.generation, sequence)) is not None:
                rank = self._accept_whole(collective, view, sequence, message, contributions)
                contributions[rank] = np.frombuffer(message.payload, dtype=buffer.dtype)
                progress_deadline = time.monotonic() + self.progress_timeout
            if not unsent and len(contributions) == view.world_size:
                break
            self._check_abandoned(view, sequence, where)
            if self.mailbox.has_data(view.generation, sequence):
                continue  # membership work took in our data: use it before waiting
            now = time.monotonic()
            if now >= min(deadline, progress_deadline):
                missing = unsent or [m for r, m in enumerate(view.members)
                                     if r not in contributions]
                error = CollectiveTimeout if now >= deadline else PeerFailedError
                raise error(f"{where}: nothing from (or to) {', '.join(missing)} for "
                            f"{self.progress_timeout:.1f} s", generation=view.generation,
                            collective=sequence, **({} if error is CollectiveTimeout
                                                    else {"peer": missing[0]}))
            if not unsent and spin_until > now:
                self._yield_and_look()  # every peer is on this host: their data is due now
                continue
            self.stage = (f"{where} (one round): {len(contributions)}/{view.world_size} "
                          f"contributions, {len(unsent)} still to send")
            missing = [m for r, m in enumerate(view.members) if r not in contributions]
            self.waiting = {"from": missing[0] if missing else None,
                            "to": unsent[0] if unsent else None,
                            "received": len(contributions) - 1,
                            "expected": view.world_size - 1, "unsent": len(unsent)}
            local = bool(unsent) and self._local(unsent[0])
            poll = LANE_POLL if local else self.poll_interval
            self.mailbox.pump(min(deadline, progress_deadline, now + poll) - now,
                              writable=unsent[0] if unsent and not local else None,
                              links=self._links_due(now))
        total = collective.combine(contributions[0], contributions[1])
        for rank in range(2, view.world_size):
            collective.combine(total, contributions[rank], out=total)
        buffer[...] = total

    def _accept_whole(self, collective: Collective, view: View, sequence: int,
                      message: Message, contributions: dict[int, np.ndarray]) -> int:
        """Check one member's whole contribution to a one-round all-reduce; its rank."""
        header = message.header
        where = f"{collective.name} #{sequence} of generation {view.generation}"
        self._check_digest(collective, view, sequence, message)
        rank = view.members.index(message.origin) if message.origin in view.members else -1
        got = (header.sender, header.hop, header.chunk, header.segment, header.nbytes,
               header.dtype)
        want = (rank, 0, rank, 0, collective.buffer.nbytes, dtype_code(collective.buffer.dtype))
        if rank < 0 or rank in contributions or got != want or header.flags & FLAG_SHM:
            raise PeerFailedError(f"{where}: {message.origin} sent (sender, hop, chunk, "
                                  f"segment, nbytes, dtype) = {got}, expected {want}"
                                  + (" (a second time)" if rank in contributions else ""),
                                  peer=message.origin, generation=view.generation,
                                  collective=sequence)
        return rank

    def measure_link(self, view: View, sequence: int, deadline: float, nbytes: int,
                     shift: int) -> float:
        """Measure the link from this node to the member ``shift`` ranks on.

        Every member streams ``nbytes`` to rank + ``shift`` and answers the stream of rank -
        ``shift`` with an empty acknowledgement once all of it is in: so every member sends
        one stream and receives one, the load a ring puts on its links. The rate is
        ``nbytes`` over the time from the first segment sent to the acknowledgement (one
        round trip more than the transfer, which on a LAN is noise).

        Returns:
            bytes per second.
        """
        n, rank = view.world_size, view.rank
        target, source = view.members[(rank + shift) % n], view.members[(rank - shift) % n]
        segment = min(PROBE_SEGMENT_BYTES, self.transport.settings.segment_bytes)
        collective = Collective("link_probe", {"collective": "link_probe", "bytes": nbytes,
                                               "shift": shift},
                                np.zeros(min(nbytes, segment), dtype=np.uint8),
                                NO_PLAN, None, lambda result: None)
        segments = ring.segment_bounds(0, nbytes, segment)
        where = f"link probe #{sequence} of generation {view.generation}"
        sent = received = 0
        answered, rate = False, 0.0
        started = time.monotonic()
        progress_deadline = started + self.progress_timeout
        while True:
            while sent < len(segments):
                lo, hi = segments[sent]
                header = self._header(collective, view, sequence, 0,
                                      ring.Transfer(shift, 0, sent, lo, hi), sent == 0)
                frames = [header.pack(), collective.buffer[:hi - lo]]
                if sent == 0:
                    frames.append(collective.descriptor_frame)
                if self._probe_send(target, frames, where, view, sequence, door=False) is False:
                    break
                sent += 1
            if received == len(segments) and not answered:
                ack = self._header(collective, view, sequence, 0, ring.Transfer(shift, 1, 0, 0, 0),
                                   False)
                answered = self._probe_send(source, [ack.pack(), b""], where, view,
                                            sequence) is not False
            while (message := self.mailbox.next_data(view.generation, sequence)) is not None:
                progress_deadline = time.monotonic() + self.progress_timeout
                if self._accept_probe(collective, view, sequence, message, segments, received,
                                      sent == len(segments) and not rate, target, source):
                    rate = nbytes / max(time.monotonic() - started, 1e-9)
                else:
                    received += 1
            if answered and rate:
                break
            self._check_abandoned(view, sequence, where)
            if self.mailbox.has_data(view.generation, sequence):
                continue
            now = time.monotonic()
            if now >= min(deadline, progress_deadline):
                error = CollectiveTimeout if now >= deadline else PeerFailedError
                culprit = source if received < len(segments) else target
                raise error(f"{where}: {received}/{len(segments)} segments in from {source}, "
                            f"{sent}/{len(segments)} out to {target}"
                            + ("" if rate else ", not acknowledged"), generation=view.generation,
                            collective=sequence, **({} if error is CollectiveTimeout
                                                    else {"peer": culprit}))
            self.stage = (f"{where}: {sent}/{len(segments)} segments to {target}, "
                          f"{received}/{len(segments)} from {source}")
            self.mailbox.pump(min(deadline, progress_deadline, now + LANE_POLL) - now)
        return rate

    def _probe_send(self, peer: str, frames: list, where: str, view: View, sequence: int,
                    door: bool = True) -> Any:
        try:
            return self._send(peer, frames, door=door)
        except TransportError as exc:
            raise PeerFailedError(f"{where}: cannot send to {peer}: {exc}", peer=peer,
                                  generation=view.generation, collective=sequence) from exc

    def _accept_probe(self, collective: Collective, view: View, sequence: int, message: Message,
                      segments: list[tuple[int, int]], received: int, acknowledgeable: bool,
                      target: str, source: str) -> bool:
        """Check one message of a link probe: the next segment of ``source``'s stream, or
        (when ``acknowledgeable``) ``target``'s acknowledgement of ours (returns True)."""
        header, origin = message.header, message.origin
        self._check_digest(collective, view, sequence, message)
        n = view.world_size
        shift = (view.members.index(target) - view.rank) % n
        acknowledgement = header.chunk == 1
        got = (origin, header.sender, header.hop, header.chunk, header.segment, header.nbytes)
        if acknowledgement:
            want = (target, view.members.index(target), shift, 1, 0, 0)
            ok = acknowledgeable
        else:
            lo, hi = segments[min(received, len(segments) - 1)]
            want = (source, view.members.index(source), shift, 0, received, hi - lo)
            ok = received < len(segments)
        if not ok or got != want or header.flags & FLAG_SHM:
            raise PeerFailedError(f"{collective.name} #{sequence} of generation "
                                  f"{view.generation}: {origin} sent (origin, sender, hop, chunk, "
                                  f"segment, nbytes) = {got}, expected {want}", peer=origin,
                                  generation=view.generation, collective=sequence)
        return acknowledgement

    def abort_everyone(self, view: View, sequence: int, exc: CollectiveError,
                       suspect: str | None) -> None:
        """Tell every member that this collective failed here (and whom we blame), so
        nobody waits for it."""
        if (view.generation, sequence) in self.mailbox.aborts:
            return  # somebody else's abort: they have told everyone already
        kind = "mismatch" if isinstance(exc, MismatchError) else "failure"
        body = {"kind": kind, "message": str(exc), "node": self.node_id, "peer": suspect or ""}
        payload = encode_control(body)
        header = Header(kind=MessageKind.ABORT, job=self.job, generation=view.generation,
                        sequence=sequence, sender=view.rank, nbytes=len(payload)).pack()
        for member in view.members:
            if member == self.node_id:
                continue
            try:
                self.transport.try_send(member, [header, payload])
            except TransportError:
                pass  # best effort: that member will time out instead


U1 = dtype_code(np.dtype("u1"))  # compressed payloads travel as bytes


def _wire_shape(collective: Collective, transfer: ring.Transfer, sending: bool
                ) -> tuple[int, int]:
    """(wire dtype code, payload bytes) of one segment of ``collective`` that we send (or
    receive)."""
    buffer, compressed = collective.buffer, collective.compressed
    if compressed is None or not compressed.encodes(transfer, sending):
        return dtype_code(buffer.dtype), (transfer.stop - transfer.start) * buffer.itemsize
    cut = compressed.cut(transfer)
    return U1, (compressed.codec.payload_bytes(cut - transfer.start, buffer.dtype)
                + (transfer.stop - cut) * buffer.itemsize)


def _encode(collective: Collective, transfer: ring.Transfer) -> np.ndarray:
    """The payload of one compressed segment we send: encoded values, then the exact ones.

    Adds what earlier calls left out of these values and records what this encoding leaves
    out, in the residual. In the owner's first all-gather hop the owner's own values become
    exactly what every other node will decode.
    """
    compressed, buffer = collective.compressed, collective.buffer
    assert compressed is not None
    if not compressed.encodes(transfer, sending=True):  # partial sums over a fast link
        return buffer[transfer.start:transfer.stop].copy()
    codec, cut = compressed.codec, compressed.cut(transfer)
    values = buffer[transfer.start:cut]
    size = codec.payload_bytes(values.size, buffer.dtype)
    exact = buffer[cut:transfer.stop]
    payload = np.empty(size + exact.nbytes, dtype=np.uint8)
    residual = None if compressed.residual is None else compressed.residual[transfer.start:cut]
    codec.encode_feedback(values, payload[:size], residual,
                          replace=transfer.hop == compressed.gather_hop)
    payload[size:] = exact.view(np.uint8)
    return payload


def _decode(collective: Collective, expected: ring.Receive, payload: memoryview) -> Any:
    """Take one received compressed segment into the buffer; returns the payload when it is
    to be forwarded unchanged (all-gather)."""
    compressed, buffer, transfer = collective.compressed, collective.buffer, expected.transfer
    assert compressed is not None
    if not compressed.encodes(transfer, sending=False):  # partial sums over a fast link
        region = buffer[transfer.start:transfer.stop]
        collective.combine(region, np.frombuffer(payload, dtype=buffer.dtype), out=region)
        return None
    codec, cut = compressed.codec, compressed.cut(transfer)
    values = buffer[transfer.start:cut]
    data = np.frombuffer(payload, dtype=np.uint8)
    size = codec.payload_bytes(values.size, buffer.dtype)
    exact = buffer[cut:transfer.stop]
    incoming_exact = data[size:].view(buffer.dtype)
    if expected.reduce:
        decoded = compressed.scratch[:values.size]
        codec.decode(data[:size], decoded)
        collective.combine(values, decoded, out=values)
        collective.combine(exact, incoming_exact, out=exact)
        return None
    codec.decode(data[:size], values)
    exact[...] = incoming_exact
    return payload if expected.then is not None else None


def _error_from_abort(abort: Message, where: str, generation: int, sequence: int
                      ) -> CollectiveError:
    try:
        body = decode_control(abort.payload, {"kind": str, "message": str, "node": str,
                                              "peer": str}, abort.origin, "abort")
    except ProtocolError as exc:
        return PeerFailedError(f"{where} aborted by {abort.origin}: {exc}", peer=abort.origin,
                               generation=generation, collective=sequence)
    if body["kind"] == "mismatch":
        return MismatchError(body["message"], generation=generation, collective=sequence)
    return PeerFailedError(f"{where} aborted by {abort.origin}: {body['message']}",
                           peer=body["peer"] or None, generation=generation, collective=sequence)

