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
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..comm.endpoints import is_loopback
from ..comm.identity import DeviceIdentity
from ..comm.security import JobKey, key_from_environment
from ..comm.zap import raise_fd_limit
from ..config import Settings
from ..errors import ConfigError, MembershipError, RingtrainError
from ..membership.protocol import View
from .collective_calls import CollectiveCalls
from .engine import Engine
from .names import MAX_JOB, MAX_NODE_ID, check_name
from .parts import RingSizes, open_parts
from .peer_sources import PeerSources
from .work import Builder, Work
from .wrong_key import WrongKeyDetector

__all__ = ["Node", "Work"]

log = logging.getLogger(__name__)


class Node(CollectiveCalls):
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
        peers = list(peers)
        if listen is None:
            listen = "0.0.0.0:0" if (discover or peers_dns) and not _is_loopback_name(interface) \
                else "127.0.0.1:0"
        key = key or key_from_environment()
        if key is None:
            _check_insecure_allowed(insecure, [listen, *peers])
        self.key = key
        sizes = RingSizes(world_size, min_size, max_size,
                          candidates is not None or discover or peers_dns is not None)
        parts = open_parts(self.settings, job, node_id, listen, peers, key, device, sizes,
                           schema)
        self.node_id, self._device, self._gate = parts.node_id, parts.device, parts.gate
        self._transport, self._membership = parts.transport, parts.membership
        self.endpoint = self._transport.endpoint
        self._peer_sources = PeerSources(self.node_id, job, self.endpoint, self.add_candidates)
        self._engine = Engine(self.settings, job, parts, None if key is None else
                              WrongKeyDetector(job, key.fingerprint, time.monotonic()),
                              self._peer_sources)
        self._runner = self._engine.runner
        if parts.form_size == 1 and not sizes.elastic_start:
            self._engine.form_alone()
        # observe: the flight recorder (ringtrain.observe.recorder): the runner records each
        # collective, the views installed become formed / re-formed / joined / left events
        self.recorder = self._runner.recorder
        self.on_view_change(self.recorder.view_installed)
        self._engine.start()
        if candidates is not None:
            candidates(self.add_candidates)
        self._find_peers(discover, interface, peers_dns, parts.named_peers)
        self._wait_formed(parts.form_size)

    def _find_peers(self, discover: bool, interface: str | None, peers_dns: str | None,
                    named: list[tuple[str, int]]) -> None:
        """Start resolving the peers given by name, mDNS discovery and DNS lookups, as asked
        (closing the node if they fail)."""
        try:
            if named:
                self._peer_sources.resolve(named)
            if discover:
                self._peer_sources.discover(
                    interface, self.key.fingerprint if self.key is not None else "",
                    self._engine.wrong_key, self.on_view_change,
                    self._engine.transport.public_key.decode())
            if peers_dns is not None:
                self._peer_sources.look_up(peers_dns, self.settings.dns_interval)
        except RingtrainError:
            self.close()
            raise

    def _wait_formed(self, world_size: int) -> None:
        """Wait for the first view; close the node and raise why when it does not come."""
        deadline = time.monotonic() + self.settings.form_timeout
        while not (formed := self._engine.formed.wait(0.1)):
            error = self._engine.forming_error()
            if error is not None:
                self.close()
                raise error
            if time.monotonic() >= deadline:
                break
        fatal = self._engine.fatal
        if formed and fatal is None:
            return
        self.close()
        if fatal is not None:
            raise MembershipError(f"node {self.node_id} failed while forming: "
                                  f"{fatal}") from fatal
        # the reason only: the whole state is in Node.state() and the hang reports
        why = self._membership.protocol.waiting or f"waiting for {world_size} nodes"
        raise MembershipError(f"the ring did not form within "
                              f"{self.settings.form_timeout:.0f} s: {why}")

    def add_candidates(self, endpoints: list[str], source: str = "extra") -> None:
        """Dial these ``IP:port`` endpoints (safe from any thread, e.g. mDNS callbacks), within
        the budgets of ``discovery.candidates``: ``source`` names who told us of them (an
        advert, say), for the per-source limits."""
        self._engine.add_candidates(endpoints, source)

    def on_view_change(self, listener: Callable[[View], None]) -> None:
        """Call ``listener(view)`` on the engine thread whenever a view is installed (keep it
        quick: e.g. update an mDNS advert)."""
        self._engine.view_listeners.append(listener)

    # properties -----------------------------------------------------------------------------

    @property
    def view(self) -> View:
        """The installed membership."""
        if self._engine.view is None:
            raise MembershipError("the ring has not formed")
        return self._engine.view

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
        return self._engine.closing

    @property
    def bytes_sent(self) -> int:
        """Payload bytes this node has sent in collectives."""
        return self._runner.bytes_sent

    def state(self) -> dict[str, Any]:
        """What this node is doing, for hang diagnostics and ``ringtrain peers``: the engine's
        last snapshot (written every ``SNAPSHOT_INTERVAL`` and at every view change; safe to
        read from any thread, never iterating what the engine changes)."""
        return self._engine.state()

    # membership changes ---------------------------------------------------------------------

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
                outcome.append(self._engine.reform(since, time.monotonic() + limit))
            except RingtrainError as exc:
                outcome.append(exc)
            done.set()

        self._check_open()
        self._engine.submit(run)
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
        self._engine.leave_requested = True  # no lock: a signal handler may call this

    def leave(self) -> None:
        """Leave the ring on purpose: tell the members (so they re-form at once rather than
        after a timeout), then close."""
        if not self._engine.closing and self._engine.fatal is None:
            done = threading.Event()
            self._engine.submit(lambda: (self._membership.leave(), done.set()))
            done.wait(2.0)
        self.close()

    def _check_open(self) -> None:
        if self._engine.closing:
            raise RingtrainError(f"node {self.node_id} is closed")
        if self._engine.fatal is not None:
            raise RingtrainError(f"node {self.node_id} stopped: {self._engine.fatal}") \
                from self._engine.fatal

    def _submit(self, build: Builder, timeout: float | None, step: int = 0) -> Work:
        self._check_open()
        view = self._engine.view
        work = Work(build, self.settings.collective_timeout if timeout is None else timeout, step,
                    self.settings.spin_seconds, None if view is None else view.generation,
                    () if view is None else tuple(view.members))
        self._engine.submit(work)
        return work

    # lifecycle ------------------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Stop the engine and close the sockets (bounded by ``timeout`` seconds)."""
        if self._engine.closing:
            return
        self._peer_sources.close()
        self._engine.stop(timeout)

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # for tests: the engine's state under the names it had on the node -------------------------

    @property
    def _fatal(self) -> BaseException | None:  # why the engine thread stopped, if it did
        return self._engine.fatal

    @property
    def _slow_links(self) -> tuple[bool, ...] | None:  # by ring rank, as compression sees them
        return self._engine.ring_order.slow_links

    @_slow_links.setter
    def _slow_links(self, slow: tuple[bool, ...] | None) -> None:
        self._engine.ring_order.slow_links = slow


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
