"""The ZeroMQ transport: the sockets of one node (with ``zap``, ``handshakes`` and ``curve``, the
only modules that import zmq).

A node listens on one ROUTER socket; every peer it talks to gets one DEALER socket connected to
that peer's ROUTER. Messages arrive on the ROUTER tagged with the sender's routing id, which
names its node id (see *Routing ids* below); replies to a handshake come back on the DEALER
that sent it. One extra inproc socket lets other threads wake the thread that owns the sockets.

Limits on everything a peer controls (see :class:`ringtrain.config.Settings`):

* message size, ``MAXMSGSIZE``: a peer cannot make us allocate more than one segment plus a
  header; a larger message resets its connection.
* bytes queued: high-water marks derived from a byte budget: ZeroMQ counts messages, our
  messages are at most ``segment_bytes``, so ``queue_bytes // segment_bytes`` messages bound the
  bytes queued per connection.
* handshake time, ``HANDSHAKE_IVL``: a connection that has not finished the ZMTP (and CURVE)
  handshake within ``handshake_timeout`` is closed. This is what bounds connections that never
  authenticate (idle sockets, truncated greetings, slowloris): at most the attacker's connect
  rate times ``handshake_timeout`` of them exist at once; garbage and HTTP are closed at once.
* connection count: ZeroMQ has no such option; the ZAP handler counts them and keeps them
  within budgets (see :mod:`ringtrain.comm.zap`).
* liveness: TCP keepalive closes an idle connection to a host that vanished; membership
  heartbeats (not ZMTP's) say which peers are alive. ZMTP heartbeats stay off: in libzmq
  4.3.5 a ZMTP ping timer firing on a connection whose peer hung up while our receive queue
  was full aborts the whole process (``Assertion failed: !_io_error``,
  stream_engine_base.cpp:310: the ping timer calls ``out_event`` with no ``_io_error``
  check). Reconnect back-off and a bounded linger on close.

Authentication, with a job key: CURVE encryption on every connection. Every node listens with
the server keypair derived from the job key, so dialling a node that lacks the job key fails in
the handshake. Each node dials with its own random keypair; the ZAP handler stamps every
message with the dialler's public key (``Incoming.user``), which CURVE has proven the dialler
holds the secret of. ``membership`` admits a key only after its HELLO proved knowledge of the
job key, and the mailbox drops everything else.

Routing ids. A DEALER presents ``<node id> NUL <tag>``, the tag being its CURVE public key (a
random nonce on insecure rings). The ROUTER hands a routing id over to the newest connection
presenting it (``ROUTER_HANDOVER``, so a peer that reconnects is reachable at once); because the
tag is a key only its holder and the servers it dialled ever see, nobody else can present the
same routing id and steal a member's route. A message whose tag is not the key that CURVE
proved is forged (the mailbox drops it), and replies go to ``<node id> NUL <admitted key>``.

zmq errors become :class:`TransportError` here and nowhere else.
"""

from __future__ import annotations

import logging
import math
import secrets
import socket
import threading
from dataclasses import dataclass, field

import zmq

from ..config import Settings
from ..errors import SecurityError, TransportError
from .curve import curve_keypair, dialling_keypair
from .endpoints import normalize_endpoint
from .handshakes import HandshakeWatch
from .identity import DeviceKey
from .security import JobKey
from .wire import HEADER_SIZE, MAX_CONTROL_BYTES, split_payload
from .zap import (
    MAX_CONNECTIONS_PER_ADDRESS,
    MAX_TRACKED_CONNECTIONS,
    ZAP_DOMAIN,
    ZapHandler,
    open_fds,
)

log = logging.getLogger(__name__)

