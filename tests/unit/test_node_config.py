"""A node refused for its arguments leaves nothing open: its port and its device key are
free for the next try."""

from __future__ import annotations

import pytest

from ringtrain import ConfigError, JobKey, Node
from ringtrain.testing import free_ports


def test_bad_ring_sizes_leave_the_port_and_the_device_key_free(tmp_path, monkeypatch):
    monkeypatch.setenv("RINGTRAIN_DEVICE_DIR", str(tmp_path))
    port = free_ports(1)[0]
    key = JobKey.generate()
    with pytest.raises(ConfigError, match="min_size <= world_size <= max_size"):
        Node(listen=f"127.0.0.1:{port}", key=key, node_id="n0", min_size=3, max_size=2)
    # the same port and the same device (its key is locked while a node holds it)
    with Node(listen=f"127.0.0.1:{port}", key=key, node_id="n0") as node:
        assert node.endpoint == f"tcp://127.0.0.1:{port}"
        assert node.world_size == 1
