"""One segment of a collective on the wire, with no I/O: the header a node stamps on what it
sends, the checks on what it receives (digest, sender, position in the plan), how a received
segment is taken into the working buffer, compressed segments' encoding and decoding, and the
errors an ABORT or a mismatch turns into. The :class:`~ringtrain.ring.runner.RingRunner`
moves the segments; this module decides what they must look like.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..comm.mailbox import Message
from ..comm.wire import (
    FLAG_DESCRIPTOR,
    FLAG_SHM,
    Header,
    MessageKind,
    decode_control,
    dtype_code,
    encode_control,
)
from ..errors import CollectiveError, MismatchError, PeerFailedError, ProtocolError
from ..membership.protocol import View
from . import plan as ring
from .collectives import Collective, describe


def where(collective: Collective, view: View, sequence: int) -> str:
    """How errors name a collective: ``all_reduce #12 of generation 3``."""
    return f"{collective.name} #{sequence} of generation {view.generation}"


def data_header(collective: Collective, view: View, job: int, sequence: int, step: int,
                transfer: ring.Transfer, with_descriptor: bool, shared: bool = False) -> Header:
    """The header of the DATA message that carries ``transfer`` of ``collective``."""
    dtype, nbytes = wire_shape(collective, transfer, sending=True)
    flags = (FLAG_DESCRIPTOR if with_descriptor else 0) | (FLAG_SHM if shared else 0)
    return Header(kind=MessageKind.DATA, job=job, generation=view.generation,
                  sequence=sequence, sender=view.rank, step=step, hop=transfer.hop,
                  chunk=transfer.chunk, segment=transfer.segment, dtype=dtype,
                  flags=flags, digest=collective.digest, nbytes=nbytes)


def check_from_predecessor(collective: Collective, view: View, sequence: int, message: Message,
                           expected: ring.Receive, predecessor: str,
                           predecessor_rank: int) -> None:
    """Raise PeerFailedError unless ``message`` is the segment the plan expects next from the
    predecessor (checked after its digest)."""
    header = message.header
    if message.origin != predecessor or header.sender != predecessor_rank:
        raise PeerFailedError(f"{where(collective, view, sequence)}: data from {message.origin} "
                              f"(rank {header.sender}), but only the predecessor {predecessor} "
                              f"sends to this node", peer=message.origin,
                              generation=view.generation, collective=sequence)
    transfer = expected.transfer
    got = (header.hop, header.chunk, header.segment, header.nbytes, header.dtype)
    want = (transfer.hop, transfer.chunk, transfer.segment,
            *reversed(wire_shape(collective, transfer, sending=False)))
    if got != want:
        raise PeerFailedError(f"{where(collective, view, sequence)}: {predecessor} sent (hop, "
                              f"chunk, segment, nbytes, dtype) = {got}, expected {want}",
                              peer=predecessor, generation=view.generation, collective=sequence)


def take_parts(collective: Collective, expected: ring.Receive, parts: list) -> None:
    """Reduce (or copy) the pieces of one uncompressed segment into its region of the buffer,
    where they lie: pieces of whole elements need no joining."""
    transfer = expected.transfer
    region = collective.buffer[transfer.start:transfer.stop]
    for part in parts:
        incoming = np.frombuffer(part, dtype=collective.buffer.dtype)
        target, region = region[:incoming.size], region[incoming.size:]
        if expected.reduce:
            collective.combine(target, incoming, out=target)
        else:
            target[...] = incoming


def mismatch(collective: Collective, view: View, sequence: int, node_id: str,
             message: Message) -> MismatchError:
    """The error for a member's segment of another collective, naming both calls."""
    theirs = "a different collective"
    if message.descriptor is not None:
        try:
            theirs = describe(decode_control(message.descriptor, {}, message.origin,
                                             "descriptor"))
        except ProtocolError:
            pass
    return MismatchError(
        f"collective mismatch in generation {view.generation}, collective {sequence}: "
        f"node {node_id} (rank {view.rank}) called {describe(collective.descriptor)} "
        f"but node {message.origin} (rank {view.members.index(message.origin)}) called "
        f"{theirs}", generation=view.generation, collective=sequence)


def abort_frames(view: View, job: int, node_id: str, sequence: int, exc: CollectiveError,
                 suspect: str | None) -> list[bytes]:
    """The ABORT message telling every member that collective ``sequence`` failed here (and
    whom we blame)."""
    kind = "mismatch" if isinstance(exc, MismatchError) else "failure"
    body = {"kind": kind, "message": str(exc), "node": node_id, "peer": suspect or ""}
    payload = encode_control(body)
    header = Header(kind=MessageKind.ABORT, job=job, generation=view.generation,
                    sequence=sequence, sender=view.rank, nbytes=len(payload)).pack()
    return [header, payload]


U1 = dtype_code(np.dtype("u1"))  # compressed payloads travel as bytes


def wire_shape(collective: Collective, transfer: ring.Transfer, sending: bool
                ) -> tuple[int, int]:
    """(wire dtype code, payload bytes) of one segment of ``collective`` that we send (or
    receive)."""
    buffer, compressed = collective.buffer, collective.compressed
    if compressed is None or not compressed.encodes(transfer, sending):
        return dtype_code(buffer.dtype), (transfer.stop - transfer.start) * buffer.itemsize
    cut = compressed.cut(transfer)
    return U1, (compressed.codec.payload_bytes(cut - transfer.start, buffer.dtype)
                + (transfer.stop - cut) * buffer.itemsize)


def encode(collective: Collective, transfer: ring.Transfer) -> np.ndarray:
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


def decode(collective: Collective, expected: ring.Receive, payload: memoryview) -> Any:
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


def error_from_abort(abort: Message, where: str, generation: int, sequence: int
                      ) -> CollectiveError:
    """The error a member's ABORT of a collective becomes here."""
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

