"""The key door (``comm.door``): its datagrams as pure functions, then a real door on loopback
answering a job key holder, refusing another key (at a bounded rate) and ignoring garbage."""

from __future__ import annotations

import os
import socket
import time

import pytest

from ringtrain.comm.curve import new_curve_keypair
from ringtrain.comm.door import (
    ASK_BYTES,
    ASKS_PER_S,
    PAUSE_S,
    REFUSALS_PER_S,
    DoorClient,
    DoorServer,
    ask_once,
    door_address,
    door_key,
    encode_answer,
    encode_ask,
    encode_refusal,
    open_door,
    read_ask,
    read_reply,
)
from ringtrain.comm.endpoints import split_pin
from ringtrain.comm.identity import derived_node_id, device_fingerprint
from ringtrain.comm.security import JobKey
from ringtrain.discovery.advert import Advert, advert_from_txt
from ringtrain.errors import ConfigError

JOB = JobKey.generate()
ASKER, ANSWERER = new_curve_keypair()[0].encode(), new_curve_keypair()[0].encode()


def test_an_ask_verifies_only_under_its_job_key():
    nonce = os.urandom(16)
    ask = encode_ask(door_key(JOB), nonce, ASKER)
    assert len(ask) == ASK_BYTES
    assert read_ask(door_key(JOB), ask) == (nonce, ASKER, True)
    assert read_ask(door_key(JobKey.generate()), ask) == (nonce, ASKER, False)
    tampered = ask[:30] + bytes([ask[30] ^ 1]) + ask[31:]  # another asker key
    assert read_ask(door_key(JOB), tampered)[2] is False
    assert read_ask(door_key(JOB), ask[:-1]) is None
    assert read_ask(door_key(JOB), b"GET / HTTP/1.1\r\n") is None


def test_an_answer_is_bound_to_the_ask_and_the_job_key():
    key, nonce = door_key(JOB), os.urandom(16)
    answer = encode_answer(key, nonce, ASKER, ANSWERER)
    assert len(answer) == ASK_BYTES  # never longer than the ask: no amplification
    assert read_reply(key, answer, nonce, ASKER, "e").key == ANSWERER.decode()
    assert read_reply(key, answer, os.urandom(16), ASKER, "e") is None  # another ask's
    assert read_reply(key, answer, nonce, ANSWERER, "e") is None  # made for another asker
    assert read_reply(door_key(JobKey.generate()), answer, nonce, ASKER, "e") is None
    forged = encode_answer(door_key(JobKey.generate()), nonce, ASKER, ANSWERER)
    assert read_reply(key, forged, nonce, ASKER, "e") is None


def test_a_refusal_names_the_other_job_key_and_is_short():
    nonce = os.urandom(16)
    refusal = encode_refusal(nonce, JOB.fingerprint)
    assert len(refusal) < ASK_BYTES
    reply = read_reply(door_key(JobKey.generate()), refusal, nonce, ASKER, "tcp://1.2.3.4:5")
    assert reply.key == "" and reply.other_job == JOB.fingerprint


def test_door_addresses_are_the_tcp_endpoints_ip_and_port():
    assert door_address("tcp://127.0.0.1:7077") == (socket.AF_INET, ("127.0.0.1", 7077))
    assert door_address("tcp://[::1]:7077") == (socket.AF_INET6, ("::1", 7077))
    assert door_address("tcp://*:7077")[1] == ("0.0.0.0", 7077)
    assert door_address("tcp://node1:7077") is None  # names are resolved before dialling
    assert door_address("inproc://ring") is None


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:7077", ("", "127.0.0.1:7077")),
    ("K3J5H2G7F6D5S4A3@10.0.0.5:7077", ("k3j5h2g7f6d5s4a3", "10.0.0.5:7077")),
    ("k3j5h2g7f6d5s4a3@tcp://10.0.0.5:7077", ("k3j5h2g7f6d5s4a3", "tcp://10.0.0.5:7077")),
])
def test_a_pin_is_a_device_fingerprint_before_the_address(text, expected):
    assert split_pin(text) == expected


@pytest.mark.parametrize("text", ["k3j5@10.0.0.5:7077", "k3j5h2g7f6d5s4a1@10.0.0.5:7077",
                                  "@10.0.0.5:7077"])
