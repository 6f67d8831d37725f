"""Without PyTorch, the torch integration says which extra to install."""

from __future__ import annotations

import sys

import pytest

from ringtrain.errors import ConfigError
from ringtrain.integrations import torch as integration


def test_missing_torch_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install 'ringtrain\[torch\]'"):
        integration.DataParallel(None, None)  # type: ignore[arg-type]
