"""Job key files and ``ringtrain keygen``; the lint rule that keeps code-executing decoders
out of the package."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from ringtrain.cli import main as cli
from ringtrain.comm.endpoints import peer_endpoint
from ringtrain.comm.security import JobKey, read_key_file, write_key_file
from ringtrain.errors import ConfigError, SecurityError

ROOT = Path(__file__).resolve().parents[2]


def test_keygen_writes_an_owner_only_file_and_never_prints_the_key(tmp_path, capsys):
    path = tmp_path / "job.key"
    assert cli.main(["keygen", "--out", str(path)]) == 0
    out = capsys.readouterr().out
    key = read_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key.hex() not in out
    assert key.fingerprint in out
    assert f"RINGTRAIN_KEY_FILE={path}" in out and "--key-file" in out


def test_keygen_refuses_to_overwrite_unless_forced(tmp_path, capsys):
    path = tmp_path / "job.key"
    assert cli.main(["keygen", "--out", str(path)]) == 0
    first = read_key_file(path)
    assert cli.main(["keygen", "--out", str(path)]) == cli.EXIT_USAGE
    assert "--force" in capsys.readouterr().err
    assert read_key_file(path) == first
    path.chmod(0o644)
    assert cli.main(["keygen", "--out", str(path), "--force"]) == 0
    assert read_key_file(path) != first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # an overwritten file is tightened too


def test_a_key_file_others_can_read_is_refused(tmp_path):
    path = write_key_file(tmp_path / "k", JobKey.generate())
    path.chmod(0o640)
    with pytest.raises(SecurityError, match="chmod 600"):
        read_key_file(path)


def test_repr_never_shows_the_secret():
    key = JobKey.generate()
    assert key.hex() not in repr(key) and key.secret.hex() not in str(key)


def test_ruff_enforces_the_banned_decoders():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert "TID251" in config["select"] or "TID" in config["select"]
    banned = config["flake8-tidy-imports"]["banned-api"]
    assert {"pickle", "marshal", "shelve", "cloudpickle", "dill"} <= set(banned)


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_ruff_flags_pickle_in_the_package(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import pickle\n\n\ndef load(data: bytes) -> object:\n"
                     "    return pickle.loads(data)\n")
    done = subprocess.run(["ruff", "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"),
                           "--output-format", "concise", str(probe)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert "TID251" in done.stdout and "S301" in done.stdout, done.stdout + done.stderr


def test_a_planted_symlink_is_never_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "job.key"
    link.symlink_to(victim)
    with pytest.raises(ConfigError):
        write_key_file(link, JobKey.generate())
    assert victim.read_text() == "precious\n"
    write_key_file(link, JobKey.generate(), overwrite=True)  # replaces the link itself
    assert victim.read_text() == "precious\n" and not link.is_symlink()
    assert stat.S_IMODE(link.stat().st_mode) == 0o600


@pytest.mark.parametrize("text", ["bogus://x", "tcp://h:abc", "inproc://ring", "tcp://host:7077",
                                  "tcp://10.0.0.1:0", "tcp://10.0.0.1:70000", "tcp://::1:5",
                                  "tcp://224.0.0.251:5353", "tcp://0.0.0.0:7", "", "x" * 500,
                                  "tcp://10.0.0.1:+5", "tcp://10.0.0.1:٣"])
def test_peer_endpoints_must_be_tcp_ip_port(text):
    with pytest.raises(ConfigError):
        peer_endpoint(text)


def test_good_peer_endpoints_are_normalised():
    assert peer_endpoint("10.0.0.7:7077") == "tcp://10.0.0.7:7077"
    assert peer_endpoint("tcp://[::1]:5") == "tcp://[::1]:5"


def test_an_unspecified_host_passes_only_where_the_caller_supplies_the_address():
    """A peer listening on every address declares 0.0.0.0; the HELLO handler dials the port
    it declared at the address it saw the peer at (``Links._reachable_endpoint``)."""
    assert peer_endpoint("tcp://0.0.0.0:7411", allow_unspecified=True) == "tcp://0.0.0.0:7411"
    with pytest.raises(ConfigError):
        peer_endpoint("tcp://0.0.0.0:7411")
    with pytest.raises(ConfigError):
        peer_endpoint("tcp://224.0.0.251:7411", allow_unspecified=True)
