""""Why can't I see my peer?": checks that name the cause and say what to do.

Used by ``ringtrain doctor`` and by a waiting ``ringtrain node`` after a few seconds without
a ring. Each check looks at something real: the mDNS adverts that arrive on the chosen
interface and on the others, the key fingerprints they carry, a TCP connection and a CURVE
handshake to every peer found or named, a unicast mDNS query straight to a named peer, and
the host's nftables rules.

Causes, each a :class:`Finding` with one sentence and what to do:

- ``container-bridge``: the chosen interface is a container or VM bridge (docker0, br-...,
  virbr..., cni..., podman...), where no other device lives;
- ``wrong-interface``: no node of the job answers on the chosen interface, but some do on
  another one;
- ``mdns-firewall``: this host's firewall drops mDNS (an nftables rule on UDP port 5353 or
  the mDNS group 224.0.0.251);
- ``multicast-dropped``: a named peer answers an mDNS query sent to it by unicast, yet no
  multicast answer arrives (a firewall on the way, a Wi-Fi access point isolating clients);
- ``no-multicast-answers``: nothing answers at all on the chosen interface (with the list
  of interfaces);
- ``other-key``: nodes of this job advertise another key fingerprint;
- ``port-closed``, ``handshake-refused``, ``unreachable``: a peer found or named, but its port
  refuses connections, its handshake refuses this job key, or nothing comes back;
- ``ok``: a peer that answers and holds the key.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..comm.endpoints import split_pin
from ..comm.handshakes import handshake_probe
from ..comm.security import JobKey
from ..discovery.advert import Advert
from ..discovery.interfaces import interface_table
from ..discovery.mdns import Discovery
from ..discovery.mdns_unicast import unicast_query
from ..errors import RingtrainError

# interface names of container and VM bridges: no other device of the LAN is there
CONTAINER_PREFIXES = ("docker", "br-", "virbr", "cni", "podman", "lxcbr", "lxdbr",
                      "flannel", "cali", "vmnet", "vboxnet", "veth", "kube", "weave")
NFT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Finding:
    """One cause found (or a peer that is fine: cause ``ok``)."""

    cause: str
    sentence: str
    fix: str = ""

    def lines(self) -> list[str]:
        """How a person reads it: the sentence, then what to do."""
        return [self.sentence] + ([f"  what to do: {self.fix}"] if self.fix else [])


def is_container_bridge(name: str) -> bool:
    """Whether an interface name is a container's or a VM's bridge."""
    return name.startswith(CONTAINER_PREFIXES)


def describe_interfaces(table: Sequence[tuple[str, list[str]]]) -> str:
    """``lo 127.0.0.1, eth0 10.0.0.2, docker0 172.17.0.1 (container bridge)``."""
    return ", ".join(f"{name} {' '.join(ips)}"
                     + (" (container bridge)" if is_container_bridge(name) else "")
                     for name, ips in table)


def chosen_interfaces(interface: str | None, table: Sequence[tuple[str, list[str]]]
                      ) -> list[tuple[str, list[str]]]:
    """The interfaces a node with ``--interface interface`` uses (default: every one but
    loopback, loopback only when it is all there is)."""
    if interface is not None:
        return [(n, ips if interface == n else [interface]) for n, ips in table
                if interface == n or interface in ips]
    outside = [(n, ips) for n, ips in table if not all(ip.startswith("127.") for ip in ips)]
    return outside or list(table)


def browse(addresses: Sequence[str], seconds: float) -> list[Advert]:
    """Every ringtrain advert (any job) that arrives on ``addresses`` within ``seconds``."""
    with Discovery(list(addresses)) as discovery:
        browser = discovery.browse(job=None)
        time.sleep(seconds)
        adverts = browser.adverts()
        browser.close()
    return adverts


def firewall_rules() -> list[str]:
    """nftables rules of this host (network namespace) that drop or reject mDNS; empty if
    none, or if nft is missing or not allowed to read them."""
    if shutil.which("nft") is None:
        return []
    try:
        done = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True,
                              timeout=NFT_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    rules = []
    for line in done.stdout.splitlines():
        text = line.strip()
        if ("drop" in text.split() or "reject" in text.split()) and (
                "5353" in text or "224.0.0.251" in text or "mdns" in text
                or "224.0.0.0/4" in text or "pkttype multicast" in text):
            rules.append(text)
    return rules


def _advert_endpoints(advert: Advert) -> list[str]:
    return [f"{address}:{advert.port}" for address in advert.addresses]


def _is_this_node(endpoint: str, own_port: int | None) -> bool:
    """Whether ``endpoint`` is this host on the node's own port: the node itself (every node
    may be given the same --peer list, and its own advert comes back by mDNS)."""
    host, _, port = endpoint.rpartition(":")
    if not own_port or port != str(own_port):
        return False
    return host == "localhost" or host.startswith("127.") or any(
        host in ips for _, ips in interface_table())


def check_peers(job: str, key: JobKey | None, adverts: Sequence[Advert],
                peers: Sequence[str], timeout: float,
                own_port: int | None = None) -> list[Finding]:
    """Adverts of ``job`` with another key; then a connection and a handshake to every
    advert with our key and every named peer but this node itself (``own_port``: its port;
    None or 0: unknown)."""
    findings = []
    fingerprint = key.fingerprint if key is not None else ""
    ours = [a for a in adverts if a.job == job]
    for advert in ours:
        if advert.key_fingerprint != fingerprint:
            findings.append(Finding(
                "other-key",
                f"node {advert.node_id} at {', '.join(_advert_endpoints(advert))} advertises "
                f"job {job!r} with key fingerprint {advert.key_fingerprint or '(none)'}, but "
                f"this node's key is {fingerprint or '(none)'}: it holds another job key",
                "use one job key everywhere: make it once (ringtrain keygen --out job.key) "
                "and copy that file to every device (--key-file job.key)"))
    targets = [(a.node_id, e) for a in ours if a.key_fingerprint == fingerprint
               for e in _advert_endpoints(a)[:1]]
    targets += [(None, endpoint) for endpoint in (split_pin(p)[1] for p in peers)
                if not _is_this_node(endpoint, own_port)]  # a pin is the node's to check
    results: dict[str, str] = {}

    def probe(endpoint: str) -> None:
        try:
            results[endpoint] = handshake_probe(endpoint, key, timeout)
        except RingtrainError as exc:
            results[endpoint] = f"error: {exc}"

    threads = [threading.Thread(target=probe, args=(e,), daemon=True) for _, e in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 2.0)
    for node_id, endpoint in targets:
        who = f"node {node_id} at {endpoint}" if node_id else f"peer {endpoint}"
        port = endpoint.rpartition(":")[2]
        outcome = results.get(endpoint, "timeout")
        if outcome == "ok":
            findings.append(Finding("ok", f"{who} answers and holds the job key"))
        elif outcome == "closed":
            findings.append(Finding(
                "port-closed", f"{who}: nothing listens on that port (connection refused)",
                f"check that ringtrain node runs there with --port {port}, and that no "
                f"firewall rejects TCP or UDP port {port} (UDP: its key door)"))
        elif outcome == "refused":
            findings.append(Finding(
                "handshake-refused", f"{who} refuses its key door or the handshake to this "
                f"job key: it holds another key, or it is not a ringtrain node",
                "use the same job key file on every device"))
        elif outcome == "timeout":
            findings.append(Finding(
                "unreachable", f"{who}: no answer within {timeout:.0f} s (a firewall drops "
                f"the packets, the host is down or asleep, or the process is stopped)",
                f"check the address; allow TCP and UDP port {port} through the firewall"))
        else:
            findings.append(Finding("unreachable", f"{who}: {outcome}", "check the address"))
    return findings


def diagnose(job: str, key: JobKey | None, interface: str | None = None,
             peers: Sequence[str] = (), seconds: float = 3.0, timeout: float = 3.0,
             adverts: Sequence[Advert] | None = None, mdns: bool = True,
             own_port: int | None = None) -> list[Finding]:
    """Run every check; the findings, causes first and peers that are fine last.

    Args:
        job: the job whose peers we look for.
        key: this node's job key (None: an insecure local ring).
        interface: the node's ``--interface`` (name or address), None for the default.
        peers: ``--peer`` addresses.
        seconds: how long to listen for adverts.
        timeout: bound on each connection attempt.
        adverts: adverts already seen on the chosen interface (skips listening there).
        mdns: False for a node that does not use discovery: only its peers are checked
            (no multicast is sent anywhere).
        own_port: the port of the node that asks (None: ``ringtrain doctor``, no node):
            this host on that port is the node itself, not a peer.
    """
    if not mdns:
        return sorted(check_peers(job, key, (), peers, timeout, own_port),
                      key=lambda f: f.cause == "ok")
    table = interface_table()
    chosen = chosen_interfaces(interface, table)
    findings: list[Finding] = []
    for name, ips in chosen:
        if is_container_bridge(name):
            findings.append(Finding(
                "container-bridge", f"interface {name} ({' '.join(ips)}) is a container or VM "
                f"bridge: no other device of your LAN is on it",
                "pick the interface of your LAN: --interface NAME (interfaces here: "
                f"{describe_interfaces(table)})"))
    chosen_ips = [ip for _, ips in chosen for ip in ips]
    others = [(n, ips) for n, ips in table if n not in {c for c, _ in chosen}
              and not all(ip.startswith("127.") for ip in ips)]
    seen: dict[str, list[Advert]] = {}

    def listen(name: str, ips: list[str]) -> None:
        try:
            seen[name] = browse(ips, seconds)
        except RingtrainError:
            seen[name] = []

    threads = [threading.Thread(target=listen, args=(n, ips), daemon=True) for n, ips in others]
    if adverts is None:
        threads.append(threading.Thread(target=listen, args=("\0chosen", chosen_ips),
                                        daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 10.0)
    here = list(adverts) if adverts is not None else seen.get("\0chosen", [])
    ours = [a for a in here if a.job == job
            and not any(_is_this_node(e, own_port) for e in _advert_endpoints(a))]
    if not ours:
        where = ", ".join(f"{n} ({' '.join(ips)})" for n, ips in chosen) or "no interface"
        elsewhere = {n: [a for a in seen.get(n, []) if a.job == job] for n, _ in others}
        elsewhere = {n: found for n, found in elsewhere.items() if found}
        rules = firewall_rules()
        multicast_dropped = []
        for peer in peers:
            host = peer.rpartition(":")[0]
            try:
                if unicast_query(host, timeout):
                    multicast_dropped.append(host)
            except RingtrainError:
                pass
        if elsewhere:
            name, found = next(iter(elsewhere.items()))
            findings.append(Finding(
                "wrong-interface", f"no node of job {job!r} answers on {where}, but on {name} "
                f"{len(found)} do ({', '.join(a.node_id for a in found)})",
                f"start the node with --interface {name}"))
        if rules:
            findings.append(Finding(
                "mdns-firewall", f"this host's firewall drops mDNS (UDP port 5353, group "
                f"224.0.0.251): nftables rule `{rules[0]}`",
                "allow mDNS through the firewall (UDP port 5353), or name the peers with "
                "--peer HOST:PORT (which needs no multicast)"))
        if multicast_dropped:
            findings.append(Finding(
                "multicast-dropped", f"{', '.join(multicast_dropped)} answers an mDNS query "
                f"sent to it directly, but no multicast answer arrives on {where}: multicast "
                f"is dropped on the way (a firewall, or a Wi-Fi access point isolating its "
                f"clients)", "name the peers with --peer HOST:PORT, or allow multicast"))
        if not (elsewhere or rules or multicast_dropped):
            findings.append(Finding(
                "no-multicast-answers", f"no mDNS answers for job {job!r} on {where} within "
                f"{seconds:.0f} s (interfaces here: {describe_interfaces(table)})",
                "start ringtrain node on the other devices of the same LAN; pick the LAN's "
                "interface with --interface NAME; or name peers with --peer HOST:PORT"))
    findings += check_peers(job, key, ours, peers, timeout, own_port)
    return sorted(findings, key=lambda f: f.cause == "ok")
