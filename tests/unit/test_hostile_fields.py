"""Malformed HELLO and PROPOSE fields, fuzzed with Hypothesis over every field, against the
membership of a keyed node: each message is acted on or refused with a ProtocolError (which
the node counts as the sender's offence), never anything else, and the node keeps working.

A real transport on an inproc endpoint; endpoints in the fuzzed messages are loopback or
malformed, so nothing is ever dialled off this machine.
"""

from __future__ import annotations

import json

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringtrain.comm.curve import new_curve_keypair
from ringtrain.comm.identity import derived_node_id
from ringtrain.comm.ledger import Ledger
from ringtrain.comm.mailbox import Mailbox, Message
from ringtrain.comm.security import JobKey
from ringtrain.comm.transport import Transport
from ringtrain.comm.wire import PROTOCOL_VERSION, Header, MessageKind, job_id
from ringtrain.config import Settings
from ringtrain.errors import ProtocolError
from ringtrain.membership.links import Links
from ringtrain.membership.protocol import MembershipConfig

JOB = "fuzz"
KEY = JobKey.generate()
PEER_PUBLIC = new_curve_keypair()[0]
PEER = derived_node_id("peer", PEER_PUBLIC)

junk = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70)
                    | st.floats(allow_nan=False) | st.text(max_size=40),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
endpoints = st.one_of(st.sampled_from(["bogus://x", "tcp://h:abc", "inproc://ring", "", ":",
                                       "tcp://127.0.0.1:0", "tcp://[::1]:99999", "x" * 300,
                                       "tcp://localhost:7"]),
                      st.integers(1, 65535).map(lambda p: f"tcp://127.0.0.1:{p}"),
                      st.text(max_size=30))


def _proof(node_id: object, key: object, incarnation: object) -> str:
    return KEY.derive(f"hello:{JOB}:{node_id}:{key}:{incarnation}").hex()


@st.composite
def hellos(draw) -> dict:
    body = {"id": PEER, "job": JOB, "protocol": PROTOCOL_VERSION, "endpoint":
            "tcp://127.0.0.1:7077", "key": PEER_PUBLIC, "schema": "", "incarnation": 7,
            "host": ""}
    for name in draw(st.sets(st.sampled_from(sorted(body)), min_size=1)):
        body[name] = draw(endpoints if name == "endpoint" else junk)
    if draw(st.booleans()):
        body["proof"] = _proof(body["id"], body["key"], body["incarnation"])
    else:
        body["proof"] = draw(junk)
    for name in draw(st.sets(st.sampled_from(sorted(body)), max_size=2)):
        del body[name]
    return body


@st.composite
def proposals(draw) -> dict:
    """Every kind of agreement message (what PROPOSE carries), valid, then with fields
    replaced by anything JSON can hold."""
    decision = {"generation": 3, "lineage": "0001.0.node-00",
                "members": [["node-00", 1], [PEER, 7]]}
    valid = [
        {"type": "prepare", "lineage": "l", "generation": 1, "ballot": [1, PEER],
         "wanted": ["node-00", PEER]},
        {"type": "promise", "lineage": "l", "generation": 1, "ballot": [1, PEER],
         "accepted_ballot": [0, ""], "accepted": decision},
        {"type": "accept", "lineage": "l", "generation": 1, "ballot": [1, PEER],
         "value": decision},
        {"type": "accepted", "lineage": "l", "generation": 1, "ballot": [1, PEER]},
        {"type": "nack", "lineage": "l", "generation": 1, "ballot": [1, PEER],
         "promised": [2, "node-00"]},
        {"type": "decide", "value": decision},
        {"type": "release", "lineage": "l"}]
    body = dict(draw(st.sampled_from(valid)))
    for name in draw(st.sets(st.sampled_from(sorted(body)), max_size=3)):
        body[name] = draw(junk)
    if draw(st.booleans()) and "value" in body:
        body["value"] = {**decision, draw(st.sampled_from(sorted(decision))): draw(junk)}
    if draw(st.booleans()):
        del body[draw(st.sampled_from(sorted(body)))]
    return body


@pytest.fixture(scope="module")
def node():
    transport = Transport("node-00", "inproc://hostile-fields", Settings(), KEY)
    mailbox = Mailbox(transport, job_id(JOB), 1 << 20)
    membership = Links("node-00", JOB, job_id(JOB), transport, mailbox,
                       MembershipConfig(form_size=2, max_size=8))
    membership.admit = Ledger().check
    yield membership, mailbox
    transport.close(linger=0)


def _message(kind: MessageKind, body: object) -> Message:
    payload = json.dumps(body).encode()
    header = Header(kind=kind, job=job_id(JOB), generation=0, sequence=0, nbytes=len(payload))
    return Message(header, PEER, [zmq.Frame(header.pack()), zmq.Frame(payload)],
                   peer_address="127.0.0.1", user=PEER_PUBLIC)


def _handle(membership: Links, mailbox: Mailbox, kind: MessageKind, body: object) -> None:
    message = _message(kind, body)
    try:
        membership.handle(message)
    except ProtocolError as exc:  # what the node does with it: the sender's offence
        mailbox.reject(message, exc)
    membership.tick()  # and the node goes on


FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FUZZ
@given(body=hellos())
def test_any_hello_is_acted_on_or_refused(node, body):
    _handle(*node, MessageKind.HELLO, body)


@FUZZ
@given(body=proposals())
def test_any_proposal_from_a_linked_peer_is_acted_on_or_refused(node, body):
    membership, mailbox = node
    valid = {"id": PEER, "job": JOB, "protocol": PROTOCOL_VERSION,
             "endpoint": "tcp://127.0.0.1:7077", "key": PEER_PUBLIC, "schema": "",
             "incarnation": 7, "host": "", "proof": _proof(PEER, PEER_PUBLIC, 7)}
    _handle(membership, mailbox, MessageKind.HELLO, valid)  # the sender is a linked peer
    _handle(membership, mailbox, MessageKind.PROPOSE, body)


def test_refusals_were_counted(node):
    membership, mailbox = node
    _handle(membership, mailbox, MessageKind.HELLO, {"id": PEER})
    assert sum(mailbox.dropped.values()) >= 1
