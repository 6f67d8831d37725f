"""An emulated LAN of Linux network namespaces, for end-to-end tests and benchmarks.

Linux and root only. Layout for ``EmulatedLan(3)`` with prefix ``rtab12cd``::

    rtab12cd-br   bridge br0 with ports p0 p1 p2; no uplink, no address
    rtab12cd-0    eth0 10.77.X.2/24  <-veth->  p0
    rtab12cd-1    eth0 10.77.X.3/24  <-veth->  p1
    rtab12cd-2    eth0 10.77.X.4/24  <-veth->  p2

With ``sites`` (say ``[0, 1, 0, 1]``) every site is a bridge of its own (``br0``, ``br1``
...) with one uplink to a core bridge ``brc``, shaped to ``uplink_mbit``: traffic between
sites shares that uplink, as between two rooms or two switches of one building.

Every node namespace has lo up, IPv6 off, no default route, a multicast route
224.0.0.0/4 via eth0 (mDNS crosses the bridge; snooping is off) and its own
``/etc/netns/NAME/{hosts,resolv.conf}`` (resolver 127.0.0.1), so nothing can leak to
the host's network. Rates are shaped with tbf on both ends of a node's link (this
kernel has no netem: delay cannot be emulated). Loss and partitions are nftables rules
inside the node namespaces (table ``inet ringtrain``). With ``cpu_cores`` every node is
also a device with its own CPU budget (:mod:`ringtrain.lab.cpu_budget`, cgroup ``PREFIX-<i>``),
node i pinned to core i mod cores: what runs in it gets that fraction of a core, as a small
board would.

    with EmulatedLan(4, rate_mbit=1000, cpu_cores=0.45) as lan:
        proc = lan.popen(0, ["python", "-m", "ringtrain.cli.demo"])
        lan.partition([[0, 1], [2, 3]])

CLI for humans: ``python -m ringtrain.lab.netns up 4 --rate 1000`` / ``down PREFIX``.
Needs iproute2, nftables (only for drop/partition) and procps.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import ringtrain.lab.cpu_budget as cpu_budget
from ringtrain.errors import ConfigError

_PREFIX_RE = re.compile(r"rt[a-z0-9]{1,10}")
_NETNS_ETC = Path("/etc/netns")
_COMMAND_TIMEOUT_S = 20.0
_TERMINATE_GRACE_S = 2.0
_NFT_TABLE = "ringtrain"


def require_support() -> None:
    """Check that this process can build an emulated LAN.

    Raises:
        ConfigError: not Linux, not root, or ``ip`` (iproute2) missing; the message says which.
    """
    if not sys.platform.startswith("linux"):
        raise ConfigError(f"network namespaces need Linux, this is {sys.platform}")
    if os.geteuid() != 0:
        raise ConfigError("network namespaces need root (run as root or skip netns tests)")
    for tool in ("ip", "tc", "sysctl"):
        if shutil.which(tool) is None:
            raise ConfigError(f"{tool!r} not found: install Debian packages iproute2 and procps")


def _sh(argv: Sequence[str], timeout: float = _COMMAND_TIMEOUT_S,
        stdin: str | None = None) -> str:
    """Run a setup command; raise ConfigError naming it if it fails."""
    try:
        done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"`{' '.join(argv)}` could not run: {exc}") from exc
    if done.returncode != 0:
        raise ConfigError(f"`{' '.join(argv)}` failed ({done.returncode}): "
                          f"{done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _sh(["ip", "netns", "list"]).splitlines() if line.strip()]


def _owned_by(prefix: str, name: str) -> bool:
    return re.fullmatch(re.escape(prefix) + r"-(br|[0-9]+)", name) is not None


def teardown(prefix: str) -> list[str]:
    """Remove every namespace ``PREFIX-br`` / ``PREFIX-<i>``, its processes, /etc/netns files
    and CPU budgets (cgroups ``PREFIX-<i>``).

    Safe after a partial setup and when nothing is left.

    Returns:
        The namespaces removed.

    Raises:
        ConfigError: ``prefix`` is not an emulated-LAN prefix (``rt`` + 1-10 of [a-z0-9]).
    """
    if not _PREFIX_RE.fullmatch(prefix):
        raise ConfigError(f"prefix must match {_PREFIX_RE.pattern!r}, got {prefix!r}")
    names = [name for name in _namespaces() if _owned_by(prefix, name)]
    for name in names:
        _kill_namespace_processes(name)
    for name in names:
        subprocess.run(["ip", "netns", "del", name], capture_output=True,
                       timeout=_COMMAND_TIMEOUT_S, check=False)
    if _NETNS_ETC.is_dir():
        for path in _NETNS_ETC.iterdir():
            if _owned_by(prefix, path.name):
                shutil.rmtree(path, ignore_errors=True)
    for group in cpu_budget.groups():
        if _owned_by(prefix, group):
            cpu_budget.remove(group)
    return names


def _kill_namespace_processes(name: str) -> None:
    """SIGTERM, then SIGKILL, every process left inside namespace ``name``."""
    def pids() -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                             timeout=_COMMAND_TIMEOUT_S, check=False).stdout
        return [int(pid) for pid in out.split() if pid.isdigit()]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        remaining = pids()
        if not remaining:
            return
        for pid in remaining:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + _TERMINATE_GRACE_S
        while time.monotonic() < deadline and pids():
            time.sleep(0.05)


def _check_rate(mbit: float | None) -> None:
    if mbit is not None and (isinstance(mbit, bool) or not 0 < mbit <= 100_000):
        raise ConfigError(f"rate must be in (0, 100000] Mbit/s or None, got {mbit!r}")


def _shape(namespace: str, device: str, mbit: float) -> None:
    """Shape what ``device`` sends to ``mbit`` Mbit/s (tbf)."""
    # Burst of 1 ms at line rate (125 KB at 1 Gbit/s), at least 32 KB so slow links still
    # pass a full GSO segment; 20 ms of queue.
    burst = max(int(mbit * 1e6 / 8 / 1000), 32 * 1024)
    _sh(["ip", "netns", "exec", namespace, "tc", "qdisc", "replace", "dev", device, "root",
         "tbf", "rate", f"{mbit}mbit", "burst", str(burst), "latency", "20ms"])


def _build_layout(bridge: str, nodes: list[tuple[str, str]], sites: list[int],
                  prefixlen: int, uplink_mbit: float | None) -> None:
    """Create the namespaces, bridges and links of the module docstring's layout.

    Args:
        bridge: the namespace that holds the bridges.
        nodes: every node's (namespace, address), by index.
        sites: every node's site; one bridge per site, joined by uplinks if more than one.
        prefixlen: the LAN's prefix length.
        uplink_mbit: the rate of every site's uplink, both ways (None: unshaped).
    """
    _add_namespace(bridge)
    distinct = sorted(set(sites))
    for site in distinct:
        _add_bridge(bridge, f"br{site}")
    if len(distinct) > 1:
        _add_bridge(bridge, "brc")
        for site in distinct:  # uplink u<site> in the site's bridge, c<site> in the core
            _sh(["ip", "-n", bridge, "link", "add", f"u{site}", "type", "veth",
                 "peer", "name", f"c{site}"])
            _sh(["ip", "-n", bridge, "link", "set", f"u{site}", "master", f"br{site}", "up"])
            _sh(["ip", "-n", bridge, "link", "set", f"c{site}", "master", "brc", "up"])
            if uplink_mbit is not None:
                for device in (f"u{site}", f"c{site}"):
                    _shape(bridge, device, uplink_mbit)
    lines = ["127.0.0.1 localhost"] + [f"{address} {node}" for node, address in nodes]
    for i, (node, address) in enumerate(nodes):
        _add_namespace(node)
        etc = _NETNS_ETC / node
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text("\n".join(lines) + "\n")
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        _sh(["ip", "-n", bridge, "link", "add", f"p{i}", "type", "veth",
             "peer", "name", "eth0", "netns", node])
        _sh(["ip", "-n", bridge, "link", "set", f"p{i}", "master", f"br{sites[i]}", "up"])
        _sh(["ip", "-n", node, "addr", "add", f"{address}/{prefixlen}", "dev", "eth0"])
        _sh(["ip", "-n", node, "link", "set", "eth0", "up"])
        # No default route: only the LAN is reachable. mDNS needs a multicast route.
        _sh(["ip", "-n", node, "route", "add", "224.0.0.0/4", "dev", "eth0"])


def _add_bridge(namespace: str, name: str) -> None:
    # snooping off: mDNS must reach every port
    _sh(["ip", "-n", namespace, "link", "add", name, "type", "bridge", "mcast_snooping", "0"])
    _sh(["ip", "-n", namespace, "link", "set", name, "up"])


def _add_namespace(name: str) -> None:
    _sh(["ip", "netns", "add", name])
    _sh(["ip", "-n", name, "link", "set", "lo", "up"])
    # IPv6 off before any interface exists, so none gets a link-local address.
    _sh(["ip", "netns", "exec", name, "sysctl", "-q", "-w",
         "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])


class EmulatedLan:
    """``n`` node namespaces on one bridge; see the module docstring for the layout.

    Args:
        n: number of nodes, 1-200.
        rate_mbit: shape every link to this rate (Mbit/s) in both directions; None
            leaves them unshaped.
        prefix: namespace name prefix (``rt`` + 1-10 of [a-z0-9]); a random one by default.
        subnet: an IPv4 /24 (or larger) for the nodes; ``10.77.<random>.0/24`` by default.
        cpu_cores: give every node a CPU budget of this many cores, at most 1 (a cgroup
            quota; every command run in the node runs inside it, node i on core i mod
            cores), or a list of every node's budget; None leaves the CPU unlimited.
        sites: the site (0, 1, ...) of every node: one bridge per site, joined by uplinks
            to a core bridge; None puts every node on one bridge.
        uplink_mbit: with ``sites``, the rate of every site's uplink, both ways (None:
            unshaped).

    Raises:
        ConfigError: bad arguments, no support (:func:`require_support`, and for
            ``cpu_cores`` :func:`ringtrain.lab.cpu_budget.hierarchy`), a name in use, or a setup
            command failed. Everything created so far is removed first.
    """

    def __init__(self, n: int, rate_mbit: float | None = None, prefix: str | None = None,
                 subnet: str | None = None, cpu_cores: float | Sequence[float] | None = None,
                 sites: Sequence[int] | None = None, uplink_mbit: float | None = None
                 ) -> None:
        require_support()
        if cpu_cores is not None:
            cpu_budget.hierarchy()
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 200:
            raise ConfigError(f"n must be an integer in [1, 200], got {n!r}")
        self.prefix = prefix if prefix is not None else "rt" + secrets.token_hex(3)
        if not _PREFIX_RE.fullmatch(self.prefix):
            raise ConfigError(f"prefix must match {_PREFIX_RE.pattern!r}, got {self.prefix!r}")
        if subnet is None:
            subnet = f"10.77.{secrets.randbelow(256)}.0/24"
        try:
            self.network = ipaddress.IPv4Network(subnet)
        except ValueError as exc:
            raise ConfigError(f"subnet must be an IPv4 network, got {subnet!r}") from exc
        if self.network.num_addresses < n + 3:
            raise ConfigError(f"subnet {subnet} is too small for {n} nodes")
        self.n = n
        if sites is None:
            sites = [0] * n
        if len(sites) != n or any(isinstance(x, bool) or not isinstance(x, int) or x < 0
                                  for x in sites):
            raise ConfigError(f"sites must be {n} site numbers >= 0, got {sites!r}")
        self.sites = list(sites)
        _check_rate(uplink_mbit)
        self.uplink_mbit = uplink_mbit
        self.bridge_namespace = f"{self.prefix}-br"
        self._hosts = [self.network.network_address + i + 2 for i in range(n)]
        self._rates: list[float | None] = [None] * n
        self._drops: list[dict[int | None, float]] = [{} for _ in range(n)]
        self._blocked: list[set[int]] = [set() for _ in range(n)]
        self._dummies = [0] * n
        self._processes: list[subprocess.Popen[bytes] | subprocess.Popen[str]] = []
        self._budgets: list[cpu_budget.CpuBudget] = []
        self._closed = False
        taken = [name for name in _namespaces() if _owned_by(self.prefix, name)]
        if taken:
            raise ConfigError(f"namespaces {taken} already exist; pick another prefix or run "
                              f"`python -m ringtrain.lab.netns down {self.prefix}`")
        try:
            _build_layout(self.bridge_namespace,
                          [(self.namespace(i), self.address(i)) for i in range(n)], self.sites,
                          self.network.prefixlen, uplink_mbit)
            if rate_mbit is not None:
                for i in range(n):
                    self.set_rate(i, rate_mbit)
            if cpu_cores is not None:
                shares = [cpu_cores] * n if isinstance(cpu_cores, (int, float)) \
                    else list(cpu_cores)
                if len(shares) != n:
                    raise ConfigError(f"cpu_cores must be one budget or {n}, got {cpu_cores!r}")
                cores = sorted(os.sched_getaffinity(0))
                for i in range(n):
                    self._budgets.append(cpu_budget.CpuBudget(self.namespace(i), shares[i],
                                                              core=cores[i % len(cores)]))
        except BaseException:
            self.close()
            raise

    def _node(self, i: int) -> int:
        if self._closed:
            raise ConfigError(f"emulated LAN {self.prefix} is closed")
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.n:
            raise ConfigError(f"node index must be in [0, {self.n}), got {i!r}")
        return i

    def address(self, i: int) -> str:
        """IPv4 address of node ``i`` on the LAN."""
        return str(self._hosts[self._node(i)])

    def namespace(self, i: int) -> str:
        """Network namespace name of node ``i``."""
        return f"{self.prefix}-{self._node(i)}"

    def command(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside node ``i``'s namespace (and CPU budget, if any)."""
        # the budget wraps `ip netns exec`: inside the namespace /sys is remounted, without
        # the cgroup hierarchy
        command = ["ip", "netns", "exec", self.namespace(i), *argv]
        return self._budgets[i].command(command) if self._budgets else command

    def popen(self, i: int, argv: Sequence[str],
              **kwargs: object) -> subprocess.Popen[bytes] | subprocess.Popen[str]:
        """Start ``argv`` in node ``i``'s namespace; :meth:`close` stops it if still running."""
        process: subprocess.Popen[bytes] | subprocess.Popen[str]
        process = subprocess.Popen(self.command(i, argv), **kwargs)  # type: ignore[call-overload]
        self._processes.append(process)
        return process

    def run(self, i: int, argv: Sequence[str],
            timeout: float = _COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in node ``i``'s namespace to completion, capturing text output.

        Raises:
            subprocess.TimeoutExpired: it ran longer than ``timeout`` seconds (it is killed).
        """
        return subprocess.run(self.command(i, argv), capture_output=True, text=True,
                              timeout=timeout, check=False)

    def set_rate(self, i: int, mbit: float | None) -> None:
        """Shape node ``i``'s link to ``mbit`` Mbit/s both ways; None removes the shaping."""
        self._node(i)
        _check_rate(mbit)
        ends = [(self.namespace(i), "eth0"), (self.bridge_namespace, f"p{i}")]
        for namespace, device in ends:
            if mbit is not None:
                _shape(namespace, device, mbit)
            elif self._rates[i] is not None:
                _sh(["ip", "netns", "exec", namespace, "tc", "qdisc", "del", "dev", device,
                     "root"])
        self._rates[i] = mbit

    def drop(self, i: int, probability: float, peer: int | None = None) -> None:
        """Drop packets node ``i`` sends or receives on eth0 with ``probability``.

        Args:
            i: the node.
            probability: in [0, 1]; 0 removes the rule.
            peer: only packets to and from this node; None means all traffic.
        """
        self._node(i)
        if peer is not None:
            self._node(peer)
        if not 0.0 <= probability <= 1.0:
            raise ConfigError(f"probability must be in [0, 1], got {probability!r}")
        if probability == 0.0:
            self._drops[i].pop(peer, None)
        else:
            self._drops[i][peer] = probability
        self._apply_rules(i)

    def partition(self, groups: Sequence[Sequence[int]]) -> None:
        """Cut the LAN into groups that cannot reach each other (multicast included).

        Nodes in no group form one more group together; ``partition([[3]])`` isolates
        node 3. Replaces any earlier partition.

        Raises:
            ConfigError: a node index is out of range or appears twice.
        """
        member_of: dict[int, int] = {}
        for g, group in enumerate(groups):
            for i in group:
                self._node(i)
                if i in member_of:
                    raise ConfigError(f"node {i} appears in two groups of {groups!r}")
                member_of[i] = g
        rest = len(groups)
        for i in range(self.n):
            mine = member_of.get(i, rest)
            self._blocked[i] = {j for j in range(self.n) if member_of.get(j, rest) != mine}
            self._apply_rules(i)

    def heal(self) -> None:
        """Remove every partition and drop rule."""
        for i in range(self.n):
            self._blocked[i] = set()
            self._drops[i] = {}
            self._apply_rules(i)

    def _apply_rules(self, i: int) -> None:
        """Replace node ``i``'s nftables table with one built from the current state."""
        namespace = self.namespace(i)
        flush = f"table inet {_NFT_TABLE}\ndelete table inet {_NFT_TABLE}\n"
        if not self._blocked[i] and not self._drops[i]:
            _sh(["ip", "netns", "exec", namespace, "nft", "-f", "-"], stdin=flush)
            return
        chains = {"input": ("iifname", "saddr"), "output": ("oifname", "daddr")}
        body = []
        for chain, (device, direction) in chains.items():
            rules = []
            if self._blocked[i]:
                peers = ", ".join(self.address(j) for j in sorted(self._blocked[i]))
                rules.append(f'{device} "eth0" ip {direction} {{ {peers} }} drop')
            for peer, probability in self._drops[i].items():
                match = "" if peer is None else f" ip {direction} {self.address(peer)}"
                threshold = round(probability * 1_000_000)
                chance = "" if threshold >= 1_000_000 else \
                    f" numgen random mod 1000000 < {threshold}"
                rules.append(f'{device} "eth0"{match}{chance} drop')
            body.append(f"  chain {chain} {{\n    type filter hook {chain} priority 0;\n"
                        + "".join(f"    {rule}\n" for rule in rules) + "  }\n")
        script = flush + f"table inet {_NFT_TABLE} {{\n" + "".join(body) + "}\n"
        if shutil.which("nft") is None:
            raise ConfigError("'nft' not found: install the Debian package nftables")
        _sh(["ip", "netns", "exec", namespace, "nft", "-f", "-"], stdin=script)

    def add_dummy_interface(self, i: int, address: str) -> str:
        """Give node ``i`` a second interface (up) with ``address`` ("a.b.c.d/len") leading nowhere.

        It is one end of a veth pair whose other end stays in the node, unaddressed
        (this kernel has no ``dummy`` link type): like a host's second NIC on another
        network, it carries multicast and reaches no peer.

        Returns:
            The new interface's name.
        """
        namespace = self.namespace(i)
        try:
            interface = ipaddress.IPv4Interface(address)
        except ValueError as exc:
            raise ConfigError(f"address must be IPv4 like 10.99.0.1/24, got {address!r}") \
                from exc
        name = f"dummy{self._dummies[i]}"
        _sh(["ip", "-n", namespace, "link", "add", name, "type", "veth", "peer", "name",
             f"{name}p"])
        self._dummies[i] += 1
        _sh(["ip", "-n", namespace, "addr", "add", str(interface), "dev", name])
        _sh(["ip", "-n", namespace, "link", "set", f"{name}p", "up"])
        _sh(["ip", "-n", namespace, "link", "set", name, "up"])
        return name

    def close(self) -> None:
        """Stop processes started here, then remove CPU budgets, namespaces, links and
        /etc/netns files."""
        if self._closed:
            return
        self._closed = True
        for process in self._processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + _TERMINATE_GRACE_S
        for process in self._processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(_TERMINATE_GRACE_S)
        for budget in self._budgets:
            budget.close()
        teardown(self.prefix)

    def __enter__(self) -> EmulatedLan:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ringtrain.lab.netns up N [--rate MBIT] [--prefix P]`` or ``down PREFIX``."""
    parser = argparse.ArgumentParser(prog="python -m ringtrain.lab.netns",
                                     description="Build or remove an emulated LAN.")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="create N node namespaces on a bridge and leave them")
    up.add_argument("n", type=int)
    up.add_argument("--rate", type=float, default=None, help="link rate in Mbit/s")
    up.add_argument("--prefix", default=None, help="namespace prefix (default: random rt...)")
    up.add_argument("--subnet", default=None, help="IPv4 subnet (default 10.77.<random>.0/24)")
    up.add_argument("--sites", default=None,
                    help="site of each node, e.g. 0,1,0,1: a bridge per site, with uplinks")
    up.add_argument("--uplink", type=float, default=None, help="--sites: uplink Mbit/s")
    down = commands.add_parser("down", help="remove the namespaces of a prefix")
    down.add_argument("prefix")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            sites = None if args.sites is None else [int(x) for x in args.sites.split(",")]
            lan = EmulatedLan(args.n, rate_mbit=args.rate, prefix=args.prefix,
                              subnet=args.subnet, sites=sites, uplink_mbit=args.uplink)
            rate = f"{args.rate:g} Mbit/s" if args.rate else "unshaped"
            print(f"prefix {lan.prefix}  subnet {lan.network}  links {rate}")
            for i in range(lan.n):
                print(f"  {lan.namespace(i)}  {lan.address(i)}  site {lan.sites[i]}")
            print(f"run:    ip netns exec {lan.namespace(0)} COMMAND")
            print(f"remove: python -m ringtrain.lab.netns down {lan.prefix}")
        else:
            removed = teardown(args.prefix)
            print(f"removed {len(removed)} namespaces: {' '.join(removed) or '-'}")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
