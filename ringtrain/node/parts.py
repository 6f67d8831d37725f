"""A node's parts below its engine, opened and wired together (:func:`open_parts`): the device
identity, the transport, the mailbox, same-host lanes, the membership links and the gate."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..comm.curve import new_curve_keypair
from ..comm.endpoints import named_host, normalize_endpoint, split_pin
from ..comm.identity import DeviceIdentity, derived_node_id, open_device
from ..comm.ledger import Ledger, ledger_file
from ..comm.mailbox import Mailbox
from ..comm.security import JobKey
from ..comm.shm import SharedMemoryLanes, open_lanes
from ..comm.transport import Transport
from ..comm.wire import job_id
from ..config import Settings
from ..errors import ConfigError, RingtrainError
from ..membership.links import Links
from ..membership.protocol import MembershipConfig
from .gate import Gate
from .names import default_name, default_node_id


@dataclass
class Parts:
    """What :func:`open_parts` opened; once the engine starts, its thread alone drives them."""

    node_id: str
    job_id: int
    device: DeviceIdentity | None
    transport: Transport
    mailbox: Mailbox
    lanes: SharedMemoryLanes | None
    membership: Links
    gate: Gate | None
    revoked: RingtrainError | None  # the ledger says this device was revoked (forming fails)
    form_size: int  # how many nodes the first ring waits for
    named_peers: list[tuple[str, int]]  # peers given by host name: resolved, then dialled


@dataclass
class RingSizes:
    """The ring sizes a node was asked for (``None``: the default of :class:`Node`)."""

    world_size: int | None
    min_size: int | None
    max_size: int | None
    elastic_start: bool  # peers come from candidates, discovery or DNS, not a fixed list


def open_parts(settings: Settings, job: str, node_id: str | None, listen: str,
               peers: Iterable[str], key: JobKey | None, device: DeviceIdentity | None,
               sizes: RingSizes, schema: str) -> Parts:
    """Open this node's parts and dial the ``peers`` given by address (those given by host
    name are left to :class:`~ringtrain.discovery.names.NamedPeers`). Without a given
    ``node_id``, it derives from the device key (with a key), else from the host name."""
    owned = device is None  # opened here, so closed here if the rest cannot open
    device = None if key is None else \
        device or open_device(node_id or default_name(), new_curve_keypair)
    if node_id is None:
        node_id = default_node_id() if device is None else \
            derived_node_id(default_name(), device.key.public)
    transport = None
    try:
        transport = Transport(node_id, listen, settings, key, device.key if device else None)
        return _wire(settings, job, node_id, peers, key, device, sizes, schema, transport)
    except BaseException:  # nothing opened here outlives the failure
        if transport is not None:
            transport.close(linger=0)
        if device is not None and owned:
            device.close()
        raise


def _wire(settings: Settings, job: str, node_id: str, peers: Iterable[str], key: JobKey | None,
          device: DeviceIdentity | None, sizes: RingSizes, schema: str,
          transport: Transport) -> Parts:
    """The parts above the transport, wired together, and the ``peers`` given by address
    dialled (``FINGERPRINT@IP:PORT`` pins the device that must listen there).

    Raises:
        ConfigError: a peer given by host name is pinned (pin its address instead).
    """
    pins = dict(reversed([(normalize_endpoint(address), pin) for pin, address in
                          (split_pin(p) for p in peers)]))  # the first pin given wins
    given = {e: named_host(e) for e in pins if e != transport.endpoint}
    named = sorted({host for host in given.values() if host is not None})
    if any(pins[e] for e, host in given.items() if host is not None):
        raise ConfigError("a pinned peer (FINGERPRINT@...) must be given by IP address")
    peer_endpoints = {f"{pins[e]}@{e}" if pins[e] else e
                      for e, host in given.items() if host is None}
    config = membership_config(settings, sizes, len(given))
    job_number = job_id(job)
    mailbox = Mailbox(transport, job_number, settings.max_stash_bytes)
    lanes = open_lanes(node_id, settings.shm_lane_bytes, settings.segment_bytes)
    if lanes is not None:
        mailbox.doors = lanes
        transport.watch(lanes.fileno())
    membership = Links(
        node_id, job, job_number, transport, mailbox, config, schema, lanes=lanes,
        # a device counts its boots: a restart is recognised however the clock moved
        incarnation=device.incarnation if device is not None else None)
    gate, revoked = None, None
    if device is not None and key is not None:
        directory = device.path.parent if device.path is not None else None
        ledger = Ledger.open(ledger_file(directory, key.fingerprint) if directory else None)
        gate = Gate(device, ledger, transport, mailbox, membership, job)
        membership.admit = gate.admit
        if device.fingerprint in ledger.revoked:  # told so before it stopped
            revoked = gate.revoked_error()
    membership.add_candidates(peer_endpoints)
    return Parts(node_id, job_number, device, transport, mailbox, lanes, membership, gate,
                 revoked, config.form_size, named)


def membership_config(settings: Settings, sizes: RingSizes, peers: int) -> MembershipConfig:
    """The sizes checked and their defaults filled in (with ``peers`` other static peers),
    with the membership timings of ``settings``."""
    min_size = 1 if sizes.min_size is None else sizes.min_size
    max_size = max(min_size, 64) if sizes.max_size is None else sizes.max_size
    world_size = sizes.world_size
    if world_size is None:
        world_size = min_size if sizes.elastic_start else peers + 1
    if not 1 <= min_size <= max_size or not min_size <= world_size <= max_size:
        raise ConfigError(f"need 1 <= min_size <= world_size <= max_size, got min_size "
                          f"{min_size}, world_size {world_size}, max_size {max_size}")
    return MembershipConfig(
        form_size=world_size, min_size=min_size, max_size=max_size,
        settle=settings.settle if sizes.elastic_start else 0.0,
        heartbeat_interval=settings.heartbeat_interval,
        suspect_timeout=settings.heartbeat_timeout,
        round_timeout=max(0.5, 2 * settings.heartbeat_interval))