def test_a_pin_that_is_no_fingerprint_is_refused(text):
    with pytest.raises(ConfigError, match="device fingerprint"):
        split_pin(text)


def test_an_advert_carries_its_device_key_which_a_derived_id_must_match():
    public = new_curve_keypair()[0]
    node_id = derived_node_id("laptop", public)
    advert = Advert(node_id, "job", ("10.0.0.5",), 7077, 1, "fp", 0, "forming",
                    device_key=public)
    again = advert_from_txt(advert.txt(), 7077, ("10.0.0.5",), "x")
    assert again.device_key == public and device_fingerprint(public) in node_id
    with pytest.raises(ConfigError, match="does not derive"):
        Advert(node_id, "job", ("10.0.0.5",), 7077, 1, "fp", 0, "forming",
               device_key=new_curve_keypair()[0])
    with pytest.raises(ConfigError, match="Z85"):
        Advert("laptop", "job", ("10.0.0.5",), 7077, 1, "fp", 0, "forming", device_key="x")
    # a chosen id may carry any key; no key is a keyless candidate (its door is asked)
    Advert("laptop", "job", ("10.0.0.5",), 7077, 1, "fp", 0, "forming", device_key=public)
    assert "dk" not in Advert("laptop", "job", ("10.0.0.5",), 7077, 1, "fp", 0, "x").txt()


@pytest.fixture
def door():
    """A real door on a loopback UDP port, served by hand (the key check's thread does it in
    a node)."""
    sock = open_door("127.0.0.1", 0)
    introduced: list[str] = []
    server = DoorServer(sock, JOB, ANSWERER, introduced.append)
    server.introduced = introduced
    yield server, f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    server.close()


def _serve_until(server: DoorServer, done, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server.serve()
        result = done()
        if result:
            return result
        time.sleep(0.01)
    raise AssertionError("no reply")


def test_a_door_answers_a_key_holder_and_introduces_its_key(door):
    server, endpoint = door
    client = DoorClient(JOB, ASKER)
    try:
        assert client.ask(endpoint)
        replies = _serve_until(server, client.replies)
    finally:
        client.close()
    assert [(r.endpoint, r.key) for r in replies] == [(endpoint, ANSWERER.decode())]
    assert server.introduced == [ASKER.decode()]


def test_a_door_refuses_another_job_key_naming_its_own_and_the_asker(door):
    server, endpoint = door
    client = DoorClient(JobKey.generate(), ASKER)
    try:
        client.ask(endpoint)
        replies = _serve_until(server, client.replies)
    finally:
        client.close()
    assert replies[0].key == "" and replies[0].other_job == JOB.fingerprint
    assert server.introduced == [] and server.wrong_key == {"127.0.0.1": 1}


def test_a_flood_is_read_and_refused_at_bounded_rates_and_garbage_is_not_answered(door):
    server, endpoint = door
    stranger = JobKey.generate()
    pauses = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        sock.connect(door_address(endpoint)[1])
        for _ in range(3):
            sock.send(b"garbage" * 20)
        started = time.monotonic()
        for _ in range(8):  # in batches: the kernel's receive buffer is small
            for _ in range(50):
                sock.send(encode_ask(door_key(stranger), os.urandom(16), ASKER))
            pauses.append(server.serve())
        took = time.monotonic() - started
        answered = 0
        try:
            while True:
                sock.recv(ASK_BYTES + 1)
                answered += 1
        except TimeoutError:
            pass
    read = server.wrong_key["127.0.0.1"]
    assert any(pauses), "a door over its share never paused"
    assert read <= ASKS_PER_S * (PAUSE_S + took) + 1, (read, took)
    assert 0 < answered <= min(read, REFUSALS_PER_S * (1 + took) + 1), (answered, read)


def test_asking_once_tells_a_closed_port_and_a_silent_one():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        # bound, never answering: silent
        assert ask_once(f"tcp://127.0.0.1:{port}", JOB, ASKER, 0.6) == "timeout"
    assert ask_once(f"tcp://127.0.0.1:{port}", JOB, ASKER, 1.0) == "closed"
