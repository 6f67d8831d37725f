"""Who may join, over real sockets on 127.0.0.1: a wrong job key is named within seconds on
both sides; device identity, revocation and a key holder claiming another device's id.

Nodes run in threads of this process (each with its own sockets and engine thread), so the
test can read every node's log and state.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

from ringtrain.comm.security import JobKey
from ringtrain.errors import SecurityError
from ringtrain.node.node import Node
from ringtrain.testing import free_ports

NAMED_WITHIN_S = 10.0


def _ring(key: JobKey, endpoints: list[str], indexes: range, **options) -> list[Node]:
    """Nodes for ``indexes`` of ``endpoints``, started at once (their constructors wait for
    the ring)."""
    nodes: dict[int, Node] = {}
    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            nodes[i] = Node(endpoints, listen=endpoints[i], node_id=f"node-{i:02d}", key=key,
                            job="identity", **options)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in indexes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    if errors:
        for node in nodes.values():
            node.close()
        raise errors[0]
    return [nodes[i] for i in indexes]


def _all_reduce(nodes: list[Node]) -> list[float]:
    """One all-reduce of ones on every node at once; the sum, checked equal on all."""
    results: dict[int, list[float]] = {}
    threads = [threading.Thread(target=lambda i=i, n=n: results.__setitem__(
        i, n.all_reduce(np.ones(2), timeout=30).tolist())) for i, n in enumerate(nodes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(40)
    assert len(results) == len(nodes) and all(r == results[0] for r in results.values())
    return results[0]


def test_a_wrong_key_is_named_within_seconds_on_both_sides(caplog):
    caplog.set_level(logging.WARNING, logger="ringtrain")
    key, wrong = JobKey.generate(), JobKey.generate()
    endpoints = [f"127.0.0.1:{port}" for port in free_ports(3)]
    ring = _ring(key, endpoints, range(2), world_size=2)
    try:
        started = time.monotonic()
        with pytest.raises(SecurityError) as error:
            Node(endpoints, listen=endpoints[2], node_id="node-02", key=wrong, job="identity",
                 world_size=3)
        took = time.monotonic() - started
        assert _all_reduce(ring) == [2.0, 2.0]  # the ring goes on
    finally:
        for node in ring:
            node.close()
    text = str(error.value)
    print(f"\nthe node with the wrong key gave up after {took:.1f} s: {text}")
    assert took < NAMED_WITHIN_S
    assert "refused our key" in text and wrong.fingerprint[:8] in text
    assert any(endpoint in text for endpoint in endpoints[:2])
    ring_side = [r.getMessage() for r in caplog.records if r.threadName == "ringtrain-zap"]
    assert any("127.0.0.1 fails the key handshake: it holds another job key" in line
               for line in ring_side), ring_side
