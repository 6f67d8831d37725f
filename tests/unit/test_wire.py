"""The wire format: headers round-trip, every bad field is named, and no input crashes the
decoder with anything but ProtocolError."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringtrain.comm import wire
from ringtrain.comm.wire import (
    FLAG_DESCRIPTOR,
    HEADER,
    HEADER_SIZE,
    MAX_CONTROL_BYTES,
    MAX_DESCRIPTOR_BYTES,
    Header,
    MessageKind,
)
from ringtrain.errors import ProtocolError, RingtrainError

MAX_PAYLOAD = 1 << 20


def data_header(**changes) -> Header:
    fields = dict(kind=MessageKind.DATA, job=wire.job_id("job"), generation=3, sequence=41,
                  sender=2, step=7, hop=5, chunk=4, segment=9, dtype=2, flags=0,
                  digest=bytes(range(8)), nbytes=4096)
    fields.update(changes)
    return Header(**fields)


def fields_of(frame: bytes) -> list:
    return list(HEADER.unpack(frame))


# field positions in HEADER's struct
MAGIC, VERSION, KIND, DTYPE, FLAGS, HOP, CHUNK, SEGMENT, SENDER, DIGEST, JOB, GENERATION, STEP, \
    SEQUENCE, NBYTES = range(15)


def repack(header: Header, index: int, value) -> bytes:
    values = fields_of(header.pack())
    values[index] = value
    return HEADER.pack(*values)


# round trip ---------------------------------------------------------------------------------------

def test_header_is_72_bytes():
    assert HEADER_SIZE == 72 == len(data_header().pack())


@pytest.mark.parametrize("kind", list(MessageKind))
def test_round_trip_every_kind(kind):
    if kind is MessageKind.DATA:
        header = data_header(kind=kind)
    else:
        header = Header(kind=kind, job=1, generation=2, sequence=3, nbytes=100)
    assert wire.decode_header(header.pack(), max_payload=MAX_PAYLOAD) == header


@settings(max_examples=300, deadline=None)
@given(kind=st.just(MessageKind.DATA),
       dtype=st.sampled_from(sorted(wire.DTYPE_CODES)),
       elements=st.integers(0, MAX_PAYLOAD // 8),
       u16=st.integers(0, 2**16 - 1), u32=st.tuples(*[st.integers(0, 2**32 - 1)] * 3),
       u64=st.tuples(*[st.integers(0, 2**64 - 1)] * 4), digest=st.binary(min_size=8, max_size=8),
       flags=st.sampled_from([0, FLAG_DESCRIPTOR]))
def test_round_trip_any_valid_data_header(kind, dtype, elements, u16, u32, u64, digest, flags):
    header = Header(kind=kind, job=u64[0], generation=u64[1], step=u64[2], sequence=u64[3],
                    hop=u16, chunk=u32[0], segment=u32[1], sender=u32[2], dtype=dtype,
                    flags=flags, digest=digest,
                    nbytes=elements * wire.DTYPE_CODES[dtype].itemsize)
    assert wire.decode_header(header.pack(), max_payload=MAX_PAYLOAD) == header


def test_decode_accepts_a_memoryview():
    header = data_header()
    assert wire.decode_header(memoryview(header.pack()), max_payload=MAX_PAYLOAD) == header


def test_dtype_codes_round_trip_and_refuse_what_the_wire_cannot_carry():
    for code, dtype in wire.DTYPE_CODES.items():
        assert wire.dtype_code(dtype) == code
        assert wire.dtype_code(dtype.newbyteorder(">")) == code  # order is the sender's business
    for bad in (np.bool_, np.complex64, np.dtype("U3"), np.dtype("O")):
        with pytest.raises(ProtocolError) as info:
            wire.dtype_code(bad)
        assert info.value.field == "dtype"


def test_job_id_and_digest_are_stable_and_distinct():
    assert wire.job_id("a") == wire.job_id("a") != wire.job_id("b")
    assert 0 <= wire.job_id("a") < 2**64
    assert wire.digest_of({"a": 1, "b": [2]}) == wire.digest_of({"b": [2], "a": 1})
    assert wire.digest_of({"shapes": [[2, 3]]}) != wire.digest_of({"shapes": [[3, 2]]})
    assert len(wire.digest_of({})) == 8


# each bad field is named --------------------------------------------------------------------------

def expect_field(field: str, frame: bytes, max_payload: int = MAX_PAYLOAD) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        wire.decode_header(frame, max_payload=max_payload, peer="node-07")
    error = info.value
    assert error.field == field, str(error)
    assert error.peer == "node-07" and "node-07" in str(error)
    assert field in str(error)
    return error


def test_bad_magic():
    error = expect_field("magic", repack(data_header(), MAGIC, b"XTRN"))
    assert error.got == b"XTRN" and error.expected == b"RTRN"


@pytest.mark.parametrize("version", [0, 2, 0xFFFF])
def test_bad_version(version):
    error = expect_field("version", repack(data_header(), VERSION, version))
    assert error.got == version


@pytest.mark.parametrize("kind", [0, 9, 255])
def test_bad_kind(kind):
    expect_field("kind", repack(data_header(), KIND, kind))


@pytest.mark.parametrize("flags", [0x4, 0x8000, 0xFFFF])
def test_unknown_flags(flags):
    expect_field("flags", repack(data_header(), FLAGS, flags))


@pytest.mark.parametrize("dtype", [0, 12, 255])
def test_bad_dtype_on_data(dtype):
    expect_field("dtype", repack(data_header(), DTYPE, dtype))


def test_control_message_must_have_dtype_zero():
    header = Header(kind=MessageKind.HELLO, job=1, generation=0, sequence=0, nbytes=10)
    expect_field("dtype", repack(header, DTYPE, 2))


def test_nbytes_larger_than_max_payload():
    error = expect_field("nbytes", data_header(nbytes=4096 + 4).pack(), max_payload=4096)
    assert error.got == 4100
    expect_field("nbytes", data_header(nbytes=2**64 - 1).pack())


@pytest.mark.parametrize("dtype,nbytes", [(2, 6), (3, 12), (5, 3), (7, 4095)])
def test_nbytes_not_a_multiple_of_the_itemsize(dtype, nbytes):
    expect_field("nbytes", data_header(dtype=dtype, nbytes=nbytes).pack())


def test_control_payload_too_big():
    header = Header(kind=MessageKind.PROPOSE, job=1, generation=0, sequence=0,
                    nbytes=MAX_CONTROL_BYTES + 1)
    expect_field("nbytes", header.pack())
    ok = Header(kind=MessageKind.PROPOSE, job=1, generation=0, sequence=0,
                nbytes=MAX_CONTROL_BYTES)
    assert wire.decode_header(ok.pack(), max_payload=0).nbytes == MAX_CONTROL_BYTES


@pytest.mark.parametrize("length", [0, 1, 71, 73, 144])
def test_wrong_header_length(length):
    frame = (data_header().pack() * 3)[:length]
    expect_field("header length", frame)


def test_frame_count():
    header = data_header(nbytes=8)
    for frames in ([header.pack()], [header.pack(), b"x" * 8, b"", b""]):
        with pytest.raises(ProtocolError) as info:
            wire.check_frames(header, frames, peer="p")
        assert info.value.field == "frame count"
    described = data_header(nbytes=8, flags=FLAG_DESCRIPTOR)
    with pytest.raises(ProtocolError) as info:
        wire.check_frames(described, [described.pack(), b"x" * 8])
    assert info.value.field == "frame count"
    wire.check_frames(header, [header.pack(), b"x" * 8])
    wire.check_frames(described, [described.pack(), b"x" * 8, b"{}"])
    # a stray frame without the descriptor flag reads as a second piece of the payload
    with pytest.raises(ProtocolError) as info:
        wire.check_frames(header, [header.pack(), b"x" * 8, b"{}"], peer="p")
    assert info.value.field == "payload length" and info.value.got == 10


def test_payload_in_pieces_is_split_and_checked_without_loss():
    payload = np.arange(1000, dtype=np.float32)
    header = data_header(nbytes=payload.nbytes, flags=FLAG_DESCRIPTOR)
    frames = [header.pack(), payload, b"{}"]
    pieces = wire.split_payload(frames, 1024)
    assert [len(p) for p in pieces[1:-1]] == [1000, 1000, 1000, 1000]  # equal: no sliver
    assert pieces[0] is frames[0] and pieces[-1] is frames[-1]
    wire.check_frames(header, pieces)
    parts = wire.payload_frames(header, pieces)
    assert np.array_equal(np.frombuffer(b"".join(parts), dtype=np.float32), payload)
    assert wire.split_payload(frames, payload.nbytes) is frames  # small enough: untouched
    assert wire.payload_frames(header, frames) == [payload]


def test_payload_pieces_hold_whole_elements():
    header = data_header(nbytes=16, dtype=3)  # float64
    wire.check_frames(header, [header.pack(), b"x" * 8, b"x" * 8])
    with pytest.raises(ProtocolError) as info:
        wire.check_frames(header, [header.pack(), b"x" * 4, b"x" * 12], peer="p")
    assert info.value.field == "payload length" and info.value.got == [4, 12]
    odd = wire.split_payload([b"h", bytes(8 * 1001)], 8 * 1000 // wire.MAX_PAYLOAD_FRAMES + 3)
    assert all(len(piece) % 8 == 0 for piece in odd[1:])
    almost = wire.split_payload([b"h", bytes(262_148)], 262_144)  # an int8 segment: 2 halves
    assert [len(piece) for piece in almost[1:]] == [131_080, 131_068]


def test_split_payload_never_makes_more_pieces_than_a_receiver_takes():
    payload = bytes(100_000)
    pieces = wire.split_payload([b"h", payload], 1000)[1:]
    assert len(pieces) == wire.MAX_PAYLOAD_FRAMES
    assert b"".join(pieces) == payload


@pytest.mark.parametrize("parts", [wire.MAX_PAYLOAD_FRAMES + 1, 100])
def test_too_many_payload_pieces(parts):
    header = data_header(nbytes=parts)
    with pytest.raises(ProtocolError) as info:
        wire.check_frames(header, [header.pack(), *[b"x"] * parts], peer="p")
    assert info.value.field == "frame count" and info.value.peer == "p"


def test_only_raw_data_comes_in_pieces():
    control = Header(kind=MessageKind.HEARTBEAT, job=1, generation=0, sequence=0, nbytes=4)
    shared = data_header(nbytes=1 << 20, flags=wire.FLAG_SHM)
    reference = wire.SHM_REF.pack(b"0" * wire.SHM_NAME_BYTES, 0, 0, 1)
    for header, frames in ((control, [control.pack(), b"{}", b"{}"]),
                           (shared, [shared.pack(), reference[:20], reference[20:]])):
        with pytest.raises(ProtocolError) as info:
            wire.check_frames(header, frames)
        assert info.value.field == "frame count"


@pytest.mark.parametrize("length", [0, 7, 9, 4096])
def test_payload_length(length):
    header = data_header(nbytes=8)
    with pytest.raises(ProtocolError) as info:
        wire.check_frames(header, [header.pack(), b"x" * length])
    assert info.value.field == "payload length"
    assert info.value.expected == 8 and info.value.got == length


def test_shared_memory_reference_frames():
    header = data_header(nbytes=1 << 20, flags=wire.FLAG_SHM)
    reference = wire.SHM_REF.pack(b"0" * wire.SHM_NAME_BYTES, 0, 0, 1)
    wire.check_frames(header, [header.pack(), reference])  # nbytes is the data in the lane
    for payload in (b"", reference[:-1], reference + b"x", b"x" * (1 << 20)):
        with pytest.raises(ProtocolError) as info:
            wire.check_frames(header, [header.pack(), payload], peer="p")
        assert info.value.field == "payload length" and info.value.peer == "p"
    control = Header(kind=MessageKind.HEARTBEAT, job=1, generation=0, sequence=0,
                     flags=wire.FLAG_SHM,
                     nbytes=wire.SHM_REF.size)
    with pytest.raises(ProtocolError) as info:
        wire.check_frames(control, [control.pack(), reference])
    assert info.value.field == "flags"


def test_descriptor_too_long():
    header = data_header(nbytes=0, flags=FLAG_DESCRIPTOR)
    with pytest.raises(ProtocolError) as info:
        wire.check_frames(header, [header.pack(), b"", b" " * (MAX_DESCRIPTOR_BYTES + 1)])
    assert info.value.field == "descriptor length"


# control bodies -----------------------------------------------------------------------------------

def test_control_round_trip():
    body = {"id": "node-01", "protocol": 1, "members": ["a", "b"], "ok": True}
    assert wire.decode_control(wire.encode_control(body), {"id": str, "protocol": int,
                                                           "members": list, "ok": bool}) == body


def test_encode_control_refuses_an_oversized_body():
    with pytest.raises(ProtocolError) as info:
        wire.encode_control({"x": "y" * MAX_CONTROL_BYTES})
    assert info.value.field == "control body"


@pytest.mark.parametrize("payload,field", [
    (b"\xff\xfe", "hello"),  # not UTF-8
    (b"{", "hello"),  # not JSON
    (b"[1, 2]", "hello"),  # not an object
    (b'"text"', "hello"),
    (b"null", "hello"),
    (b"{}", "hello.id"),  # missing
    (b'{"id": 5, "protocol": 1}', "hello.id"),  # wrong type
    (b'{"id": null, "protocol": 1}', "hello.id"),
    (b'{"id": "a", "protocol": true}', "hello.protocol"),  # a bool is not an int
    (b'{"id": "a", "protocol": 1.5}', "hello.protocol"),
    (b'{"id": "a"}', "hello.protocol"),
])
def test_decode_control_names_the_bad_field(payload, field):
    with pytest.raises(ProtocolError) as info:
        wire.decode_control(payload, {"id": str, "protocol": int}, peer="p", what="hello")
    assert info.value.field == field
    assert info.value.peer == "p"


def test_decode_control_accepts_a_bool_where_bool_is_allowed():
    assert wire.decode_control(b'{"f": false}', {"f": (bool, int)}) == {"f": False}
    assert wire.decode_control(b'{"f": 3}', {"f": (int, str)}) == {"f": 3}


def test_decode_control_survives_deep_nesting():
    """A peer can send 64 KiB of '[': that must be a ProtocolError, not a RecursionError that
    kills the engine thread of the node that parses it."""
    for payload in (b"[" * 50_000, b'{"a":' * 12_000, b"[" * 30_000 + b"]" * 30_000):
        assert len(payload) <= MAX_CONTROL_BYTES
        with pytest.raises(ProtocolError) as info:
            wire.decode_control(payload, {}, what="hello")
        assert info.value.field == "hello"


def test_decode_control_refuses_huge_integers_as_protocol_errors():
    with pytest.raises(ProtocolError):
        wire.decode_control(b'{"n": ' + b"9" * 5000 + b"}", {"n": int})


# fuzzing: anything a peer sends is either valid or a ProtocolError --------------------------------

def decode_everything(frames: list[bytes], max_payload: int = 4096) -> None:
    """What the mailbox and membership do with a peer's frames."""
    if not frames:
        return
    header = wire.decode_header(frames[0], max_payload=max_payload, peer="fuzz")
    wire.check_frames(header, frames, peer="fuzz")
    payload = b"".join(wire.payload_frames(header, frames))
    if header.kind is not MessageKind.DATA:
        wire.decode_control(payload, {"id": str, "generation": int, "members": list},
                            peer="fuzz")
    else:
        np.frombuffer(payload, dtype=wire.DTYPE_CODES[header.dtype])
    if header.flags & FLAG_DESCRIPTOR:
        wire.decode_control(frames[-1], {}, peer="fuzz", what="descriptor")