MIN_LIBZMQ = (4, 3, 3)
ROUTE_SEPARATOR = b"\0"
KEEPALIVE_PROBES = 3  # unanswered one a second after the idle time: the connection is closed
POLLIN, POLLOUT = int(zmq.POLLIN), int(zmq.POLLOUT)  # plain ints: enum flags' & is slow
# CURVE payloads go in frames of this size (see try_send): 1 MiB segments in 4 pieces made a
# 64 MiB all-reduce on the emulated 1 Gbit LAN faster in 11 of 14 interleaved pairs of
# runs, by about 5 ms at the median; 128 KiB pieces did the same, 64 KiB less well
CURVE_PIECE_BYTES = 256 * 1024


@dataclass
class Incoming:
    """A received message: who sent it and its frames (zero-copy ``zmq.Frame`` objects)."""

    origin: str  # sender's node id (ROUTER) or the link name it arrived on (DEALER)
    frames: list = field(repr=False)
    on_link: bool = False  # True when it came back on one of our outgoing links
    peer_address: str = ""  # the sender's IP address as the connection sees it, if known
    user: str = ""  # the sender's CURVE public key (Z85), proven by the handshake; "" if insecure
    tag: str = ""  # the tag of its routing id: its CURVE public key, as the sender claims it
    local: bool = False  # came through a same-host door: the kernel vouches for ``origin``


def split_route(route: bytes) -> tuple[str, str]:
    """A ROUTER routing id -> (node id, tag). Ids without a tag (a foreign client, or one
    libzmq made up) give their whole text and an empty tag."""
    node_id, _, tag = route.partition(ROUTE_SEPARATOR)
    return node_id.decode("utf-8", "replace"), tag.decode("utf-8", "replace")


def check_libzmq() -> None:
    """Refuse to run on a libzmq with known security bugs (CVE-2019-13132, CVE-2020-15166)."""
    version = zmq.zmq_version_info()
    if version < MIN_LIBZMQ:
        raise TransportError(f"libzmq {zmq.zmq_version()} is too old; ringtrain needs "
                             f">= {'.'.join(map(str, MIN_LIBZMQ))} (pip install -U pyzmq)")


def bounded_socket(context: zmq.Context, kind: int, settings: Settings) -> zmq.Socket:
    """A socket of ``kind`` within the limits on what a peer controls (see the module
    docstring): message size, queues bounded by the byte budget, TCP keepalive, handshake
    deadline, reconnect back-off and linger."""
    s = settings
    hwm = max(2, s.queue_bytes // s.segment_bytes)
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, int(s.linger * 1000))
    sock.setsockopt(zmq.MAXMSGSIZE, s.segment_bytes + HEADER_SIZE + MAX_CONTROL_BYTES)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm * 4)
    sock.setsockopt(zmq.HEARTBEAT_IVL, 0)  # never: see *liveness* in the module docstring
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, max(1, math.ceil(s.heartbeat_timeout)))
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_PROBES)
    sock.setsockopt(zmq.HANDSHAKE_IVL, int(s.handshake_timeout * 1000))
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
    return sock


def _bind(router: zmq.Socket, endpoint: str) -> str:
    """Bind ``router`` to ``endpoint``; a tcp port 0 picks a free one. Returns the endpoint
    bound."""
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        port = router.bind_to_random_port(endpoint[: -len(":0")])
        return f"{endpoint[: -len(':0')]}:{port}"
    router.bind(endpoint)
    return endpoint


