"""The node: one process's membership in a ring, and the collectives it offers.

A :class:`Node` owns one engine thread, and that thread alone touches the sockets. The caller's
thread builds a collective, queues it and (for the blocking forms) waits for its result; the
engine runs queued collectives in order and, between them, answers control traffic (late
HELLOs, proposals). Collectives therefore overlap the caller's computation when started with
:meth:`Node.all_reduce_async`.

Every member must call the same collectives in the same order, as with MPI or
torch.distributed: the n-th collective of a generation on one node meets the n-th on every
other node.

Elasticity. When a member fails, the collectives in flight raise :class:`PeerFailedError` on
every survivor (nothing partial is ever returned). The caller then calls :meth:`Node.reform`,
which agrees on a new generation without the failed member (see ``membership``), and redoes
its step. New nodes are admitted the same way: :attr:`Node.reform_due` turns true, and the
caller reforms at a point all members agree on (the training layer fuses that flag into its
gradient all-reduce, so every member sees it after the same step).
"""

from __future__ import annotations

import logging
import os
import queue
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from ..comm.curve import new_curve_keypair
from ..comm.endpoints import is_loopback, normalize_endpoint
from ..comm.identity import DeviceIdentity, derived_node_id, open_device
from ..comm.ledger import Ledger, ledger_file
from ..comm.mailbox import Mailbox
from ..comm.security import JobKey, key_from_environment
from ..comm.shm import open_lanes
from ..comm.transport import Transport
from ..comm.wire import PROTOCOL_VERSION, job_id
from ..comm.zap import raise_fd_limit
from ..config import Settings
from ..discovery.advert import Advert
from ..discovery.dns import DnsPeers
from ..discovery.interfaces import usable_ipv4_addresses
from ..discovery.mdns import Announcer, Browser, Discovery
from ..errors import (
    CollectiveError,
    CollectiveTimeout,
    ConfigError,
    MembershipError,
    MismatchError,
    PeerFailedError,
    ProtocolError,
    RingtrainError,
)
from ..membership.links import Links
from ..membership.protocol import MembershipConfig, View
from ..ring import collectives
from ..ring import plan as ring
from ..ring.collectives import Collective
from ..ring.compression import Codec
from ..ring.link_probe import measure_link
from ..ring.runner import RingRunner
from .gate import Gate, is_ledger
from .wrong_key import WrongKeyDetector

log = logging.getLogger(__name__)

SNAPSHOT_INTERVAL = 0.5  # seconds between the engine's snapshots of state()

Builder = Callable[[int, int], Collective]  # (rank, world_size) -> collective
KEY_CHECK_INTERVAL = 0.5  # seconds between looks for evidence of a wrong key while forming


class Work:
    """A collective started with an ``*_async`` method. :meth:`wait` returns its result."""

    def __init__(self, build: Builder, timeout: float, step: int, spin: float = 0.0,
                 generation: int | None = None):
        self.build = build
        self.timeout = timeout
        self.step = step
        self.generation = generation  # the view it was started in (None: before any)
        self._spin = spin  # seconds wait() yields before it sleeps (Settings.spin_seconds)
        # a latch: held until the engine finishes the work (cheaper to wake than an Event,
        # which a small collective felt); every waiter passes it back on
        self._latch = threading.Lock()
        self._latch.acquire()
        self._finished = False
        self._result: Any = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        """Whether the collective has finished (successfully or not)."""
        return self._finished

    def wait(self, timeout: float | None = None) -> Any:
        """The collective's result, waiting at most ``timeout`` seconds (default: the
        collective's own timeout plus a second).

        Raises:
            CollectiveTimeout: the result did not come in time.
            CollectiveError: the collective failed on this node.
        """
        limit = self.timeout + 1.0 if timeout is None else timeout
        spin_until = time.monotonic() + min(self._spin, limit)
        while not self._finished and time.monotonic() < spin_until:
            os.sched_yield()
        if not self._latch.acquire(timeout=max(0.0, limit)):
            raise CollectiveTimeout(f"collective still running after {limit:.1f} s")
        self._latch.release()
        if self._error is not None:
            raise self._error
        return self._result

    def _finish(self, result: Any = None, error: BaseException | None = None) -> None:
        if self._finished:
            return  # the first outcome stands
        self._result, self._error = result, error
        self._finished = True
        self._latch.release()


