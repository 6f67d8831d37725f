"""Peers given by host name are resolved and dialled by address only: a peer dialled by name
and by address was two candidates for one node, and three nodes named ``localhost:PORT``
failed to form a ring in 1 of 10 tries."""

from __future__ import annotations

import logging
import socket
import threading
import time

import numpy as np

from ringtrain import JobKey, Node
from ringtrain.comm.endpoints import named_host
from ringtrain.discovery.names import NamedPeers, resolve
from ringtrain.testing import free_ports


def test_only_names_are_told_apart_from_addresses():
    assert named_host("tcp://node1:7077") == ("node1", 7077)
    assert named_host("tcp://localhost:9") == ("localhost", 9)
    assert named_host("tcp://127.0.0.1:9") is None
    assert named_host("tcp://[::1]:9") is None
    assert named_host("ipc:///tmp/x") is None


def _hosts_file_only(host: str, port: int) -> list[str]:
    """The real resolver for localhost (the hosts file answers it); any other name fails as
    an unknown one would, without a DNS query leaving this machine."""
    if host != "localhost":
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return resolve(host, port)


def test_a_name_that_does_not_resolve_yet_is_tried_again_and_logged_once(caplog):
    caplog.set_level(logging.WARNING, logger="ringtrain")
    found: list[list[str]] = []
    names = NamedPeers([("no-such-peer.invalid", 7077), ("localhost", 7078)], found.append,
                       resolver=_hosts_file_only)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(caplog.records) == 0:
            time.sleep(0.05)
        time.sleep(1.2)  # two more tries of the unresolved name
    finally:
        names.close()
    assert found == [["127.0.0.1:7078"]]  # reported once, though resolved on every try
    lines = [r.getMessage() for r in caplog.records if "no-such-peer.invalid" in r.getMessage()]
    assert len(lines) == 1 and "trying again" in lines[0], lines
    assert resolve("localhost", 5) == ["127.0.0.1:5"]


def test_three_nodes_given_each_other_by_name_form_and_dial_addresses_only(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("RINGTRAIN_DEVICE_DIR", str(tmp_path))
    ports = free_ports(3)
    key = JobKey.generate()
    nodes: list[Node | None] = [None] * 3
    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            nodes[i] = Node([f"localhost:{p}" for j, p in enumerate(ports) if j != i],
                            listen=f"127.0.0.1:{ports[i]}", key=key, node_id=f"n{i}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    try:
        assert not errors, errors
        assert all(n is not None and n.world_size == 3 for n in nodes)
        sums = [None] * 3

        def reduce(i: int) -> None:
            sums[i] = nodes[i].all_reduce(np.full(4, i + 1.0), timeout=30).tolist()

        workers = [threading.Thread(target=reduce, args=(i,)) for i in range(3)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(40)
        assert sums == [[6.0] * 4] * 3
        for node in nodes:
            assert not any("localhost" in e for e in node._transport.links().values()), \
                node._transport.links()
    finally:
        for node in nodes:
            if node is not None:
                node.close()
