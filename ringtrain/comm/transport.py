"""The ZeroMQ transport: the only module that imports zmq.

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
* connection count: ZeroMQ has no such option, so a monitor on the ROUTER counts open
  connections per remote address (``EVENT_ACCEPTED`` / ``EVENT_DISCONNECTED``) and the ZAP
  handler refuses a CURVE client whose address already holds ``MAX_CONNECTIONS_PER_ADDRESS``
  connections, unless its key is one membership admitted (a member reconnecting is never
  refused). See :class:`ZapHandler` for what this does and does not bound.
* liveness: ZMTP heartbeats, so a dead or suspended host is noticed by the transport itself;
  reconnect back-off and a bounded linger on close.

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

import ipaddress
import logging
import math
import os
import secrets
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import zmq
import zmq.utils.z85

from ..config import Settings
from ..errors import ConfigError, SecurityError, TransportError
from .identity import DeviceKey, device_fingerprint
from .security import JobKey
from .wire import HEADER_SIZE, MAX_CONTROL_BYTES, split_payload

log = logging.getLogger(__name__)

MIN_LIBZMQ = (4, 3, 3)
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"ringtrain"
MAX_CONNECTIONS_PER_ADDRESS = 64  # a ring has at most 64 members by default, one link each
MAX_TRACKED_CONNECTIONS = 4096  # bound on the connection table (and on logged refusals)
# Connections that may still be in their handshake (accepted less than handshake_timeout
# ago): per remote address, and in all. Beyond either, a new connection is shut at once:
# a stranger's idle or slow connections cannot eat the descriptors members need.
MAX_YOUNG_PER_ADDRESS = 16
MAX_YOUNG_CONNECTIONS = 256
FD_LIMIT_WANTED = 8192  # the soft limit on open files a node asks for (see raise_fd_limit)
MAX_ENDPOINT_LENGTH = 64
# a dialled connection that fails its key handshake this soon after it connected was refused
# (the server could not open our CURVE HELLO: it holds another key), not timed out
REFUSED_WITHIN_S = 1.0
ROUTE_SEPARATOR = b"\0"
POLLIN, POLLOUT = int(zmq.POLLIN), int(zmq.POLLOUT)  # plain ints: enum flags' & is slow
# CURVE payloads go in frames of this size (see try_send): 1 MiB segments in 4 pieces made a
# 64 MiB all-reduce on the emulated 1 Gbit LAN faster in 11 of 14 interleaved pairs of
# runs, by about 5 ms at the median; 128 KiB pieces did the same, 64 KiB less well
CURVE_PIECE_BYTES = 256 * 1024


def curve_keypair(key: JobKey, purpose: str) -> tuple[bytes, bytes]:
    """The CURVE (public, secret) pair, Z85-encoded, derived from ``key`` for ``purpose``."""
    secret = zmq.utils.z85.encode(key.derive(purpose))
    return zmq.curve_public(secret), secret


class ZapHandler:
    """Answers ZAP requests for the node's listening socket, and keeps its connections within
    budgets.

    CURVE clients are let through with their public key (Z85) as ``User-Id``; anything else is
    refused, and so is a key whose device fingerprint is in ``revoked``. Whether a key belongs to a
    member is decided later, from the HELLO it sends (see ``membership``). A client whose
    address already holds ``max_per_address`` open connections is refused, unless its key is
    in ``admitted`` (a member reconnecting).

    Open connections are counted from a monitor on the ROUTER: ``EVENT_ACCEPTED`` carries the
    new connection's file descriptor, whose peer address is read at once, and
    ``EVENT_DISCONNECTED`` the descriptor of one that closed. Budgets:

    * *young* connections (accepted less than ``handshake_timeout`` ago and not through
      their key handshake, which is all a keyless stranger can open): at most
      ``MAX_YOUNG_PER_ADDRESS`` per remote address and ``MAX_YOUNG_CONNECTIONS`` in all. A
      connection beyond either is shut at once (``shutdown`` on a duplicate of its
      descriptor, after checking it is still that connection: libzmq then closes it as a
      peer that hung up). Idle, slow or garbage connections therefore hold a bounded number
      of descriptors, whatever the connect rate;
    * connections that completed a CURVE handshake (their owner holds the job key) and were
      not admitted: ``max_per_address`` per source address, refused by ZAP.

    Key handshakes that fail for want of the right key (``HANDSHAKE_FAILED_PROTOCOL``, a
    cryptographic error) are blamed on the address of the connection that closes next, and
    counted per address in :attr:`wrong_key` (one log line per address).

    Nothing a client sends can stop this thread: an exception while answering is logged once
    and the request refused. If the thread stops anyway, :attr:`failure` says why (the node
    stops with that cause rather than refusing every connection in silence).

    Args:
        context: the transport's context (the ZAP endpoint is per context).
        admitted: node id -> admitted CURVE key, shared with the mailbox (read here only).
        max_per_address: open connections allowed per remote address before refusing.
        handshake_timeout: seconds a connection may take to finish its handshake.
    """

    def __init__(self, context: zmq.Context, admitted: dict[str, str], max_per_address: int,
                 handshake_timeout: float = 5.0):
        self.refused = 0
        self.shut = 0  # young connections shut for being over budget
        self.admitted = admitted
        self.revoked: set[str] = set()  # device fingerprints refused outright
        self.max_per_address = max_per_address
        self.handshake_timeout = handshake_timeout
        self.connections: dict[int, str] = {}  # file descriptor -> remote address
        self._accepted: dict[int, float] = {}  # file descriptor -> monotonic time accepted
        self.wrong_key: dict[str, int] = {}  # remote address -> failed key handshakes
        self._crypto_failures = 0  # failed key handshakes not yet blamed on an address
        self.failure: BaseException | None = None
        self.listening_port = 0
        self._refusals_logged: set[str] = set()
        self._errors_logged = 0
        self._monitor: zmq.Socket | None = None
        self._socket = context.socket(zmq.REP)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(ZAP_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="ringtrain-zap", daemon=True)

    def start(self, router: zmq.Socket, listening_port: int = 0) -> None:
        """Watch ``router``'s connections and start answering."""
        self.listening_port = listening_port
        self._monitor = router.get_monitor_socket(
            zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        self._thread.start()

    def open_connections(self, address: str) -> int:
        """How many connections from ``address`` are open now."""
        return sum(1 for a in list(self.connections.values()) if a == address)

    def alive(self) -> bool:
        """Whether the thread is answering (False once it stopped on an error)."""
        return self.failure is None

    def _serve(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - reported: the node stops with the cause
            if not self._stop.is_set():
                self.failure = exc
                log.critical("the key check (ZAP) thread stopped: %r; this node can admit "
                             "no one from now on", exc, exc_info=True)

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                events = dict(poller.poll(100))
                # connection events first: a client is accepted long before it asks ZAP
                if self._monitor is not None and self._monitor in events:
                    while self._monitor.poll(0):
                        self._guarded(self._on_event, self._monitor.recv_multipart())
                if self._socket in events:
                    request = self._socket.recv_multipart()
                    answer = self._guarded(self._answer, request)
                    self._socket.send_multipart(answer or _zap_refusal(request, b"500",
                                                                       b"internal error"))
            except zmq.ZMQError:
                return  # context terminated: we are closing

    def _guarded(self, handle, frames: list[bytes]):
        """``handle(frames)``; an exception (a bug, or input we did not foresee) is logged, the
        first few times, and never stops the thread."""
        try:
            return handle(frames)
        except zmq.ZMQError:
            raise
        except Exception:  # noqa: BLE001 - see the class docstring
            self._errors_logged += 1
            if self._errors_logged <= 3:
                log.exception("the key check (ZAP) thread failed on %r; carrying on",
                              [f[:64] for f in frames])
            return None

    def _on_event(self, frames: list[bytes]) -> None:
        if len(frames) < 1 or len(frames[0]) < 6:
            return
        event, value = struct.unpack("=hi", frames[0][:6])
        if event == zmq.EVENT_ACCEPTED:
            self._on_accepted(value)
        elif event == zmq.EVENT_DISCONNECTED:
            address = self.connections.pop(value, None)
            self._accepted.pop(value, None)
            if self._crypto_failures and address:
                self._crypto_failures -= 1
                count = self.wrong_key[address] = self.wrong_key.get(address, 0) + 1
                if count == 1 and len(self.wrong_key) <= MAX_TRACKED_CONNECTIONS:
                    log.warning("a node at %s fails the key handshake: it holds another job "
                                "key (a wrong key file, or another job's); it cannot join",
                                address)
                if len(self.wrong_key) > MAX_TRACKED_CONNECTIONS:
                    self.wrong_key.pop(next(iter(self.wrong_key)))
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and \
                value == getattr(zmq, "PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC", 0x11000001):
            self._crypto_failures = min(self._crypto_failures + 1, MAX_YOUNG_CONNECTIONS)

    def _on_accepted(self, fd: int) -> None:
        address = _peer_address_of(fd)
        now = time.monotonic()
        for old in [f for f, t in self._accepted.items() if now - t > self.handshake_timeout]:
            del self._accepted[old]  # past its handshake: libzmq closed it or it authenticated
        young_here = sum(1 for f in self._accepted if self.connections.get(f) == address)
        if address and (young_here >= MAX_YOUNG_PER_ADDRESS
                        or len(self._accepted) >= MAX_YOUNG_CONNECTIONS):
            if _shut_connection(fd, address, self.listening_port):
                self.shut += 1
                if address not in self._refusals_logged and \
                        len(self._refusals_logged) < MAX_TRACKED_CONNECTIONS:
                    self._refusals_logged.add(address)
                    log.warning("shutting new connections from %s: %d of its connections are "
                                "still in their handshake (limit %d per address, %d in all); "
                                "further ones are not logged", address, young_here,
                                MAX_YOUNG_PER_ADDRESS, MAX_YOUNG_CONNECTIONS)
        self.connections[fd] = address
        self._accepted[fd] = now
        if len(self.connections) > MAX_TRACKED_CONNECTIONS:
            # a descriptor whose DISCONNECTED we missed: forget the oldest
            oldest = next(iter(self.connections))
            self.connections.pop(oldest)
            self._accepted.pop(oldest, None)

    def _handshaken(self, address: str) -> None:
        """A connection from ``address`` finished its CURVE handshake (it asks ZAP now): it
        is no longer young. Which one is not said; the oldest young one from there is
        counted out (the first to connect is the first to finish, near enough)."""
        for fd in self._accepted:
            if self.connections.get(fd) == address:
                del self._accepted[fd]
                return

    def _answer(self, request: list[bytes]) -> list[bytes]:
        if not (len(request) == 7 and request[2] == ZAP_DOMAIN and request[5] == b"CURVE"
                and len(request[6]) == 32):
            self.refused += 1
            return _zap_refusal(request, b"400", b"CURVE required")
        key = zmq.utils.z85.encode(request[6])
        address = request[3].decode("utf-8", "replace")
        self._handshaken(address)
        text = key.decode()
        if self.revoked and device_fingerprint(text) in self.revoked:
            self.refused += 1
            return _zap_refusal(request, b"400", b"revoked")
        if text not in frozenset(self.admitted.values()):
            open_now = self.open_connections(address)
            if open_now > self.max_per_address:
                self.refused += 1
                if address not in self._refusals_logged and \
                        len(self._refusals_logged) < MAX_TRACKED_CONNECTIONS:
                    self._refusals_logged.add(address)
                    log.warning("refusing new connections from %s: it holds %d open connections, "
                                "the limit is %d (further refusals are not logged)", address,
                                open_now, self.max_per_address)
                return _zap_refusal(request, b"400", b"too many connections")
        version, request_id = request[:2]
        return [version, request_id, b"200", b"OK", key, b""]

    def close(self) -> None:
        """Stop answering (the context's termination ends the thread)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(1.0)
        self._socket.close(linger=0)
        if self._monitor is not None:
            self._monitor.close(linger=0)


def _zap_refusal(request: list[bytes], status: bytes, text: bytes) -> list[bytes]:
    version, request_id = (list(request) + [b"1.0", b""])[:2]
    return [version, request_id, status, text, b"", b""]


def _shut_connection(fd: int, address: str, port: int) -> bool:
    """Shut the accepted connection on descriptor ``fd``, if it still is one from ``address``
    to our listening ``port`` (the number may have been reused since the event)."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            peer, local = sock.getpeername(), sock.getsockname()
            if peer[0] != address or (port and local[1] != port):
                return False
            sock.shutdown(socket.SHUT_RDWR)
            return True
    except OSError:
        return False


def _peer_address_of(fd: int) -> str:
    """The remote IP address of a connected socket libzmq owns (by descriptor), or ""."""
    try:
        # a duplicate: reading the address must not touch (or close) libzmq's descriptor
        with socket.socket(fileno=os.dup(fd)) as sock:
            address = sock.getpeername()
    except OSError:
        return ""  # closed already; its DISCONNECTED event follows
    return address[0] if isinstance(address, tuple) else ""


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


def new_curve_keypair() -> tuple[str, str]:
    """A fresh CURVE key pair, (public, secret) as Z85 text: a new device's key."""
    public, secret = zmq.curve_keypair()
    return public.decode(), secret.decode()


def check_libzmq() -> None:
    """Refuse to run on a libzmq with known security bugs (CVE-2019-13132, CVE-2020-15166)."""
    version = zmq.zmq_version_info()
    if version < MIN_LIBZMQ:
        raise TransportError(f"libzmq {zmq.zmq_version()} is too old; ringtrain needs "
                             f">= {'.'.join(map(str, MIN_LIBZMQ))} (pip install -U pyzmq)")


def normalize_endpoint(address: str) -> str:
    """``host:port`` or ``tcp://host:port`` → ``tcp://host:port``; other schemes pass through."""
    if "://" in address:
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"address {address!r} is not host:port")
    return f"tcp://{host}:{port}"


def peer_endpoint(text: object) -> str:
    """An endpoint a peer (or an advert) gave us, checked: ``tcp://IP:PORT`` with a literal
    unicast IPv4 address (or a bracketed IPv6 one) and a port in 1..65535; ``IP:PORT`` is
    taken as tcp. Anything else (other schemes, host names, which would make us resolve
    names a stranger picked, bad ports) is refused.

    Raises:
        ConfigError: naming what was wrong.
    """
    if not isinstance(text, str) or len(text) > MAX_ENDPOINT_LENGTH:
        raise ConfigError(f"endpoint {str(text)[:80]!r} is not text of at most "
                          f"{MAX_ENDPOINT_LENGTH} characters")
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "tcp", text
    host, sep, port = rest.rpartition(":")
    if scheme != "tcp" or not sep:
        raise ConfigError(f"endpoint {text!r} is not tcp://IP:PORT")
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"endpoint {text!r} has no port in 1..65535")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        address = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        raise ConfigError(f"endpoint {text!r} does not name an IP address") from None
    if address.version == 6 and not bracketed:
        raise ConfigError(f"endpoint {text!r}: an IPv6 address goes in brackets")
    if address.is_multicast or address.is_unspecified or str(address) == "255.255.255.255":
        raise ConfigError(f"endpoint {text!r} is not a unicast address")
    return f"tcp://{host}:{int(port)}"