class Node:
    """This process's node in a ring. Use as a context manager.

    Args:
        peers: addresses (``host:port``) of other nodes. Listing this node's own address too
            is fine, so every node can be given the same list.
        listen: address to listen on; port 0 picks a free port. Default: 127.0.0.1 on a free
            port, or with ``discover`` every interface (``0.0.0.0``).
        job: the job name; nodes of other jobs are never admitted.
        world_size: how many nodes the first ring waits for (default: with static peers, the
            distinct peers plus this node; with discovery, ``min_size``).
        min_size, max_size: bounds on the ring size as it shrinks and grows (elastic).
            Below ``min_size`` the job waits for nodes to come back; nodes beyond
            ``max_size`` are not admitted. Defaults 1 and 64.
        node_id: this node's unique id. Default with a key: the host name plus the
            device key's fingerprint (``comm.identity``), which nobody else can claim; a
            chosen id is bound to this device by every member that admits it. Without a
            key: the host name plus random digits. Ring order sorts by id, unless links are
            measured (``Settings.link_probe_bytes``): then ranks follow the measured order.
        settings: timeouts and limits (default: :meth:`Settings.from_env`).
        key: the job key (default: from ``RINGTRAIN_KEY_FILE`` or ``RINGTRAIN_KEY``). Every
            link is then authenticated and encrypted with CURVE.
        insecure: allow running with no key, unauthenticated and in clear text. Refused
            unless every address is loopback.
        candidates: extra endpoints to dial later, from another thread (e.g. mDNS discovery):
            a callable that registers a callback receiving lists of ``host:port``.
        schema: what every member must share, e.g. ``train.schema_of(facts)``: a node with
            another schema is refused when it says HELLO, and both values are named.
        discover: announce this node and find the others with mDNS / DNS-SD. Adverts are only
            candidates to dial: a peer is trusted only once its handshake proves the job key.
        interface: with ``discover``, the interface (name or IPv4 address) to announce and
            browse on; default: every non-loopback interface.
        peers_dns: a DNS name that lists the peers (a Kubernetes headless Service; its A
            records with this node's port, or SRV records for a ``_port._tcp.`` name), looked
            up again every few seconds as peers come and go (:mod:`ringtrain.discovery.dns`).
        device: this device's identity (default with a key: the device key file of this
            node's name in ``RINGTRAIN_DEVICE_DIR``, made on first use; ``comm.identity``).

    Raises:
        ConfigError: bad arguments; no key and not ``insecure``; ``insecure`` off loopback.
        MembershipError: the ring did not form within ``settings.form_timeout``.
    """

    def __init__(self, peers: Iterable[str] = (), *, listen: str | None = None,
                 job: str = "default", world_size: int | None = None,
                 min_size: int | None = None, max_size: int | None = None,
                 node_id: str | None = None, settings: Settings | None = None,
                 key: JobKey | None = None, insecure: bool = False,
                 candidates: Callable[[Callable[[list[str]], None]], None] | None = None,
                 schema: str = "", discover: bool = False, interface: str | None = None,
                 peers_dns: str | None = None, device: DeviceIdentity | None = None):
        self.settings = settings or Settings.from_env()
        raise_fd_limit()  # budgets on strangers' connections stay far below the limit
        if node_id is not None:
            check_name("node id", node_id, MAX_NODE_ID)
        check_name("job", job, MAX_JOB)
        self.job = job
        self._job_id = job_id(job)
        peers = list(peers)
        if listen is None:
            listen = "0.0.0.0:0" if (discover or peers_dns) and not _is_loopback_name(interface) \
                else "127.0.0.1:0"
        key = key or key_from_environment()
        if key is None:
            _check_insecure_allowed(insecure, [listen, *peers])
        self.key = key
        self._device = None if key is None else \
            device or open_device(node_id or default_name(), new_curve_keypair)
        if node_id is None:
            node_id = default_node_id() if self._device is None else \
                derived_node_id(default_name(), self._device.key.public)
        self.node_id = node_id
        try:
            self._transport = Transport(self.node_id, listen, self.settings, key,
                                        self._device.key if self._device else None)
        except BaseException:
            if self._device is not None and device is None:
                self._device.close()
            raise
        self.endpoint = self._transport.endpoint
        peer_endpoints = {normalize_endpoint(p) for p in peers} - {self.endpoint}
        min_size = 1 if min_size is None else min_size
        max_size = max(min_size, 64) if max_size is None else max_size
        elastic_start = candidates is not None or discover or peers_dns is not None
        if world_size is None:
            world_size = min_size if elastic_start else len(peer_endpoints) + 1
        if not 1 <= min_size <= max_size or not min_size <= world_size <= max_size:
            raise ConfigError(f"need 1 <= min_size <= world_size <= max_size, got min_size "
                              f"{min_size}, world_size {world_size}, max_size {max_size}")
        self._mailbox = Mailbox(self._transport, self._job_id, self.settings.max_stash_bytes)
        self._lanes = open_lanes(self.node_id, self.settings.shm_lane_bytes,
                                 self.settings.segment_bytes)
        if self._lanes is not None:
            self._mailbox.doors = self._lanes
            self._transport.watch(self._lanes.fileno())
        self._membership = Links(
            self.node_id, job, self._job_id, self._transport, self._mailbox, MembershipConfig(
                form_size=world_size, min_size=min_size, max_size=max_size,
                settle=self.settings.settle if elastic_start else 0.0,
                heartbeat_interval=self.settings.heartbeat_interval,
                suspect_timeout=self.settings.heartbeat_timeout,
                round_timeout=max(0.5, 2 * self.settings.heartbeat_interval)),
            schema, lanes=self._lanes,
            # a device counts its boots: a restart is recognised however the clock moved
            incarnation=self._device.incarnation if self._device is not None else None)
        self._gate: Gate | None = None
        self._key_error: RingtrainError | None = None  # why forming cannot succeed
        if self._device is not None:
            directory = self._device.path.parent if self._device.path is not None else None
            ledger = Ledger.open(ledger_file(directory, key.fingerprint) if directory else None)
            self._gate = Gate(self._device, ledger, self._transport, self._mailbox,
                              self._membership, job)
            self._membership.admit = self._gate.admit
            if self._device.fingerprint in ledger.revoked:  # told so before it stopped
                self._key_error = self._gate.revoked_error()
        self._membership.add_candidates(peer_endpoints)
        self._runner = RingRunner(self._transport, self._mailbox, self.node_id, self._job_id,
                                  self.settings.progress_floor, self.settings.progress_timeout,
                                  self._service, self.settings.heartbeat_interval, self._lanes)
        self._view: View | None = None  # the view collectives run in: members in ring order
        self._installed: View | None = None  # the view membership agreed (sorted members)
        self._order_due = False  # the links of the installed view are still to be measured
        self._links: np.ndarray | None = None  # rates measured for the current view, bytes/s
        self._slow_links: tuple[bool, ...] | None = None  # by ring rank; None: not measured
        self._order_error: CollectiveError | None = None  # why this generation has no ring
        if world_size == 1 and not elastic_start:
            self._membership.alone()
            self._view = self._installed = self._membership.view
        self._sequence = 0
        self._ran_in = 0  # the generation of the last collective the engine ran
        # a view of another lineage installed under a running ring (two rings of the job
        # merged): no collective of it runs until the caller re-forms (and syncs state)
        self._merged_into: int | None = None
        self._snapshot: dict[str, Any] = {}  # state() as the engine last wrote it
        self._snapshot_at = 0.0
        self._queue: queue.SimpleQueue[Work | Callable[[], None] | None] = queue.SimpleQueue()
        self._new_candidates: queue.SimpleQueue[tuple[list[str], str]] = queue.SimpleQueue()
        self._view_listeners: list[Callable[[View], None]] = []
        # observe: the flight recorder (ringtrain.observe.recorder): the runner records each
        # collective, the views installed become formed / re-formed / joined / left events
        self.recorder = self._runner.recorder
        self.on_view_change(self.recorder.view_installed)
        self._closing = False
        self._formed = threading.Event()  # set once a view is announced
        if self._view is not None:
            self._formed.set()  # a ring of one, formed at once
        self._fatal: BaseException | None = None
        self._wrong_key = (WrongKeyDetector(job, key.fingerprint, time.monotonic())
                           if key is not None else None)
        self._last_key_check = 0.0
        self._dns_peers: DnsPeers | None = None
        self._thread = threading.Thread(target=self._engine, name=f"ringtrain-{self.node_id}",
                                        daemon=True)
        self._thread.start()
        if candidates is not None:
            candidates(self.add_candidates)
        self._discovery: Discovery | None = None
        self._announcer: Announcer | None = None
        self._browser: Browser | None = None
        try:
            if discover:
                self._start_discovery(interface)
            if peers_dns is not None:
                self._dns_peers = DnsPeers(peers_dns, int(self.endpoint.rpartition(":")[2]),
                                           self.add_candidates,
                                           interval=self.settings.dns_interval)
        except RingtrainError:
            self.close()
            raise
        if not self._wait_formed() or self._fatal is not None:
            state = self.state()
            self.close()
            if self._fatal is not None:
                raise MembershipError(f"node {self.node_id} failed while forming: "
                                      f"{self._fatal}") from self._fatal
            raise MembershipError(f"the ring did not form within "
                                  f"{self.settings.form_timeout:.0f} s (waiting for "
                                  f"{world_size} nodes); node state: {state}")

    def _start_discovery(self, interface: str | None) -> None:
        """Announce ourselves and dial every advert of our job that carries our key's
        fingerprint (adverts are hints; the handshake decides)."""
        addresses = usable_ipv4_addresses(interface)
        fingerprint = self.key.fingerprint if self.key is not None else ""
        port = int(self.endpoint.rpartition(":")[2])
        self._discovery = Discovery(addresses)

        def on_change(event: str, advert: Advert) -> None:
            if (event != "removed" and self._wrong_key is not None and advert.job == self.job
                    and advert.protocol == PROTOCOL_VERSION and advert.node_id != self.node_id):
                self._wrong_key.saw_advert(advert.node_id, advert.addresses, advert.port,
                                           advert.key_fingerprint, time.monotonic())
            if (event != "removed" and advert.node_id != self.node_id
                    and advert.key_fingerprint == fingerprint
                    and advert.protocol == PROTOCOL_VERSION):
                self.add_candidates([f"{address}:{advert.port}" for address in advert.addresses],
                                    source=f"advert:{advert.node_id}")

        self._browser = self._discovery.browse(job=self.job, on_change=on_change)
        self._announcer = self._discovery.announce(Advert(
            self.node_id, self.job, tuple(addresses), port, PROTOCOL_VERSION, fingerprint,
            0, "forming"))

        def advertise(view: View) -> None:
            if self._announcer is not None and not self._closing:
                self._announcer.update(generation=view.generation, state="training")

        self.on_view_change(advertise)

    def _wait_formed(self) -> bool:
        deadline = time.monotonic() + self.settings.form_timeout
        while not self._formed.wait(0.1):
            if self._key_error is not None:
                error = self._key_error
                self.close()
                raise error
            if self._membership.refusal:
                refusal = self._membership.refusal
                self.close()
                raise MembershipError(refusal)
            if time.monotonic() >= deadline:
                return False
        return True

    def add_candidates(self, endpoints: list[str], source: str = "extra") -> None:
        """Dial these ``IP:port`` endpoints (safe from any thread, e.g. mDNS callbacks), within
        the budgets of ``discovery.candidates``: ``source`` names who told us of them (an
        advert, say), for the per-source limits."""
        self._new_candidates.put((list(endpoints), source))
        self._transport.wake()

    def on_view_change(self, listener: Callable[[View], None]) -> None:
        """Call ``listener(view)`` on the engine thread whenever a view is installed (keep it
        quick: e.g. update an mDNS advert)."""
        self._view_listeners.append(listener)

    # properties -----------------------------------------------------------------------------

    @property
    def view(self) -> View:
        """The installed membership."""
        if self._view is None:
            raise MembershipError("the ring has not formed")
        return self._view

    @property
    def rank(self) -> int:
        """This node's position in the ring, 0 .. world_size-1."""
        return self.view.rank

    @property
    def world_size(self) -> int:
        """Number of members in the ring."""
        return self.view.world_size

    @property
    def generation(self) -> int:
        """The membership generation collectives currently run in."""
        return self.view.generation

    @property
    def members(self) -> tuple[str, ...]:
        """Member node ids in ring order."""
        return self.view.members

    @property
    def joined_running_ring(self) -> bool:
        """Whether the current view admitted this node into a ring that was already running
        (its state must come from the members, not from a fresh start)."""
        return self._membership.protocol.joined

    @property
    def reform_due(self) -> bool:
        """Whether the ring should re-form: a member is suspected, or a node waits to join.
        Every member must then call :meth:`reform` at the same point of its collectives."""
        return self._membership.protocol.reform_due

    def peer_endpoints(self) -> dict[str, str]:
        """The endpoint (``tcp://host:port``) this node dials each peer at, by node id
        (for ``ringtrain status`` and clock measurements; observe)."""
        return {peer: endpoint for peer, endpoint in self._transport.links().items()
                if not peer.startswith("tcp://")}

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` (or :meth:`leave`) was called."""
        return self._closing

    @property
    def bytes_sent(self) -> int:
        """Payload bytes this node has sent in collectives."""
        return self._runner.bytes_sent

    def state(self) -> dict[str, Any]:
        """What this node is doing, for hang diagnostics and ``ringtrain peers``: the engine's
        last snapshot (written every ``SNAPSHOT_INTERVAL`` and at every view change; safe to
        read from any thread, never iterating what the engine changes)."""
        snapshot = dict(self._snapshot) or {"node": self.node_id, "endpoint": self.endpoint,
                                            "job": self.job, "view": None}
        snapshot["fatal"] = None if self._fatal is None else repr(self._fatal)
        snapshot["stage"] = self._runner.stage
        return snapshot

    def _take_snapshot(self) -> None:
        """Write :meth:`state`'s answer (engine thread only)."""
        self._snapshot_at = time.monotonic()
        view, lanes = self._view, self._lanes
        self._snapshot = {
            "node": self.node_id, "endpoint": self.endpoint, "job": self.job,
            "view": None if view is None else {"generation": view.generation,
                                               "members": list(view.members), "rank": view.rank},
            "link_rates_mbit": self._link_rates_mbit(), "slow_links": self._slow_link_names(),
            "sequence": self._sequence, "membership": self._membership.state(),
            "dropped": {**self._mailbox.dropped,
                        **({"door": lanes.dropped} if lanes and lanes.dropped else {})},
            "shared_memory_peers": [] if lanes is None else lanes.peers(),
            "candidates": self._membership.candidates.state(),
            "identity": None if self._gate is None else self._gate.state(),
            "connections": self._transport.budget(),
            "peers_dns": None if self._dns_peers is None else list(self._dns_peers.endpoints)}

    def _slow_link_names(self) -> list[str] | None:
        """The ring's slow links ("a -> b"), which compressed all-reduces encode, if the
        links were measured."""
        slow, view = self._slow_links, self._view
        if slow is None or view is None:
            return None
        return [f"{m} -> {view.members[(k + 1) % view.world_size]}"
                for k, m in enumerate(view.members) if slow[k]]

    def _link_rates_mbit(self) -> dict[str, dict[str, float]] | None:
        """The measured rates of this view's links, {from: {to: Mbit/s}}, if measured."""
        links, installed = self._links, self._installed
        if links is None or installed is None:
            return None
        members = installed.members
        return {source: {target: round(float(rate) * 8e-6, 1)
                         for target, rate in zip(members, row, strict=True) if target != source}
                for source, row in zip(members, links, strict=True)}

    # collectives ----------------------------------------------------------------------------

    def all_reduce(self, array: Any, op: str = "sum", weight: float | None = None,
                   timeout: float | None = None, compression: str | Codec | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
        """Reduce ``array`` over all members; every member gets the same result.

        Args:
            array: any shape; float16/32/64 or integer (integers: op sum, max or min).
            op: "sum", "mean", "max" or "min".
            weight: with op="mean", this node's weight (e.g. its sample count): the result
                is sum(w_i * x_i) / sum(w_i).
            timeout: seconds (default ``settings.collective_timeout``).
            compression: None, or a codec name (``fp16``, ``int8``, ``topk[:RATIO]``, see
                ``ringtrain.ring.compression``) or a Codec, for float sums and means. Every member
                must pass the same; error-feedback state is kept per codec name and shapes.
            out: where to put the result: a writeable, C-contiguous numpy array of the
                same shape and dtype (``array`` itself reduces in place). Saves allocating
                (and the kernel zeroing) a new result array on every call. ``out`` is the
                collective's working buffer: when the call raises, it holds neither the
                input nor a result but partial sums (keep a copy, or recompute, before a
                retry). Compression state (the error-feedback residual) is restored on
                failure, so a retry counts nothing twice.
        """
        return self.all_reduce_async(array, op, weight, timeout, compression, out).wait()

    def all_reduce_async(self, array: Any, op: str = "sum", weight: float | None = None,
                         timeout: float | None = None, compression: str | Codec | None = None,
                         out: np.ndarray | None = None) -> Work:
        """Start :meth:`all_reduce`; ``wait()`` on the returned handle gives the result.
        With ``out``, leave that array alone until then: after
        ``wait`` raised :class:`CollectiveTimeout` the collective may still be writing to it,
        until :meth:`Work.done`; after any other error it holds partial sums."""
        array = np.array(array, copy=True) if out is None else _into(array, out)
        codec = self._runner.codec(compression)
        return self._submit(lambda rank, size: _single(
            collectives.all_reduce([array], op, weight, rank, size,
                                   self._runner.segment_elements, codec, owned=True,
                                   direct_bytes=self.settings.direct_bytes), out), timeout)

    def all_reduce_many(self, arrays: Sequence[Any], op: str = "sum",
                        weight: float | None = None, timeout: float | None = None,
                        compression: str | Codec | None = None) -> list[np.ndarray]:
        """Reduce many arrays of one dtype in a single pass around the ring (fused)."""
        return self.all_reduce_many_async(arrays, op, weight, timeout, compression).wait()

    def all_reduce_many_async(self, arrays: Sequence[Any], op: str = "sum",
                              weight: float | None = None, timeout: float | None = None,
                              compression: str | Codec | None = None) -> Work:
        """Start :meth:`all_reduce_many`."""
        copies = [np.array(a, copy=True) for a in arrays]
        codec = self._runner.codec(compression)
        return self._submit(lambda rank, size: collectives.all_reduce(
            copies, op, weight, rank, size, self._runner.segment_elements, codec,
            direct_bytes=self.settings.direct_bytes), timeout)

    def reduce_scatter(self, array: Any, op: str = "sum", timeout: float | None = None
                       ) -> np.ndarray:
        """Reduce the flattened ``array``; rank r gets chunk r (sizes differ by at most 1)."""
        return self.reduce_scatter_async(array, op, timeout).wait()

    def reduce_scatter_async(self, array: Any, op: str = "sum", timeout: float | None = None
                             ) -> Work:
        """Start :meth:`reduce_scatter`."""
        array = np.array(array, copy=True)
        return self._submit(lambda rank, size: collectives.reduce_scatter(
            array, op, rank, size, self._runner.segment_elements), timeout)

    def all_gather(self, array: Any, timeout: float | None = None) -> np.ndarray:
        """Every member's ``array`` stacked in rank order: shape (world_size, *array.shape)."""
        return self.all_gather_async(array, timeout).wait()

    def all_gather_async(self, array: Any, timeout: float | None = None) -> Work:
        """Start :meth:`all_gather`."""
        array = np.array(array, copy=True)
        return self._submit(lambda rank, size: collectives.all_gather(
            array, rank, size, self._runner.segment_elements), timeout)

    def broadcast(self, array: Any, root: int = 0, timeout: float | None = None) -> np.ndarray:
        """The ``root`` member's ``array`` on every member (others pass same shape/dtype)."""
        return self.broadcast_async(array, root, timeout).wait()

    def broadcast_async(self, array: Any, root: int = 0, timeout: float | None = None) -> Work:
        """Start :meth:`broadcast`."""
        array = np.array(array, copy=True)
        return self._submit(lambda rank, size: collectives.broadcast(
            array, root, rank, size, self._runner.segment_elements), timeout)

    def barrier(self, timeout: float | None = None) -> None:
        """Return once every member has reached this barrier."""
        self.all_reduce(np.zeros(1, dtype=np.int8), timeout=timeout)

    def reform(self, timeout: float | None = None, since: int | None = None) -> View:
        """Agree on a new generation: drop suspected members, admit waiting joiners.

        Call it on every member after a collective raised :class:`PeerFailedError`, or when
        :attr:`reform_due` is true at a point every member agrees on. If the others already
        installed a newer generation meanwhile, this returns it at once.

        ``since``: the generation that failed (default: the current one). A caller that
        noticed a failure late passes the generation it failed in, so that a ring the others
        already re-formed past it is taken as it is, not re-formed again.

        Raises:
            MembershipError: no new ring within ``timeout`` (default
                ``settings.reform_timeout``), e.g. too few nodes alive or no majority.
        """
        limit = self.settings.reform_timeout if timeout is None else timeout
        done = threading.Event()
        outcome: list[Any] = []

        def run() -> None:  # on the engine thread, which alone knows the views
            try:
                failed = self._ran_in if since is None else since
                outcome.append(self._reform(failed, time.monotonic() + limit))
            except RingtrainError as exc:
                outcome.append(exc)
            done.set()

        self._check_open()
        self._queue.put(run)
        self._transport.wake()
        if not done.wait(limit + 2.0):
            raise MembershipError(f"reform did not finish in {limit:.0f} s; state: "
                                  f"{self.state()}")
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def prepare_leave(self) -> None:
        """Take no part in view changes from now on: this node leaves once the others know
        (the training layer calls this before the step that tells them), so no view they
        agree on can still include it."""
        self._membership.protocol.prepare_leave()

    def leave(self) -> None:
        """Leave the ring on purpose: tell the members (so they re-form at once rather than
        after a timeout), then close."""
        if not self._closing and self._fatal is None:
            done = threading.Event()
            self._queue.put(lambda: (self._membership.leave(), done.set()))
            self._transport.wake()
            done.wait(2.0)
        self.close()

    def _check_open(self) -> None:
        if self._closing:
            raise RingtrainError(f"node {self.node_id} is closed")
        if self._fatal is not None:
            raise RingtrainError(f"node {self.node_id} stopped: {self._fatal}") from self._fatal

    def _submit(self, build: Builder, timeout: float | None, step: int = 0) -> Work:
        self._check_open()
        view = self._view
        work = Work(build, self.settings.collective_timeout if timeout is None else timeout, step,
                    self.settings.spin_seconds, None if view is None else view.generation)
        self._queue.put(work)
        self._transport.wake()
        return work

    # engine thread --------------------------------------------------------------------------

    def _engine(self) -> None:
        spin_until = 0.0  # the next collective often follows at once: until then, yield
        try:
            while not self._closing:
                if self._order_due:
                    self._order_ring()
                    continue
                if self._view is None:
                    self._serve_membership()
                    self._mailbox.pump(self.settings.heartbeat_interval / 2)
                    continue
                try:
                    work = self._queue.get_nowait()
                except queue.Empty:
                    # between collectives too, a membership turn at most every
                    # SERVICE_INTERVAL, unless control traffic or candidates wait
                    if (self._runner.take_turn() or self._mailbox.control
                            or not self._new_candidates.empty()):
                        self._serve_membership()
                    if time.monotonic() < spin_until:
                        os.sched_yield()  # rather than sleep in poll (Settings.spin_seconds)
                        continue
                    self._mailbox.pump(self.settings.heartbeat_interval / 2)
                    continue
                if work is None:
                    break
                if isinstance(work, Work):
                    self._execute(work)
                    spin_until = time.monotonic() + self.settings.spin_seconds
                else:
                    work()
        except BaseException as exc:  # noqa: BLE001 - reported to every waiter, then re-raised
            log.exception("node %s engine stopped", self.node_id)
            self._fatal = exc
            self._formed.set()
        finally:
            self._fail_queued(RingtrainError(f"node {self.node_id} closed"))
            self._transport.close(linger=0 if self._fatal else self.settings.linger)
            if self._lanes is not None:
                self._lanes.close()
            if self._device is not None:
                self._device.close()

    def _serve_membership(self) -> None:
        """Membership work on the engine thread: new candidates, control messages, ticks."""
        self._transport.check_health()
        while True:
            try:
                endpoints, source = self._new_candidates.get_nowait()
            except queue.Empty:
                break
            try:
                self._membership.add_candidates(endpoints, source)
            except RingtrainError as exc:  # e.g. out of sockets: the next turn tries again
                log.warning("node %s: cannot dial candidates from %s: %s", self.node_id,
                            source, exc)
        self._mailbox.drain()
        while self._mailbox.control:
            message = self._mailbox.control.popleft()
            try:
                if self._gate is not None and is_ledger(message):
                    self._gate.handle(message)
                    continue
                self._membership.handle(message)
            except ProtocolError as exc:
                self._mailbox.reject(message, exc)  # counted, logged once per sender
            except Exception as exc:  # noqa: BLE001 - a peer's message must not stop us
                # whatever a peer's message made membership raise is that peer's offence: it
                # is counted like a malformed message (and evicts it when repeated)
                log.debug("node %s: control message from %s raised", self.node_id,
                          message.origin, exc_info=True)
                self._mailbox.reject(message, ProtocolError(
                    f"{message.header.kind.name.lower()} (handling raised)",
                    "a message this node can act on", f"{type(exc).__name__}: {exc}"[:200],
                    message.origin))
        for peer, reason in self._mailbox.take_offenders().items():
            self._membership.protocol.suspect(peer, reason)  # keeps sending garbage
        self._membership.tick()
        if self._gate is not None:
            self._gate.tick()
        if self._wrong_key is not None:
            self._check_key()
        installed = self._membership.view
        if installed is not None and installed != self._installed:
            self._install(installed)
            self._take_snapshot()
        elif time.monotonic() - self._snapshot_at >= SNAPSHOT_INTERVAL:
            self._take_snapshot()

    def _check_key(self) -> None:
        """Read the probes' handshake events (always: see ``Transport.refused_links``) and,
        while forming, weigh the evidence of a wrong job key (see ``wrong_key``)."""
        now = time.monotonic()
        if now - self._last_key_check < KEY_CHECK_INTERVAL:
            return
        self._last_key_check = now
        self._wrong_key.saw_refusals(self._transport.refused_links(), now)
        if self._view is None:
            # linked: some peer answered us (hearing from peers is not enough: a revoked
            # device still hears the members that dial it)
            linked = bool(self._membership.welcomed)
            self._key_error = self._key_error or self._wrong_key.verdict(now, linked)

    def _install(self, view: View) -> None:
        old = self._installed
        if old is not None and old.lineage and view.lineage != old.lineage:
            self._merged_into = view.generation
        self._installed = view
        self._sequence = 0
        self._mailbox.retire(view.generation, -1)
        self._links, self._slow_links, self._order_error = None, None, None
        if self.settings.link_probe_bytes and view.world_size >= 3:
            self._order_due = True  # before any collective of this view: see _order_ring
            return
        self._announce(view)

    def _order_ring(self) -> None:
        """Measure the links of the installed view and order its ring (engine thread, as the
        first collectives of the view, so every member does the same).

        Every member streams to every other (``ring.link_probe.measure_link``), the rates are
        all-gathered, and each member computes the order from the very same matrix
        (``ring.measured_ring_order``). If either collective fails, this node keeps no ring
        for the generation: its collectives fail at once until the ring re-forms, so no two
        members ever run one generation in different orders.
        """
        self._order_due = False
        view = self._installed
        assert view is not None
        timeout = self.settings.collective_timeout
        rates = np.zeros(view.world_size)
        try:
            for shift in range(1, view.world_size):
                # a barrier first, so that every member streams in the same round (two
                # streams into one node would halve both rates); it checks that all members
                # probe alike, too
                self._agree_on_probe(view, timeout, shift)
                rates[(view.rank + shift) % view.world_size] = self._collect(
                    view, timeout, lambda sequence, deadline, shift=shift:
                    measure_link(self._runner, view, sequence, deadline,
                                 self.settings.link_probe_bytes, shift))
            gather = collectives.all_gather(rates, view.rank, view.world_size,
                                            self._runner.segment_elements)
            matrix = self._collect(view, timeout, lambda sequence, deadline:
                                   self._runner.run(gather, view, sequence, deadline))
        except CollectiveError as exc:
            log.warning("node %s: measuring the links of generation %d failed (%s); "
                        "its collectives fail until the ring re-forms", self.node_id,
                        view.generation, exc)
            self._order_error = exc
            self._announce(view)
            return
        try:
            order = ring.measured_ring_order(view.members, matrix)
            self._slow_links = ring.slow_links(order, matrix, self.settings.slow_link_fraction)
        except ValueError as exc:  # a member measured nonsense: every member sees the same
            log.warning("node %s: link rates of generation %d unusable (%s); sorted ring "
                        "order", self.node_id, view.generation, exc)
            order = list(view.members)
        self._links = matrix
        log.info("node %s: generation %d ring %s from link rates (Mbit/s) %s", self.node_id,
                 view.generation, " -> ".join(order), self._link_rates_mbit())
        self._announce(View(view.generation, tuple(order), order.index(self.node_id),
                            met=view.met))

    def _agree_on_probe(self, view: View, timeout: float, shift: int) -> None:
        """A barrier before probing the links ``shift`` ranks on, which also checks that every
        member probes with the same number of bytes and the same ``slow_link_fraction``
        (all members see a disagreement)."""
        probe = self.settings.link_probe_bytes
        fraction = round(self.settings.slow_link_fraction * 1e6)
        mine = np.array([shift, probe, -probe, fraction, -fraction], dtype=np.int64)
        barrier = collectives.all_reduce([mine], "max", None, view.rank, view.world_size,
                                         self._runner.segment_elements,
                                         direct_bytes=self.settings.direct_bytes)
        _, most, least, most_fraction, least_fraction = self._collect(
            view, timeout, lambda sequence, deadline:
            self._runner.run(barrier, view, sequence, deadline))[0]
        if most != -least or most_fraction != -least_fraction:
            raise MismatchError(f"members measure links with different settings "
                                f"(link_probe_bytes {-least} to {most}, slow_link_fraction "
                                f"{-least_fraction / 1e6:g} to {most_fraction / 1e6:g}; this "
                                f"node {probe} and {fraction / 1e6:g}): set "
                                f"RINGTRAIN_LINK_PROBE_BYTES and RINGTRAIN_SLOW_LINK_FRACTION "
                                f"alike on every node", generation=view.generation,
                                collective=self._sequence - 1)

    def _announce(self, view: View) -> None:
        """``view`` is the one collectives run in from now on: release waiters, tell the
        listeners. The snapshot is taken first, so that :meth:`state` shows this view (and
        its measured links) to whoever the announcement wakes."""
        self._view = view
        self._take_snapshot()
        self._formed.set()
        for listener in self._view_listeners:
            try:
                listener(view)
            except Exception:  # noqa: BLE001 - a listener must not stop the engine
                log.exception("view listener failed")

    def _service(self, view: View) -> tuple[str, str | None] | None:
        """Runs between segments of a collective: keep membership alive, and abandon the
        collective if the ring is changing under it."""
        membership = self._membership.protocol
        for peer_id, when in self._runner.heard.items():  # data is a sign of life too
            membership.heard(peer_id, when)
        self._serve_membership()
        suspects = set(membership.suspects) & set(view.members)
        if suspects:
            suspect = sorted(suspects)[0]
            return f"member {suspect} is suspected to have failed", suspect
        if membership.newer_generation_seen() or self._installed is None \
                or self._installed.generation != view.generation:
            return "the ring is re-forming", None
        if membership.reforming:
            # A change that keeps every member (a join, or a leave not yet said) lets this
            # collective finish: members that already proposed had finished it, so all their
            # data is sent. A change that drops a member ends it now.
            # A member that said it leaves takes part in this last step of its: a change
            # that drops only leaving members lets the step finish too.
            pending = membership.pending_members()
            if pending is None or set(view.members) - set(pending) - membership.leaving_peers():
                return "the ring is re-forming", None
        return None

    def _reform(self, since: int, deadline: float) -> View:
        membership = self._membership.protocol

        def formed() -> bool:
            view = self._installed
            return view is not None and view.generation > since and not membership.reforming

        if not formed() and not membership.reforming:
            membership.start_reform(time.monotonic())
        while not formed():
            if time.monotonic() >= deadline or self._closing:
                raise MembershipError(f"node {self.node_id} could not re-form the ring since "
                                      f"generation {since}; membership: "
                                      f"{self._membership.state()}")
            self._serve_membership()
            if not formed():
                self._mailbox.pump(self.settings.heartbeat_interval / 2)
        self._merged_into = None
        if self._order_due:
            self._order_ring()
        return self.view

    def _execute(self, work: Work) -> None:
        view = self.view
        if work.generation is not None and work.generation != view.generation:
            # started before the ring re-formed (say, a gradient bucket queued while backward
            # ran on): run in the new generation it would meet another collective there
            work._finish(error=PeerFailedError(
                f"the ring re-formed (generation {work.generation} -> {view.generation}) "
                f"before this collective ran; re-form and redo it", generation=view.generation))
            return

        def run(sequence: int, deadline: float) -> Any:
            collective = work.build(view.rank, view.world_size)
            compressed = collective.compressed
            residual = None if compressed is None else compressed.residual
            # the error-feedback residual changes as segments are encoded: a failed
            # collective puts back what it held, so a retry counts nothing twice
            saved = None if residual is None else residual.copy()
            try:
                if self._slow_links is not None:
                    collective.compress_slow_links(self._slow_links, view.rank)
                return self._runner.run(collective, view, sequence, deadline, work.step)
            except BaseException:
                if residual is not None and saved is not None:
                    residual[...] = saved
                raise

        try:
            result = self._collect(view, work.timeout, run)
        except RingtrainError as exc:
            work._finish(error=exc)
        else:
            work._finish(result)

    def _collect(self, view: View, timeout: float, run: Callable[[int, float], Any]) -> Any:
        """``run(sequence, deadline)`` as the next collective of ``view``; when it fails,
        suspect whom it blames and abort it on every member."""
        if self._merged_into == view.generation:
            # The DECIDE of the ring ours joined arrived between two of our collectives: the
            # winning ring's members re-formed at a step boundary and sync state now, while
            # our caller would run its next collective (a gradient) in their view: they
            # mismatched, and every node exited. Fail it here, before it takes a sequence
            # number or aborts anything, so that the caller re-forms (taking this view as it
            # is) and syncs like the others.
            raise PeerFailedError(f"two rings of this job merged into generation "
                                  f"{view.generation}: re-form and sync state first",
                                  generation=view.generation, collective=self._sequence)
        sequence = self._sequence
        self._sequence += 1
        self._ran_in = view.generation
        self._membership.protocol.sequence = sequence
        try:
            if self._order_error is not None:
                raise self._no_ring(view, sequence)
            return run(sequence, time.monotonic() + timeout)
        except CollectiveError as exc:
            suspect = exc.peer if isinstance(exc, PeerFailedError) else None
            # Look for a laggard only when this node itself blamed a peer nobody suspected
            # yet (a stall: then every healthy member's heartbeats report the stalled
            # collective). Not when the collective was abandoned because the ring is
            # re-forming (no peer), nor for a member already suspected, nor when another
            # member aborted it naming whom it blames: heartbeat sequences are then up to a
            # heartbeat old, and the "laggard" is just the member heard from last, healthy.
            # Blaming it evicted healthy nodes when a joiner was admitted or a node left.
            aborted = (view.generation, sequence) in self._mailbox.aborts
            if isinstance(exc, PeerFailedError) and suspect is not None and not aborted \
                    and suspect not in self._membership.protocol.suspects:
                suspect = self._laggard(view) or suspect
            if suspect is not None:
                self._membership.protocol.suspect(suspect, str(exc))
                self.recorder.suspected(suspect, str(exc))  # observe
            self._runner.abort_everyone(view, sequence, exc, suspect)
            raise

    def _no_ring(self, view: View, sequence: int) -> CollectiveError:
        """Why a collective of ``view`` cannot run: measuring its links failed. Members that
        probe differently is a setting to fix (MismatchError); anything else is a failed
        peer, and re-forming the ring measures again."""
        error = self._order_error
        where = {"generation": view.generation, "collective": sequence}
        text = f"generation {view.generation} has no agreed ring order: {error}"
        if isinstance(error, MismatchError):
            return MismatchError(text, **where)
        peer = error.peer if isinstance(error, PeerFailedError) else None
        return PeerFailedError(f"{text}; re-form the ring", peer=peer, **where)

    def _laggard(self, view: View) -> str | None:
        """The member furthest behind in collectives, if one is behind us: a live process
        that stopped calling collectives is the one holding the ring up."""
        behind = [(p.sequence, m) for m in view.members
                  if m != self.node_id and (p := self._membership.protocol.peers.get(m))
                  is not None
                  and p.generation == view.generation and p.sequence < self._sequence - 1]
        return min(behind)[1] if behind else None

    def _fail_queued(self, error: BaseException) -> None:
        while True:
            try:
                work = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(work, Work):
                work._finish(error=error)

    # lifecycle ------------------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Stop the engine and close the sockets (bounded by ``timeout`` seconds)."""
        if self._closing:
            return
        if self._dns_peers is not None:
            self._dns_peers.close()
        if getattr(self, "_discovery", None) is not None:
            if self._announcer is not None:
                self._announcer.close()  # says goodbye for our advert
            if self._browser is not None:
                self._browser.close()
            self._discovery.close()
        self._queue.put(None)
        self._closing = True
        self._transport.wake()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("node %s engine did not stop within %.1f s", self.node_id, timeout)

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


MAX_NODE_ID, MAX_JOB = 30, 32  # they must fit one DNS label together (mDNS instance names)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def check_name(what: str, value: str, limit: int) -> None:
    """Node ids and job names: letters, digits, '-' and '_', starting with a letter or digit."""
    if not (isinstance(value, str) and len(value) <= limit and _NAME.fullmatch(value)):
        raise ConfigError(f"{what} {value!r} must be 1-{limit} letters, digits, '-' or '_', "
                          f"starting with a letter or digit")


def default_node_id() -> str:
    """This host's name (cleaned up) plus random digits, e.g. ``laptop-3f9a1c`` (rings with
    no key; with a key a node's id derives from its device key, see ``comm.identity``)."""
    return f"{default_name()[:MAX_NODE_ID - 7]}-{secrets.token_hex(3)}"


def default_name() -> str:
    """This host's name, cleaned up to letters, digits, '-' and '_'."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0]).strip("-_")
    return host or "node"


def _is_loopback_name(interface: str | None) -> bool:
    return interface is not None and (interface == "lo" or is_loopback(f"{interface}:0"))


def _check_insecure_allowed(insecure: bool, addresses: list[str]) -> None:
    """Running without a key is allowed on loopback only, and only when asked for."""
    if not insecure:
        raise ConfigError("no job key: create one with `ringtrain keygen --out job.key` and pass "
                          "it (key=read_key_file(...), or RINGTRAIN_KEY_FILE=job.key); "
                          "on one machine only, insecure=True runs without one")
    off_loopback = [a for a in addresses if not is_loopback(a)]
    if off_loopback:
        raise ConfigError(f"insecure mode is only allowed on loopback, but {off_loopback} "
                          f"is not a loopback address; use a job key")
    log.warning("INSECURE: this ring runs without authentication or encryption "
                "(allowed because every address is loopback)")


def _single(collective: Collective, out: np.ndarray | None = None) -> Collective:
    """Make an all_reduce of one array return that array (in ``out``, when given) instead
    of a one-element list."""
    finish = collective.finish

    def single(result: np.ndarray) -> np.ndarray:
        reduced = finish(result)[0]
        if out is None or reduced is out:
            return reduced
        if not np.may_share_memory(reduced, out):  # a weighted mean works in a bigger buffer
            np.copyto(out, reduced)
        return out

    collective.finish = single
    return collective


def _into(array: Any, out: np.ndarray) -> np.ndarray:
    """``array`` copied into ``out`` (unless it is ``out``), to be reduced there in place."""
    if not isinstance(out, np.ndarray) or not (out.flags.c_contiguous and out.flags.writeable
                                               and out.dtype.isnative):
        raise ConfigError("out must be a writeable, C-contiguous numpy array in native byte "
                          "order")
    array = np.asarray(array)
    if array.shape != out.shape or array.dtype != out.dtype:
        raise ConfigError(f"out has shape {out.shape} and dtype {out.dtype}; the array has "
                          f"{array.shape} and {array.dtype}")
    if array is not out:
        np.copyto(out, array)
    return out
