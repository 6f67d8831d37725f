"""Every test in this folder runs across network namespaces: it is marked ``netns`` and
skipped, with the reason, where namespaces cannot be made (not Linux, not root, no iproute2)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ringtrain.errors import ConfigError
from ringtrain.lab.netns import require_support

HERE = Path(__file__).parent


def _unsupported() -> str | None:
    try:
        require_support()
    except ConfigError as exc:
        return str(exc)
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return None if probe.returncode == 0 else f"`ip netns` unavailable: {probe.stderr.strip()}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None
    for item in items:
        if item.path.parent != HERE:
            continue
        item.add_marker(pytest.mark.netns)
        reason = reason if reason is not None else (_unsupported() or "")
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
