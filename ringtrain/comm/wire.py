"""The wire format: a fixed 72-byte header frame, then the payload in its own frame(s).

Every message between nodes is a ZeroMQ multipart message::

    [header (72 bytes)] [payload (header.nbytes bytes)] [descriptor (optional)]

A DATA payload may come cut into 2 to ``MAX_PAYLOAD_FRAMES`` non-empty frames whose lengths
add up to ``nbytes`` (:func:`split_payload`): libzmq encrypts and decrypts each frame as one
CURVE message, so a segment sent in pieces is encrypted piece by piece while the first
pieces are already on the wire, and decrypted piece by piece as they arrive, instead of
waiting for a whole segment at each end. Every piece holds whole elements, so the receiver
reduces them where they are (:func:`payload_frames`), without joining them first. Control
payloads and shared-memory references are one frame.

The header is little-endian, packed, no padding:

    offset size field       meaning
    0      4    magic       b"RTRN"
    4      2    version     PROTOCOL_VERSION; a peer speaking another version is refused
    6      1    kind        MessageKind
    7      1    dtype       DTYPE_CODES; 0 for control messages (payload is UTF-8 JSON)
    8      2    flags       FLAG_DESCRIPTOR: a third frame carries the sender's descriptor;
                            FLAG_SHM: the payload frame is a SHM_REF to the data in a
                            shared-memory lane (DATA between same-host peers, see shm.py)
    10     2    hop         ring hop index within a collective (see ring.py plans)
    12     4    chunk       chunk index the payload belongs to
    16     4    segment     segment index within the chunk
    20     4    sender      sender's rank in the generation (cross-checked with its identity)
    24     8    digest      digest of the collective's descriptor (shape, dtype, op)
    32     8    job         64-bit job id (hash of the job name): other jobs' messages are dropped
    40     8    generation  membership generation; stale generations are dropped (fencing)
    48     8    step        training step the message belongs to (0 outside training)
    56     8    sequence    collective sequence number within the generation
    64     8    nbytes      payload length in bytes

Payloads are raw array bytes (DATA), or for FLAG_SHM a 48-byte reference (lane name as 32
hex digits, slot u32, reserved u32, ticket u64) to ``nbytes`` bytes in a lane, or UTF-8
JSON objects (control kinds). Nothing here ever executes a peer's bytes: no pickle, no eval;
JSON is parsed into plain dicts and checked field by field by the caller. Decoding validates
every field and raises :class:`ProtocolError` naming the field, what was expected and what
came.
"""

from __future__ import annotations

import enum
import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ProtocolError

MAGIC = b"RTRN"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("<4sHBBHHIII8sQQQQQ")
HEADER_SIZE = HEADER.size  # 72
FLAG_DESCRIPTOR = 0x1
FLAG_SHM = 0x2
KNOWN_FLAGS = FLAG_DESCRIPTOR | FLAG_SHM
SHM_NAME_BYTES = 32
SHM_REF = struct.Struct(f"<{SHM_NAME_BYTES}sIIQ")  # lane name (hex), slot, reserved, ticket
MAX_CONTROL_BYTES = 64 * 1024
MAX_DESCRIPTOR_BYTES = 16 * 1024
MAX_PAYLOAD_FRAMES = 16
MAX_CONTROL_INT = 2**63 - 1  # integers in control bodies fit the header's u64 fields


class MessageKind(enum.IntEnum):
    """What a message is for."""

    DATA = 1  # a segment of a collective's buffer
    ABORT = 2  # the sender aborted a collective; JSON says why
    HELLO = 3  # a node introduces itself (JSON: node id, job, protocol, endpoint)
    WELCOME = 4  # reply to HELLO on the same connection (JSON: node id)
    PROPOSE = 5  # a membership proposal (JSON: generation, members)
    HEARTBEAT = 6  # application liveness and progress (JSON: state)
    LEAVE = 7  # the sender leaves the ring gracefully
    LEDGER = 16  # revoked and admitted devices (JSON: fingerprints), see node.gate


DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype("<f2"),
    2: np.dtype("<f4"),
    3: np.dtype("<f8"),
    4: np.dtype("i1"),
    5: np.dtype("<i2"),
    6: np.dtype("<i4"),
    7: np.dtype("<i8"),
    8: np.dtype("u1"),
    9: np.dtype("<u2"),
    10: np.dtype("<u4"),
    11: np.dtype("<u8"),
}
CODE_OF_DTYPE: dict[np.dtype, int] = {dt: code for code, dt in DTYPE_CODES.items()}


