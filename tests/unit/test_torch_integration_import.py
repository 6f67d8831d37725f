"""The torch integration: without PyTorch it says which extra to install; with it, `import
torch` alone registers the backend; torchrun's variables for a ring."""

from __future__ import annotations

import sys

import pytest

from ringtrain.errors import ConfigError
from ringtrain.integrations import torch as integration


def test_missing_torch_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install 'ringtrain\[torch\]'"):
        integration.DataParallel(None, None)  # type: ignore[arg-type]


def test_import_torch_alone_registers_the_backend():
    """The torch.backends entry point: no ringtrain import in the script."""
    pytest.importorskip("torch")
    import subprocess

    probe = subprocess.run(
        [sys.executable, "-c", "import sys, torch.distributed as d; "
         "print('ringtrain' in d.Backend.backend_list, 'ringtrain.node.node' in sys.modules)"],
        capture_output=True, text=True, timeout=170, check=True)
    assert probe.stdout.split() == ["True", "True"], probe.stderr


def test_torchrun_variables_describe_the_ring():
    from ringtrain.node.launch import torchrun_environment

    class Ring:  # what torchrun_environment reads of a formed node
        rank, world_size, generation, job = 2, 3, 7, "lab"

    env = torchrun_environment(Ring())  # type: ignore[arg-type]
    assert env["RANK"] == env["GROUP_RANK"] == env["ROLE_RANK"] == "2"
    assert env["WORLD_SIZE"] == env["GROUP_WORLD_SIZE"] == "3"
    assert (env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("0", "1")
    assert env["TORCHELASTIC_RUN_ID"] == "lab" and env["RINGTRAIN_GENERATION"] == "7"
