"""Every test keeps its device keys (``comm.identity``) in a folder of its own: a node, or a
command a test runs, never uses the user's ``~/.config/ringtrain/devices``, where two runs of
the suite on one host (two worktrees) would find each other's keys locked."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _own_device_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RINGTRAIN_DEVICE_DIR", str(tmp_path_factory.mktemp("devices")))
