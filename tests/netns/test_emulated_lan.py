"""The emulated LAN harness: layout, isolation, shaping, loss, partitions and teardown.

Needs root and iproute2 (skips otherwise); drop/partition need Debian nftables.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from ringtrain.errors import ConfigError
from ringtrain.lab import netns
from ringtrain.lab.netns import EmulatedLan, teardown

ROOT = Path(__file__).resolve().parents[2]
PORT = 7700

# Accepts connections forever, closing each; the probe below connects to it.
LISTENER = (f"import socket\ns = socket.create_server(('', {PORT}))\n"
            "while True:\n    s.accept()[0].close()\n")
PROBE = ("import socket, sys\ntry:\n"
         f"    socket.create_connection((sys.argv[1], {PORT}), float(sys.argv[2])).close()\n"
         "    print('ok')\nexcept OSError as exc:\n    print('fail', exc)\n")


needs_nft = pytest.mark.skipif(shutil.which("nft") is None,
                               reason="nft missing: install Debian nftables")


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def reaches(lan: EmulatedLan, i: int, j: int, timeout: float = 0.5) -> bool:
    done = lan.run(i, [sys.executable, "-c", PROBE, lan.address(j), str(timeout)], timeout=10)
    return done.stdout.startswith("ok")


def wait_listening(lan: EmulatedLan, i: int, j: int) -> None:
    deadline = time.monotonic() + 10
    while not reaches(lan, i, j):
        if time.monotonic() > deadline:
            raise AssertionError(f"node {j}'s listener never came up")
        time.sleep(0.05)


@pytest.fixture
def lan() -> Iterator[EmulatedLan]:
    with EmulatedLan(3) as made:
        for j in range(3):
            made.popen(j, [sys.executable, "-c", LISTENER])
        for j in range(3):
            wait_listening(made, (j + 1) % 3, j)
        yield made


def test_layout_and_isolation(lan: EmulatedLan) -> None:
    names = [lan.namespace(i) for i in range(3)]
    assert set(names + [lan.bridge_namespace]) <= set(namespaces())
    assert [lan.address(i) for i in range(3)] == [
        str(lan.network.network_address + i + 2) for i in range(3)]
    routes = lan.run(0, ["ip", "route"]).stdout
    assert "default" not in routes and "224.0.0.0/4 dev eth0" in routes
    assert lan.run(0, ["cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6"]).stdout.strip() == "1"
    assert "inet6" not in lan.run(0, ["ip", "addr"]).stdout
    assert lan.run(0, ["cat", "/etc/resolv.conf"]).stdout == "nameserver 127.0.0.1\n"
    assert f"{lan.address(2)} {lan.namespace(2)}" in lan.run(0, ["cat", "/etc/hosts"]).stdout
    assert reaches(lan, 0, 2) and reaches(lan, 2, 1)
    with pytest.raises(ConfigError):
        lan.address(3)


@needs_nft
def test_partition_and_heal(lan: EmulatedLan) -> None:
    lan.partition([[0, 1]])  # node 2 is alone
    assert reaches(lan, 0, 1)
    assert not reaches(lan, 0, 2) and not reaches(lan, 2, 1)
    lan.heal()
    assert reaches(lan, 0, 2) and reaches(lan, 2, 1)
    with pytest.raises(ConfigError, match="two groups"):
        lan.partition([[0], [0, 1]])


@needs_nft
def test_drop_all_then_none(lan: EmulatedLan) -> None:
    lan.drop(1, 1.0, peer=2)
    assert not reaches(lan, 1, 2) and reaches(lan, 1, 0)
    lan.drop(1, 0.0, peer=2)
    assert reaches(lan, 1, 2)
    lan.drop(0, 1.0)
    assert not reaches(lan, 0, 1) and not reaches(lan, 2, 0)
    lan.heal()
    assert reaches(lan, 0, 1)
    with pytest.raises(ConfigError):
        lan.drop(0, 1.5)


def test_rate_shaping_bounds_throughput() -> None:
    rate_mbit = 20
    sink = (f"import socket\ns = socket.create_server(('', {PORT}))\nc = s.accept()[0]\n"
            "while c.recv(1 << 16):\n    pass\n")
    send = (f"import socket, sys, time\nc = socket.create_connection((sys.argv[1], {PORT}), 5)\n"
            "t = time.monotonic(); c.sendall(b'x' * 3_000_000); c.shutdown(1); c.recv(1)\n"
            "print(time.monotonic() - t)\n")
    with EmulatedLan(2, rate_mbit=rate_mbit) as lan:
        qdiscs = subprocess.run(["ip", "netns", "exec", lan.bridge_namespace, "tc", "qdisc"],
                                capture_output=True, text=True, check=True).stdout
        assert "tbf" in qdiscs and "20Mbit" in qdiscs
        lan.popen(1, [sys.executable, "-c", sink])
        time.sleep(0.3)
        done = lan.run(0, [sys.executable, "-c", send, lan.address(1)], timeout=30)
        seconds = float(done.stdout)
        measured = 3_000_000 * 8 / seconds / 1e6
        print(f"\nshaped to {rate_mbit} Mbit/s, measured {measured:.1f} Mbit/s")
        assert measured < rate_mbit * 1.3
        lan.set_rate(0, None)
        assert "tbf" not in lan.run(0, ["tc", "qdisc", "show", "dev", "eth0"]).stdout


def test_close_removes_everything_and_stops_processes() -> None:
    lan = EmulatedLan(2)
    proc = lan.popen(0, ["sleep", "60"])
    names = [lan.namespace(0), lan.namespace(1), lan.bridge_namespace]
    lan.close()
    assert proc.poll() is not None
    assert not set(names) & set(namespaces())
    assert not any(Path("/etc/netns", name).exists() for name in names)
    lan.close()  # idempotent
    with pytest.raises(ConfigError, match="closed"):
        lan.address(0)


def test_partial_setup_failure_cleans_up() -> None:
    prefix = "rt" + os.urandom(3).hex()
    real = netns._sh
    calls = {"n": 0}

    def failing(argv: list[str], *args: object, **kwargs: object) -> str:
        calls["n"] += 1
        if "master" in argv and calls["n"] > 8:  # fail half-way through the second node
            raise ConfigError("injected failure")
        return real(argv, *args, **kwargs)  # type: ignore[arg-type]

    with mock.patch.object(netns, "_sh", failing), pytest.raises(ConfigError, match="injected"):
        EmulatedLan(3, prefix=prefix)
    assert not [name for name in namespaces() if name.startswith(prefix + "-")]
    assert not [p for p in Path("/etc/netns").glob(prefix + "-*")]


def test_name_in_use_is_refused_and_bad_arguments() -> None:
    with EmulatedLan(1) as lan:
        with pytest.raises(ConfigError, match="already exist"):
            EmulatedLan(1, prefix=lan.prefix)
        assert lan.namespace(0) in namespaces()  # the refused one did not tear ours down
    bad_arguments: list[dict[str, Any]] = [
        {"n": 0}, {"n": 1, "prefix": "../x"}, {"n": 2, "subnet": "10.0.0.0/30"},
        {"n": 1, "subnet": "nonsense"}, {"n": 1, "rate_mbit": -1},
        {"n": 2, "sites": [0]}, {"n": 2, "sites": [0, -1]},
        {"n": 2, "sites": [0, 1], "uplink_mbit": 0},
    ]
    for bad in bad_arguments:
        with pytest.raises(ConfigError):
            EmulatedLan(**bad).close()
    with pytest.raises(ConfigError):
        teardown("not-ours")


def test_not_root_is_a_clear_config_error() -> None:
    with mock.patch.object(os, "geteuid", return_value=1000), \
            pytest.raises(ConfigError, match="root"):
        EmulatedLan(1)


def test_cli_up_and_down() -> None:
    prefix = "rt" + os.urandom(3).hex()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        up = subprocess.run([sys.executable, "-m", "ringtrain.lab.netns", "up", "2", "--prefix",
                             prefix, "--rate", "100"], capture_output=True, text=True,
                            env=env, timeout=60, check=False)
        assert up.returncode == 0, up.stderr
        assert f"{prefix}-1" in up.stdout and f"{prefix}-1" in namespaces()
        script = subprocess.run(["bash", str(ROOT / "deploy" / "lan.sh"), "down", prefix],
                                capture_output=True, text=True, env=env, timeout=60,
                                check=False)
        assert script.returncode == 0, script.stderr
        assert "removed 3 namespaces" in script.stdout
        assert not [n for n in namespaces() if n.startswith(prefix + "-")]
    finally:
        teardown(prefix)