def raise_fd_limit(wanted: int = FD_LIMIT_WANTED) -> int:
    """Raise this process's soft limit on open files towards ``wanted`` (never above the
    hard limit), so that connections a stranger opens meet our budgets (see
    :class:`ZapHandler`) long before the process limit. Returns the soft limit now."""
    try:
        import resource  # POSIX only
    except ImportError:
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return wanted if soft == resource.RLIM_INFINITY else soft


def open_fds() -> int:
    """How many file descriptors this process holds (Linux; -1 elsewhere)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself opened
    except OSError:
        return -1


def is_loopback(address: str) -> bool:
    """Whether an address (``host:port`` or a zmq endpoint) stays on this machine."""
    endpoint = normalize_endpoint(address)
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = endpoint.split("://", 1)[1].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
        self.max_message = settings.segment_bytes + HEADER_SIZE + MAX_CONTROL_BYTES
        self._hwm = max(2, settings.queue_bytes // settings.segment_bytes)
        self._context = zmq.Context()
        self._links: dict[str, zmq.Socket] = {}
        self._link_endpoints: dict[str, str] = {}
        self._wake_lock = threading.Lock()
        self.admitted: dict[str, str] = {}
        self._routes: dict[str, bytes] = {}  # insecure rings: node id -> its last routing id
        self._zap = (ZapHandler(self._context, self.admitted, MAX_CONNECTIONS_PER_ADDRESS,
                                settings.handshake_timeout) if key is not None else None)
        self._watches: dict[str, tuple[zmq.Socket, list[float]]] = {}  # link -> its monitor
        if key is not None:
            if device is not None:  # the device's own key: it is who dials
                self.public_key, self._secret_key = device.public.encode(), device.secret.encode()
                if zmq.curve_public(self._secret_key) != self.public_key:
                    raise SecurityError("the device key's public half does not match its "
                                        "secret half: delete the device key file")
            else:
                self.public_key, self._secret_key = zmq.curve_keypair()
            tag = self.public_key
        else:
            self.public_key, self._secret_key = b"", b""
            tag = secrets.token_hex(8).encode()
        self.route = identity.encode() + ROUTE_SEPARATOR + tag
        try:
            self._router = self._socket(zmq.ROUTER)
            if key is not None:
                self._router.curve_server = True
                self._router.curve_secretkey = curve_keypair(key, "server")[1]
                self._router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
                self._router.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
            self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)
            endpoint = normalize_endpoint(listen)
            if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
                port = self._router.bind_to_random_port(endpoint[: -len(":0")])
                endpoint = f"{endpoint[: -len(':0')]}:{port}"
            else:
                self._router.bind(endpoint)
            self.endpoint = endpoint
            if self._zap is not None:
                port = endpoint.rpartition(":")[2]
                self._zap.start(self._router, int(port) if port.isdigit() else 0)
            # a plain socket pair: one write wakes the poll, cheaper than a zmq send
            self._wake_in, self._wake_out = socket.socketpair()
            self._wake_in.setblocking(False)
            self._wake_out.setblocking(False)
        except (zmq.ZMQError, OSError) as exc:
            if self._zap is not None:
                self._zap.close()
            self._context.destroy(linger=0)
            raise TransportError(f"cannot listen on {listen}: {exc}") from exc
        self._wake_fd = self._wake_in.fileno()
        self._poller = zmq.Poller()  # everything: the listening socket, links, doors, wakes
        # what a collective waits for: data comes to the listening socket or a door, never on
        # a link (links bring replies to membership, read at its next turn). Each zmq socket
        # polled costs system calls, and a ring of N has N-1 links.
        self._data_poller = zmq.Poller()
        for poller in (self._poller, self._data_poller):
            poller.register(self._router, zmq.POLLIN)
            poller.register(self._wake_fd, zmq.POLLIN)
        self._ready: list[zmq.Socket] = []  # sockets the last look found readable, unread
        self.ready_fds: set[int] = set()  # watched descriptors the last look found readable

    def _socket(self, kind: int) -> zmq.Socket:
        s = self.settings
        sock = self._context.socket(kind)
        sock.setsockopt(zmq.LINGER, int(s.linger * 1000))
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message)
        sock.setsockopt(zmq.SNDHWM, self._hwm)
        sock.setsockopt(zmq.RCVHWM, self._hwm * 4)
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(s.heartbeat_interval * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(s.heartbeat_timeout * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TTL, int(s.heartbeat_timeout * 2000))
        sock.setsockopt(zmq.HANDSHAKE_IVL, int(s.handshake_timeout * 1000))
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        return sock

    # links ---------------------------------------------------------------------------------

    def connect(self, link: str, endpoint: str, watch: bool = False) -> None:
        """Open (or keep) the outgoing link named ``link`` to ``endpoint``. ``watch``: follow
        its key handshakes, for :meth:`refused_links` (a probe of a node we have not met)."""
        endpoint = normalize_endpoint(endpoint)
        if self._link_endpoints.get(link) == endpoint:
            return
        self.disconnect(link)
        try:
            sock = self._socket(zmq.DEALER)
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
        self._poller.register(sock, zmq.POLLIN)
        if watch and self.key is not None:
            monitor = sock.get_monitor_socket(
                zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            self._watches[link] = (monitor, [0.0, 0, 0])

    def refused_links(self) -> dict[str, tuple[int, int]]:
        """Watched links whose peer refused our key handshake: endpoint -> (handshakes that failed
        within ``REFUSED_WITHIN_S`` of connecting: the peer could not open our CURVE HELLO,
        so it holds another job key; handshakes its key check refused, e.g. a revoked
        device). Links with neither are left out. Reads the watches' events, never blocks.

        Call it often (every turn or so): libzmq blocks its I/O thread once a monitor's
        queue is full, so watched links' events must be read."""
        refused = {}
        for link, (monitor, state) in list(self._watches.items()):
            try:
                while monitor.poll(0):
                    frames = monitor.recv_multipart(zmq.NOBLOCK)
                    if len(frames[0]) < 6:
                        continue
                    event, value = struct.unpack("=hi", frames[0][:6])
                    now = time.monotonic()
                    if event == zmq.EVENT_CONNECTED:
                        state[0] = now
                    elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                        state[2] += 1
                    elif state[0] and now - state[0] < REFUSED_WITHIN_S:
                        state[1] += 1
            except zmq.ZMQError:
                continue
            if state[1] or state[2]:
                refused[self._link_endpoints.get(link, link)] = (int(state[1]), int(state[2]))
        return refused

    def _unwatch(self, link: str) -> None:
        watch = self._watches.pop(link, None)
        if watch is None:
            return
        sock = self._links.get(link)
        if sock is not None:
            # first stop the events: libzmq's I/O thread blocks, and with it every socket of
            # the context, on a monitor whose reader is gone (seen here)
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
        watch[0].close(linger=0)

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
            if sock in self._ready:
                self._ready.remove(sock)
            self._poller.unregister(sock)
            sock.close(linger=0)

    def links(self) -> dict[str, str]:
        """Outgoing links: name → endpoint."""
        return dict(self._link_endpoints)

    def watch(self, fd: int) -> None:
        """Let :meth:`wait` return when file descriptor ``fd`` (another way messages come
        in, such as a same-host door) is readable."""
        self._poller.register(fd, zmq.POLLIN)
        self._data_poller.register(fd, zmq.POLLIN)

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
        poller = self._poller if links else self._data_poller
        sock = self._links.get(writable) if writable is not None else None
        if sock is not None:
            if links:
                poller.modify(sock, zmq.POLLIN | zmq.POLLOUT)
            else:
                poller.register(sock, zmq.POLLOUT)
        try:
            return self._poll(poller, timeout, sock, wakes=True)
        finally:
            if sock is not None:
                if links:
                    poller.modify(sock, zmq.POLLIN)
                else:
                    poller.unregister(sock)

    def look(self) -> bool:
        """Like :meth:`wait`, without blocking, and leaving a wake for the next wait (the
        waker's work must not be missed). Returns whether anything is readable."""
        return self._poll(self._poller, 0.0, None, wakes=False)[0]

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
        self._ready, self.ready_fds = ready, fds
        return bool(ready or fds), can_send

    def _clear_wakes(self) -> None:
        """Take the pending wakes off the wake socket."""
        try:
            self._wake_in.recv(4096)  # any more (a wake since) just ends the next wait early
        except (BlockingIOError, InterruptedError):
            pass

    def receive(self) -> Incoming | None:
        """One message from the sockets the last :meth:`wait` or :meth:`look` found readable,
        without blocking; None once they are empty. (Only those are read: a failed non-blocking
        read of every socket cost more than all else in a small collective. Whatever
        arrives later shows in the next look.)"""
        while self._ready:
            sock = self._ready[-1]
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self._ready.pop()
                continue
            except zmq.ZMQError as exc:
                raise TransportError(f"receive failed: {exc}") from exc
            if sock is not self._router:
                link = next((name for name, s in self._links.items() if s is sock), None)
                if link is None:
                    self._ready.pop()  # closed since the poll
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
        with self._wake_lock:
            try:
                self._wake_out.send(b"\0")
            except OSError:
                pass  # full: a wake is already pending; closed: nobody waits any more

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
        with self._wake_lock:
            self._wake_out.close()
        self._wake_in.close()
        if self._zap is not None:
            self._zap.close()
        self._context.term()


