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

Authentication, with a job key: CURVE encryption on every connection. Every node listens and
dials with its own device key pair, so a dialler reaches only the device whose key it dials
with: where it learns the key, see ``door`` (the UDP door on the same port answers it to job
key holders) and ``membership``. The ZAP handler stamps every message with the dialler's
public key (``Incoming.user``), which CURVE has proven the dialler holds the secret of, and
lets through only keys the job key introduced (``zap``). ``membership`` admits a key only
after its HELLO proved knowledge of the job key, and the mailbox drops everything else. A
job-keyed server (``job_server``: the status server) listens with the key pair derived from
the job key instead, and has no door.

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
from dataclasses import dataclass, field

import zmq

from ..config import Settings
from ..errors import SecurityError, TransportError
from .curve import curve_keypair, dialling_keypair
from .door import DoorServer, door_address, open_door
from .endpoints import normalize_endpoint
from .handshakes import HandshakeWatch
from .identity import DeviceKey
from .polling import SocketPoller
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


def _dealer(context: zmq.Context, settings: Settings, route: bytes,
            curve: tuple[bytes, bytes, bytes] | None) -> zmq.Socket:
    """An outgoing link's socket, presenting ``route``; a CURVE client with ``curve``, (server
    key, our public key, our secret key), unless None."""
    sock = bounded_socket(context, zmq.DEALER, settings)
    sock.setsockopt(zmq.ROUTING_ID, route)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    if curve is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve
    return sock


def _listening_socket(context: zmq.Context, settings: Settings, secret: bytes | None,
                      endpoint: str, door: bool
                      ) -> tuple[zmq.Socket, str, socket.socket | None]:
    """The ROUTER a node listens on, a CURVE server with ``secret`` (None: no encryption),
    bound to ``endpoint`` (see :func:`_bind`): (socket, endpoint bound, door or None)."""
    router = bounded_socket(context, zmq.ROUTER, settings)
    if secret is not None:
        router.curve_server = True
        router.curve_secretkey = secret
        router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        router.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    router.setsockopt(zmq.ROUTER_HANDOVER, 1)
    return (router, *_bind(router, endpoint, door))


def _bind(router: zmq.Socket, endpoint: str, door: bool) -> tuple[str, socket.socket | None]:
    """Bind ``router`` to ``endpoint``; a tcp port 0 picks a free one, whose UDP port is free
    too when ``door``. Returns the endpoint bound and its door (a UDP socket on the same
    address and port; None without ``door`` or on an endpoint other than tcp).

    Raises:
        OSError: the door's UDP port is taken. zmq.ZMQError: the endpoint cannot be bound.
    """
    random_port = endpoint.startswith("tcp://") and endpoint.endswith(":0")
    for attempt in range(32 if random_port else 1):
        if random_port:
            bound = f"{endpoint[: -len(':0')]}:{router.bind_to_random_port(endpoint[:-2])}"
        else:
            router.bind(bound := endpoint)
        where = door_address(router.getsockopt_string(zmq.LAST_ENDPOINT)) if door else None
        if where is None:
            return bound, None
        try:
            return bound, open_door(*where[1])
        except OSError as exc:
            router.unbind(router.getsockopt_string(zmq.LAST_ENDPOINT))
            if attempt == 31 or not random_port:
                raise OSError(exc.errno, f"UDP port {where[1][1]} (the key door): "
                                         f"{exc.strerror}") from exc
    raise AssertionError("unreachable")