def dtype_code(dtype: np.dtype) -> int:
    """The wire code of a numpy dtype; raises ProtocolError for dtypes the wire cannot carry."""
    code = CODE_OF_DTYPE.get(dtype)  # the common case: a little-endian numpy dtype
    if code is None:
        code = CODE_OF_DTYPE.get(np.dtype(dtype).newbyteorder("<"))
    if code is None:
        raise ProtocolError("dtype", f"one of {sorted(str(d) for d in CODE_OF_DTYPE)}", dtype)
    return code


def job_id(job: str) -> int:
    """The 64-bit id of a job name, as carried in every header."""
    return int.from_bytes(hashlib.blake2b(job.encode(), digest_size=8).digest(), "little")


def digest_of(descriptor: dict[str, Any], encoded: bytes | None = None) -> bytes:
    """An 8-byte digest of a collective descriptor (canonical JSON; ``encoded`` is that
    JSON when the caller has it already)."""
    data = canonical_json(descriptor) if encoded is None else encoded
    return hashlib.blake2b(data, digest_size=8).digest()


def canonical_json(obj: dict[str, Any]) -> bytes:
    """JSON with sorted keys and no spaces: equal dicts give equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Header:
    """A decoded, validated header."""

    kind: MessageKind
    job: int
    generation: int
    sequence: int
    sender: int = 0
    step: int = 0
    hop: int = 0
    chunk: int = 0
    segment: int = 0
    dtype: int = 0
    flags: int = 0
    digest: bytes = b"\0" * 8
    nbytes: int = 0

    def pack(self) -> bytes:
        """The 72 header bytes."""
        return HEADER.pack(MAGIC, PROTOCOL_VERSION, int(self.kind), self.dtype, self.flags,
                           self.hop, self.chunk, self.segment, self.sender, self.digest,
                           self.job, self.generation, self.step, self.sequence, self.nbytes)


def decode_header(frame: bytes | memoryview, *, max_payload: int, peer: str | None = None
                  ) -> Header:
    """Decode and validate a header frame.

    Args:
        frame: the first frame of a message.
        max_payload: the largest payload this node accepts, in bytes.
        peer: who sent it, for the error message.

    Raises:
        ProtocolError: naming the first field that is wrong.
    """
    if len(frame) != HEADER_SIZE:
        raise ProtocolError("header length", f"{HEADER_SIZE} bytes", f"{len(frame)} bytes", peer)
    (magic, version, kind, dtype, flags, hop, chunk, segment, sender, digest, job, generation,
     step, sequence, nbytes) = HEADER.unpack(frame)
    if magic != MAGIC:
        raise ProtocolError("magic", MAGIC, bytes(magic), peer)
    if version != PROTOCOL_VERSION:
        raise ProtocolError("version", PROTOCOL_VERSION, version, peer)
    try:
        message_kind = MessageKind(kind)
    except ValueError:
        raise ProtocolError("kind", f"one of {[int(k) for k in MessageKind]}", kind, peer) from None
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError("flags", f"a subset of {KNOWN_FLAGS:#x}", f"{flags:#x}", peer)
    if message_kind is MessageKind.DATA:
        if dtype not in DTYPE_CODES:
            raise ProtocolError("dtype", f"one of {sorted(DTYPE_CODES)}", dtype, peer)
        if nbytes > max_payload:
            raise ProtocolError("nbytes", f"at most {max_payload}", nbytes, peer)
        if nbytes % DTYPE_CODES[dtype].itemsize:
            raise ProtocolError("nbytes", f"a multiple of {DTYPE_CODES[dtype].itemsize}", nbytes,
                                peer)
    else:
        if dtype != 0:
            raise ProtocolError("dtype", "0 for a control message", dtype, peer)
        if nbytes > MAX_CONTROL_BYTES:
            raise ProtocolError("nbytes", f"at most {MAX_CONTROL_BYTES}", nbytes, peer)
    return Header(kind=message_kind, job=job, generation=generation, sequence=sequence,
                  sender=sender, step=step, hop=hop, chunk=chunk, segment=segment, dtype=dtype,
                  flags=flags, digest=bytes(digest), nbytes=nbytes)


def check_frames(header: Header, frames: list, peer: str | None = None) -> None:
    """Check that a message's frame count and payload length agree with its header."""
    described = 1 if header.flags & FLAG_DESCRIPTOR else 0
    parts = payload_frames(header, frames)
    if len(parts) != 1:
        splittable = header.kind is MessageKind.DATA and not header.flags & FLAG_SHM
        if not (splittable and 1 < len(parts) <= MAX_PAYLOAD_FRAMES and all(map(len, parts))):
            expected = (f"{2 + described} (or a DATA payload in 2-{MAX_PAYLOAD_FRAMES} "
                        f"non-empty frames)" if splittable else 2 + described)
            raise ProtocolError("frame count", expected, len(frames), peer)
    if header.flags & FLAG_SHM:
        if header.kind is not MessageKind.DATA:
            raise ProtocolError("flags", "FLAG_SHM only on DATA", header.kind.name, peer)
        if len(frames[1]) != SHM_REF.size:
            raise ProtocolError("payload length", f"{SHM_REF.size} (a shared-memory "
                                "reference)", len(frames[1]), peer)
    else:
        length = sum(map(len, parts))
        if length != header.nbytes:
            raise ProtocolError("payload length", header.nbytes, length, peer)
        itemsize = DTYPE_CODES[header.dtype].itemsize if len(parts) > 1 else 1
        if any(len(part) % itemsize for part in parts):
            raise ProtocolError("payload length", f"pieces of whole {itemsize}-byte "
                                f"elements", [len(part) for part in parts], peer)
    if described and len(frames[-1]) > MAX_DESCRIPTOR_BYTES:
        raise ProtocolError("descriptor length", f"at most {MAX_DESCRIPTOR_BYTES}",
                            len(frames[-1]), peer)