def _frame_property(frame: zmq.Frame, name: str) -> str:
    try:
        return frame.get(name)
    except (zmq.ZMQError, UnicodeDecodeError):
        return ""


# observe: "why can't I see my peer" (ringtrain doctor) --------------------------------------

def handshake_probe(endpoint: str, key: JobKey | None, timeout: float) -> str:
    """Dial ``endpoint`` as a node of ``key``'s job would, send nothing, and say how far it
    got: ``"ok"`` (the ZMTP and CURVE handshake completed: the peer holds the job key),
    ``"closed"`` (the connection was refused: nothing listens there), ``"refused"`` (TCP
    connected, the handshake failed: the peer holds another job key or is not a ringtrain
    node), or ``"timeout"`` (no handshake answer within ``timeout`` seconds: a firewall
    drops the packets, the host is down, or the process is stopped or far too busy)."""
    context = zmq.Context()
    try:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 200)
        sock.setsockopt(zmq.HANDSHAKE_IVL, max(1, int(timeout * 1000)))
        if key is not None:
            public, secret = zmq.curve_keypair()
            sock.curve_serverkey = curve_keypair(key, "server")[0]
            sock.curve_publickey, sock.curve_secretkey = public, secret
        monitor = sock.get_monitor_socket()
        sock.connect(normalize_endpoint(endpoint))
        seen: set[int] = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not monitor.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                break
            frames = monitor.recv_multipart()
            event = struct.unpack("=hi", frames[0][:6])[0]
            seen.add(event)
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return "ok"
            if event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                         zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL) or (
                    event == zmq.EVENT_DISCONNECTED and zmq.EVENT_CONNECTED in seen):
                return "refused"
            if event == zmq.EVENT_CONNECT_RETRIED and zmq.EVENT_CONNECTED not in seen:
                return "closed"
        return "timeout"  # connected or not, no handshake answer: stopped, or far too busy
    except zmq.ZMQError as exc:
        raise TransportError(f"cannot probe {endpoint}: {exc}") from exc
    finally:
        context.destroy(linger=0)