class Transport:
    """The sockets of one node. Not thread-safe, except :meth:`wake`.

    Args:
        identity: this node's id; peers see it as the sender of everything we send.
        listen: the address to bind, ``host:port`` (port 0 picks a free one) or a zmq endpoint.
        settings: limits and timeouts.
        key: the job key; None runs without authentication or encryption (loopback only,
            enforced by the caller).
        device: this device's key pair, which we listen with and every link we dial
            authenticates with (a random pair for this process if None).
        job_server: listen with the key pair derived from the job key, without a door (a
            server any job key holder may dial knowing only its address).

    Attributes:
        admitted: node id -> the CURVE key membership admitted for it. The mailbox shares this
            dict; the transport reads it to address replies and to let members reconnect past
            the connection cap.
    """

    def __init__(self, identity: str, listen: str, settings: Settings, key: JobKey | None,
                 device: DeviceKey | None = None, job_server: bool = False):
        check_libzmq()
        if key is not None and not zmq.has("curve"):
            raise SecurityError("this libzmq has no CURVE support; pip install -U pyzmq")
        self.identity = identity
        self.key = key
        self.settings = settings
        self._context = zmq.Context()
        self._links: dict[str, zmq.Socket] = {}
        self._link_endpoints: dict[str, str] = {}
        self._link_keys: dict[str, str] = {}  # link -> the server key it dialled (Z85)
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
            secret = None if key is None else \
                curve_keypair(key, "server")[1] if job_server else self._secret_key
            self._router, self.endpoint, door = _listening_socket(
                self._context, settings, secret, normalize_endpoint(listen),
                door=key is not None and not job_server)
            if self._zap is not None:
                if door is not None:
                    self._zap.door = DoorServer(door, key, self.public_key, self._zap.introduce)
                port = self.endpoint.rpartition(":")[2]
                self._zap.start(self._router, int(port) if port.isdigit() else 0)
            self._polls = SocketPoller(self._router)
        except (zmq.ZMQError, OSError) as exc:
            if self._zap is not None:
                self._zap.close()
            self._context.destroy(linger=0)
            raise TransportError(f"cannot listen on {listen}: {exc}") from exc

    # links ---------------------------------------------------------------------------------

    def connect(self, link: str, endpoint: str, watch: bool = False,
                server_key: str | None = None) -> None:
        """Open (or keep) the outgoing link named ``link`` to ``endpoint``, to the device whose
        public key (Z85) is ``server_key`` (None: a job-keyed server). ``watch``: follow its
        key handshakes, for :meth:`refused_links` (a probe of a node we have not met)."""
        endpoint = normalize_endpoint(endpoint)
        if self._link_endpoints.get(link) == endpoint and \
                self._link_keys.get(link) == (server_key or ""):
            return
        self.disconnect(link)
        curve = None if self.key is None else (
            server_key.encode() if server_key else curve_keypair(self.key, "server")[0],
            self.public_key, self._secret_key)
        try:
            sock = _dealer(self._context, self.settings, self.route, curve)
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise TransportError(f"cannot connect to {endpoint}: {exc}") from exc
        self._links[link] = sock
        self._link_endpoints[link] = endpoint
        self._link_keys[link] = server_key or ""
        self._polls.add_link(sock)
        if watch and self.key is not None:
            self._watches[link] = HandshakeWatch(sock)

    def refused_links(self) -> dict[str, tuple[int, int]]:
        """Watched links whose peer refused our key handshake: endpoint -> (handshakes that failed
        within ``handshakes.REFUSED_WITHIN_S`` of connecting: the peer does not hold the key we
        dialled; handshakes its key check refused, e.g. a revoked device), without blocking.
        Call it often: libzmq blocks its I/O thread once a monitor's queue is full."""
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
        self._link_keys[new] = self._link_keys.pop(old)

    def disconnect(self, link: str) -> None:
        """Close an outgoing link, dropping whatever it still queues."""
        self._unwatch(link)
        sock = self._links.pop(link, None)
        self._link_endpoints.pop(link, None)
        self._link_keys.pop(link, None)
        if sock is not None:
            self._polls.remove_link(sock)
            sock.close(linger=0)

    def links(self) -> dict[str, str]:
        """Outgoing links: name → endpoint."""
        return dict(self._link_endpoints)

    def link_key(self, link: str) -> str:
        """The device key (Z85) link ``link`` dialled; "" for none or a job-keyed server."""
        return self._link_keys.get(link, "")

    def introduce(self, key: str) -> None:
        """Let device key ``key`` finish handshakes with us: the job key vouched for it (a
        door answered with it)."""
        if self._zap is not None:
            self._zap.introduce(key)

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
        self._link_keys.clear()
        self._router.close(linger=linger_ms)
        self._polls.close()
        if self._zap is not None:
            self._zap.close()
        self._context.term()


def _frame_property(frame: zmq.Frame, name: str) -> str:
    try:
        return frame.get(name)
    except (zmq.ZMQError, UnicodeDecodeError):
        return ""