def only_protocol_errors(frames: list[bytes]) -> None:
    try:
        decode_everything(frames)
    except ProtocolError as exc:
        assert isinstance(exc, RingtrainError)
        assert exc.field and str(exc)


def valid_frames(kind: MessageKind, payload: bytes, descriptor: bytes | None) -> list[bytes]:
    flags = FLAG_DESCRIPTOR if descriptor is not None else 0
    if kind is MessageKind.DATA:
        header = data_header(kind=kind, dtype=8, nbytes=len(payload), flags=flags)
    else:
        header = Header(kind=kind, job=1, generation=1, sequence=0, nbytes=len(payload),
                        flags=flags)
    return [header.pack(), payload] + ([descriptor] if descriptor is not None else [])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), max_size=5))
def test_fuzz_arbitrary_frames(frames):
    only_protocol_errors(frames)


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE), st.binary(max_size=300),
       st.booleans())
def test_fuzz_arbitrary_header_bytes(header, payload, third):
    only_protocol_errors([header, payload] + ([b"{}"] if third else []))


@settings(max_examples=1000, deadline=None)
@given(kind=st.sampled_from(list(MessageKind)), payload=st.binary(max_size=64),
       descriptor=st.none() | st.binary(max_size=64),
       flips=st.lists(st.tuples(st.integers(0, HEADER_SIZE - 1), st.integers(1, 255)),
                      min_size=1, max_size=4))
def test_fuzz_mutated_valid_headers(kind, payload, descriptor, flips):
    frames = valid_frames(kind, payload, descriptor)
    header = bytearray(frames[0])
    for position, xor in flips:
        header[position] ^= xor
    frames[0] = bytes(header)
    only_protocol_errors(frames)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(list(MessageKind)), body=json_values,
       descriptor=st.none() | json_values.map(lambda v: json.dumps(v).encode()),
       field=st.sampled_from(list(range(15))), value=st.integers(0, 2**16 - 1))
def test_fuzz_valid_headers_with_json_bodies_and_one_field_replaced(kind, body, descriptor, field,
                                                                    value):
    frames = valid_frames(kind, json.dumps(body).encode(), descriptor)
    values = fields_of(frames[0])
    if field in (MAGIC, DIGEST):
        values[field] = struct.pack("<Q", value)[: len(values[field])]
    else:
        values[field] = value % (256 if field in (KIND, DTYPE) else 2**16)
    frames[0] = HEADER.pack(*values)
    only_protocol_errors(frames)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400) | st.text(max_size=200).map(str.encode))
def test_fuzz_decode_control(payload):
    try:
        wire.decode_control(payload, {"a": int, "b": (str, list)})
    except ProtocolError:
        pass