class Transport:
    """The sockets of one node. Not thread-safe, except :meth:`wake`.

    Args:
        identity: this node's id; peers see it as the sender of everything we send.
        listen: the address to bind, ``host:port`` (port 0 picks a free one) or a zmq endpoint.
        settings: limits and timeouts.
        key: the job key; None runs without authentication or encryption (loopback only,
            enforced by the caller).
        device: this device's key pair, which every link we dial authenticates with (a
            random pair for this process if None).

    Attributes:
        admitted: node id -> the CURVE key membership admitted for it. The mailbox shares this
            dict; the transport reads it to address replies and to let members reconnect past
            the connection cap.
    """

    def __init__(self, identity: str, listen: str, settings: Settings, key: JobKey | None,
                 device: DeviceKey | None = None):
        check_libzmq()
        if key is not None and not zmq.has("curve"):
            raise SecurityError("this libzmq has no CURVE support; pip install -U pyzmq")
        self.identity = identity
        self.key = key
        self.settings = settings
        self._context = zmq.Context()
        self._links: dict[str, zmq.Socket] = {}
        self._link_endpoints: dict[str, str] = {}
        self.admitted: dict[str, str] = {}
        self._routes: dict[str, bytes] = {}  # insecure rings: node id -> its last routing id
        self._zap = (ZapHandler(self._context, self.admitted, MAX_CONNECTIONS_PER_ADDRESS,
                                settings.handshake_timeout) if key is not None else None)
        self._watches: dict[str, HandshakeWatch] = {}  # link -> its key handshakes
        self.public_key, self._secret_key = (dialling_keypair(device) if key is not None
                                             else (b"", b""))
        # the tag of our routing id: our key, or a nonce on insecure rings (see Routing ids)
        tag = self.public_key if key is not None else secrets.token_hex(8).encode()
        self.route = identity.encode() + ROUTE_SEPARATOR + tag
        try:
            self._router = bounded_socket(self._context, zmq.ROUTER, settings)
            if key is not None:
                self._router.curve_server = True
                self._router.curve_secretkey = curve_keypair(key, "server")[1]
                self._router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
                self._router.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
            self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)
            self.endpoint = endpoint = _bind(self._router, normalize_endpoint(listen))
            if self._zap is not None:
                port = endpoint.rpartition(":")[2]
                self._zap.start(self._router, int(port) if port.isdigit() else 0)
            self._polls = SocketPoller(self._router)
        except (zmq.ZMQError, OSError) as exc:
            if self._zap is not None:
                self._zap.close()
            self._context.destroy(linger=0)
            raise TransportError(f"cannot listen on {listen}: {exc}") from exc

    # links ---------------------------------------------------------------------------------

    def connect(self, link: str, endpoint: str, watch: bool = False) -> None:
        """Open (or keep) the outgoing link named ``link`` to ``endpoint``. ``watch``: follow
        its key handshakes, for :meth:`refused_links` (a probe of a node we have not met)."""
        endpoint = normalize_endpoint(endpoint)
        if self._link_endpoints.get(link) == endpoint:
            return
        self.disconnect(link)
        try:
            sock = bounded_socket(self._context, zmq.DEALER, self.settings)
            sock.setsockopt(zmq.ROUTING_ID, self.route)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            if self.key is not None:
                sock.curve_serverkey = curve_keypair(self.key, "server")[0]
                sock.curve_publickey = self.public_key
                sock.curve_secretkey = self._secret_key
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise TransportError(f"cannot connect to {endpoint}: {exc}") from exc
        self._links[link] = sock
        self._link_endpoints[link] = endpoint
        self._polls.add_link(sock)
        if watch and self.key is not None:
            self._watches[link] = HandshakeWatch(sock)

    def refused_links(self) -> dict[str, tuple[int, int]]:
        """Watched links whose peer refused our key handshake: endpoint -> (handshakes that failed
        within ``handshakes.REFUSED_WITHIN_S`` of connecting: the peer could not open our CURVE
        HELLO, so it holds another job key; handshakes its key check refused, e.g. a revoked
        device). Links with neither are left out. Reads the watches' events, never blocks.

        Call it often (every turn or so): libzmq blocks its I/O thread once a monitor's
        queue is full, so watched links' events must be read."""
        refused = {}
        for link, watch in list(self._watches.items()):
            counts = watch.read()
            if counts is not None and any(counts):
                refused[self._link_endpoints.get(link, link)] = counts
        return refused

    def _unwatch(self, link: str) -> None:
        watch = self._watches.pop(link, None)
        if watch is not None:
            watch.close()

    def rename_link(self, old: str, new: str) -> None:
        """Give an outgoing link a new name (e.g. its endpoint → the peer's node id)."""
        if old == new:
            return
        if new in self._links:
            self.disconnect(new)
        if old in self._watches:
            self._watches[new] = self._watches.pop(old)
        self._links[new] = self._links.pop(old)
        self._link_endpoints[new] = self._link_endpoints.pop(old)

    def disconnect(self, link: str) -> None:
        """Close an outgoing link, dropping whatever it still queues."""
        self._unwatch(link)
        sock = self._links.pop(link, None)
        self._link_endpoints.pop(link, None)
        if sock is not None:
            self._polls.remove_link(sock)
            sock.close(linger=0)

    def links(self) -> dict[str, str]:
        """Outgoing links: name → endpoint."""
        return dict(self._link_endpoints)

    def watch(self, fd: int) -> None:
        """Let :meth:`wait` return when file descriptor ``fd`` (another way messages come
        in, such as a same-host door) is readable."""
        self._polls.watch(fd)

    # data path -----------------------------------------------------------------------------

    def wait(self, timeout: float, writable: str | None = None, links: bool = True
             ) -> tuple[bool, bool]:
        """Block until something arrives, ``writable`` can take a message, a wake, or
        timeout. A wake is used up here. :meth:`receive` then reads the sockets this wait
        found readable, and :attr:`ready_fds` names the watched descriptors it found
        readable. ``links=False`` waits for data only: the outgoing links (but
        ``writable``) are neither watched nor read.

        Returns:
            (readable, can_send): whether any socket or watched descriptor has something,
            and whether a send on link ``writable`` would not block.
        """
        sock = self._links.get(writable) if writable is not None else None
        return self._polls.wait(timeout, sock, links)

    def look(self) -> bool:
        """Like :meth:`wait`, without blocking, and leaving a wake for the next wait (the
        waker's work must not be missed). Returns whether anything is readable."""
        return self._polls.look()

    @property
    def ready_fds(self) -> set[int]:
        """The watched descriptors the last wait or look found readable."""
        return self._polls.ready_fds

    def receive(self) -> Incoming | None:
        """One message from the sockets the last :meth:`wait` or :meth:`look` found readable,
        without blocking; None once they are empty. (Only those are read: a failed non-blocking
        read of every socket cost more than all else in a small collective. Whatever
        arrives later shows in the next look.)"""
        ready = self._polls.ready
        while ready:
            sock = ready[-1]
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                ready.pop()
                continue
            except zmq.ZMQError as exc:
                raise TransportError(f"receive failed: {exc}") from exc
            if sock is not self._router:
                link = next((name for name, s in self._links.items() if s is sock), None)
                if link is None:
                    ready.pop()  # closed since the poll
                    continue
                return Incoming(link, frames, on_link=True)
            route = frames[0].bytes
            origin, tag = split_route(route)
            if self.key is None and tag:
                if origin not in self._routes and len(self._routes) >= MAX_TRACKED_CONNECTIONS:
                    self._routes.pop(next(iter(self._routes)))
                self._routes[origin] = route
            return Incoming(origin, frames[1:],
                            peer_address=_frame_property(frames[-1], "Peer-Address"),
                            user=_frame_property(frames[-1], "User-Id") if self.key else "",
                            tag=tag)
        return None

    def try_send(self, link: str, frames: list, track: bool = False):
        """Send without blocking. Returns False if the link's queue is full, else True or a
        ``MessageTracker`` when ``track`` (buffers sent zero-copy must not change until it
        is done).

        On a keyed ring a payload larger than ``CURVE_PIECE_BYTES`` goes in pieces (see
        ``wire.split_payload``), so encryption and the wire overlap. The tracker watches
        every frame: pyzmq's ``send_multipart`` returns the last frame's only, and copies a
        small last frame (a descriptor), whose tracker is done at once while the payload
        may still wait in the queue."""
        sock = self._links.get(link)
        if sock is None:
            raise TransportError(f"no link to {link}")
        if self.key is not None:
            frames = split_payload(frames, CURVE_PIECE_BYTES)
        try:
            if not track:
                sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
                return True
            # only the first frame may find the queue full: once it is in, libzmq takes the
            # rest of the message (its high-water mark counts whole messages)
            last = len(frames) - 1
            trackers = [sock.send(frame, zmq.NOBLOCK | (zmq.SNDMORE if index < last else 0),
                                  copy=False, track=True) for index, frame in enumerate(frames)]
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            raise TransportError(f"send to {link} failed: {exc}") from exc
        return zmq.MessageTracker(*trackers)

    def reply(self, origin: str, frames: list) -> bool:
        """Answer node ``origin`` over the connection it dialled us on. On a keyed ring only a
        node whose key was admitted can be answered, at the connection that proved that key.
        Best effort: returns False if it could not be queued."""
        if self.key is not None:
            key = self.admitted.get(origin)
            route = origin.encode() + ROUTE_SEPARATOR + key.encode() if key else None
        else:
            route = self._routes.get(origin)
        if route is None:
            return False
        try:
            self._router.send_multipart([route, *frames], zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    def open_connections(self, address: str) -> int:
        """Connections from ``address`` open on the listening socket now (keyed rings; 0
        otherwise)."""
        return self._zap.open_connections(address) if self._zap is not None else 0

    @property
    def wrong_key_addresses(self) -> dict[str, int]:
        """Remote addresses whose connections to us failed the key handshake (they hold
        another job key) -> how many times."""
        return dict(self._zap.wrong_key) if self._zap is not None else {}

    @property
    def revoked_fingerprints(self) -> set[str]:
        """Device fingerprints refused at the handshake (keyed rings; add to it)."""
        return self._zap.revoked if self._zap is not None else set()

    def check_health(self) -> None:
        """Raise if a thread the transport relies on has stopped.

        Raises:
            TransportError: the key check (ZAP) thread died, naming why.
        """
        if self._zap is not None and self._zap.failure is not None:
            raise TransportError(f"the key check (ZAP) thread stopped: {self._zap.failure!r}; "
                                 f"restart the node") from self._zap.failure

    def budget(self) -> dict[str, int]:
        """Connection budgets at work, for diagnostics: connections open on the listening
        socket, shut for being over budget, refused at the key check, descriptors open."""
        zap = self._zap
        return {"connections": len(zap.connections) if zap else 0,
                "shut": zap.shut if zap else 0, "refused": zap.refused if zap else 0,
                "fds": open_fds()}

    def wake(self) -> None:
        """Interrupt a :meth:`wait` in progress. Safe from any thread."""
        self._polls.wake()

    def close(self, linger: float | None = None) -> None:
        """Close every socket, letting queued messages drain for at most ``linger`` seconds."""
        linger_ms = int((self.settings.linger if linger is None else linger) * 1000)
        for link in list(self._watches):
            self._unwatch(link)
        for link in list(self._links):
            sock = self._links.pop(link)
            sock.close(linger=linger_ms)
        self._link_endpoints.clear()
        self._router.close(linger=linger_ms)
        self._polls.close()
        if self._zap is not None:
            self._zap.close()
        self._context.term()


class SocketPoller:
    """What a node's sockets wait on, and what the last poll found readable. Not thread-safe,
    except :meth:`wake`.

    Two poll sets: everything (the listening socket, outgoing links, watched descriptors,
    the wake), and data only, what a collective waits for: data comes to the listening
    socket or a door, never on a link (links bring replies to membership, read at its next
    turn). Each zmq socket polled costs system calls, and a ring of N has N-1 links.

    Args:
        router: the listening socket.
    """

    def __init__(self, router: zmq.Socket):
        # a plain socket pair: one write wakes the poll, cheaper than a zmq send
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_in.setblocking(False)
        self._wake_out.setblocking(False)
        self._wake_lock = threading.Lock()
        self._wake_fd = self._wake_in.fileno()
        self._all = zmq.Poller()
        self._data = zmq.Poller()
        for poller in (self._all, self._data):
            poller.register(router, zmq.POLLIN)
            poller.register(self._wake_fd, zmq.POLLIN)
        self.ready: list[zmq.Socket] = []  # sockets the last look found readable, unread
        self.ready_fds: set[int] = set()  # watched descriptors the last look found readable

    def add_link(self, sock: zmq.Socket) -> None:
        """Watch an outgoing link (in the full set only)."""
        self._all.register(sock, zmq.POLLIN)

    def remove_link(self, sock: zmq.Socket) -> None:
        """Forget an outgoing link that is closing, and anything it had ready."""
        if sock in self.ready:
            self.ready.remove(sock)
        self._all.unregister(sock)

    def watch(self, fd: int) -> None:
        """Watch file descriptor ``fd`` in both sets."""
        self._all.register(fd, zmq.POLLIN)
        self._data.register(fd, zmq.POLLIN)

    def wait(self, timeout: float, writable: zmq.Socket | None, links: bool
             ) -> tuple[bool, bool]:
        """Block until something is readable, ``writable`` can take a message, a wake, or
        timeout, using up a wake; ``links=False`` polls the data set only.

        Returns:
            (readable, can_send), as :meth:`Transport.wait`.
        """
        poller = self._all if links else self._data
        if writable is not None:
            if links:
                poller.modify(writable, zmq.POLLIN | zmq.POLLOUT)
            else:
                poller.register(writable, zmq.POLLOUT)
        try:
            return self._poll(poller, timeout, writable, wakes=True)
        finally:
            if writable is not None:
                if links:
                    poller.modify(writable, zmq.POLLIN)
                else:
                    poller.unregister(writable)

    def look(self) -> bool:
        """Poll everything without blocking, leaving a wake for the next wait. Returns
        whether anything is readable."""
        return self._poll(self._all, 0.0, None, wakes=False)[0]

    def _poll(self, poller: zmq.Poller, timeout: float, writable: zmq.Socket | None,
              wakes: bool) -> tuple[bool, bool]:
        """One poll; remembers what is readable. ``wakes``: use up a pending wake."""
        try:
            events = poller.poll(max(0, math.ceil(timeout * 1000)))
        except zmq.ZMQError as exc:
            raise TransportError(f"poll failed: {exc}") from exc
        ready, fds, can_send = [], set(), False
        for source, flags in events:
            if source is writable and flags & POLLOUT:
                can_send = True
            if not flags & POLLIN:
                continue
            if source == self._wake_fd:
                if wakes:
                    self._clear_wakes()
            elif isinstance(source, zmq.Socket):
                ready.append(source)
            else:
                fds.add(source)
        self.ready, self.ready_fds = ready, fds
        return bool(ready or fds), can_send

    def _clear_wakes(self) -> None:
        """Take the pending wakes off the wake socket."""
        try:
            self._wake_in.recv(4096)  # any more (a wake since) just ends the next wait early
        except (BlockingIOError, InterruptedError):
            pass

    def wake(self) -> None:
        """Interrupt a :meth:`wait` in progress. Safe from any thread."""
        with self._wake_lock:
            try:
                self._wake_out.send(b"\0")
            except OSError:
                pass  # full: a wake is already pending; closed: nobody waits any more

    def close(self) -> None:
        """Close the wake socket pair."""
        with self._wake_lock:
            self._wake_out.close()
        self._wake_in.close()


def _frame_property(frame: zmq.Frame, name: str) -> str:
    try:
        return frame.get(name)
    except (zmq.ZMQError, UnicodeDecodeError):
        return ""