def split_payload(frames: list, piece_bytes: int) -> list:
    """``frames`` (header, payload, maybe a descriptor) with a payload larger than
    ``piece_bytes`` cut into as many pieces of equal size as that takes (at most
    ``MAX_PAYLOAD_FRAMES``; equal, so no piece is a sliver). The pieces are views: nothing
    is copied."""
    if len(frames) < 2:
        return frames
    payload = memoryview(frames[1]).cast("B")
    if len(payload) <= piece_bytes:
        return frames
    count = min(MAX_PAYLOAD_FRAMES, -(-len(payload) // piece_bytes))
    size = -(-len(payload) // count)
    size += -size % 8  # whole elements of any dtype in every piece
    pieces = [payload[start:start + size] for start in range(0, len(payload), size)]
    return [frames[0], *pieces, *frames[2:]]


def payload_frames(header: Header, frames: list) -> list:
    """The frames that hold the payload (between the header and a flagged descriptor):
    one, or its pieces in order."""
    return frames[1:len(frames) - 1] if header.flags & FLAG_DESCRIPTOR else frames[1:]


def encode_control(body: dict[str, Any]) -> bytes:
    """The payload of a control message."""
    data = canonical_json(body)
    if len(data) > MAX_CONTROL_BYTES:
        raise ProtocolError("control body", f"at most {MAX_CONTROL_BYTES} bytes", len(data))
    return data


def decode_control(payload: bytes | memoryview, fields: dict[str, type | tuple[type, ...]],
                   peer: str | None = None, what: str = "control body") -> dict[str, Any]:
    """Parse a control payload and check that it holds the given fields with the given types.

    Integer fields must lie in 0..``MAX_CONTROL_INT``.

    Raises:
        ProtocolError: for bytes that are not a JSON object, or a missing or mistyped field.
    """
    try:
        body = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # RecursionError: 64 KiB of "[" nests deeper than the parser's stack allows
        raise ProtocolError(what, "a UTF-8 JSON object", f"undecodable bytes ({exc})",
                            peer) from None
    if not isinstance(body, dict):
        raise ProtocolError(what, "a JSON object", type(body).__name__, peer)
    for name, kind in fields.items():
        if name not in body:
            raise ProtocolError(f"{what}.{name}", "present", "missing", peer)
        value = body[name]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise ProtocolError(f"{what}.{name}", _type_names(kind), "bool", peer)
        if not isinstance(value, kind):
            raise ProtocolError(f"{what}.{name}", _type_names(kind), type(value).__name__, peer)
        if isinstance(value, int) and not 0 <= value <= MAX_CONTROL_INT:
            # every number in a control body is a count, a generation or a sequence: one
            # out of range would only fail later, where packing it into a header cannot
            raise ProtocolError(f"{what}.{name}", f"an integer in 0..{MAX_CONTROL_INT}",
                                str(value)[:40], peer)
    return body


def _type_names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)
