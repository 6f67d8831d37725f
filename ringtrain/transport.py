"""The ZeroMQ transport: the only module that imports zmq.

A node listens on one ROUTER socket; every peer it talks to gets one DEALER socket connected to
that peer's ROUTER. Messages arrive on the ROUTER tagged with the sender's routing id (its node
id); replies to a handshake come back on the DEALER that sent it. One extra inproc socket lets
other threads wake the thread that owns the sockets.

Limits set on every socket (see :class:`ringtrain.config.Settings`):

* ``MAXMSGSIZE``: a peer cannot make us allocate more than one segment plus a header.
* high-water marks derived from a byte budget: ZeroMQ counts messages, our messages are at most
  ``segment_bytes``, so ``queue_bytes // segment_bytes`` messages bound the bytes queued.
* ZMTP heartbeats, so a dead or suspended host is noticed by the transport itself.
* a handshake deadline, reconnect back-off and a bounded linger on close.
* with a job key: CURVE encryption on every connection. Every node listens with the server
  keypair derived from the job key, so dialling a node that lacks the job key fails in the
  handshake. Each node dials with its own random keypair; the ZAP handler stamps every
  message with the dialler's public key (``Incoming.user``), which CURVE has proven the
  dialler holds the secret of. ``membership`` admits a key only after its HELLO proved
  knowledge of the job key, and the mailbox drops everything else.

zmq errors become :class:`TransportError` here and nowhere else.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from dataclasses import dataclass, field

import zmq
import zmq.utils.z85

from .config import Settings
from .errors import ConfigError, SecurityError, TransportError
from .security import JobKey
from .wire import HEADER_SIZE, MAX_CONTROL_BYTES

log = logging.getLogger(__name__)

MIN_LIBZMQ = (4, 3, 3)
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"ringtrain"


def curve_keypair(key: JobKey, purpose: str) -> tuple[bytes, bytes]:
    """The CURVE (public, secret) pair, Z85-encoded, derived from ``key`` for ``purpose``."""
    secret = zmq.utils.z85.encode(key.derive(purpose))
    return zmq.curve_public(secret), secret


class ZapHandler:
    """Answers ZAP requests for the node's listening socket: CURVE clients are let through
    with their public key (Z85) as ``User-Id``; anything else is refused. Whether that key
    belongs to a member is decided later, from the HELLO it sends (see ``membership``)."""

    def __init__(self, context: zmq.Context):
        self.refused = 0
        self._socket = context.socket(zmq.REP)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(ZAP_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="ringtrain-zap", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._socket.poll(100):
                    continue
                request = self._socket.recv_multipart()
                self._socket.send_multipart(self._answer(request))
            except zmq.ZMQError:
                return  # context terminated: we are closing

    def _answer(self, request: list[bytes]) -> list[bytes]:
        if len(request) == 7 and request[2] == ZAP_DOMAIN and request[5] == b"CURVE" \
                and len(request[6]) == 32:
            version, request_id = request[:2]
            return [version, request_id, b"200", b"OK", zmq.utils.z85.encode(request[6]), b""]
        self.refused += 1
        version, request_id = (request + [b"1.0", b""])[:2]
        return [version, request_id, b"400", b"CURVE required", b"", b""]

    def close(self) -> None:
        """Stop answering (the context's termination ends the thread)."""
        self._stop.set()
        self._thread.join(1.0)
        self._socket.close(linger=0)


@dataclass
class Incoming:
    """A received message: who sent it and its frames (zero-copy ``zmq.Frame`` objects)."""

    origin: str  # sender's node id (ROUTER) or the link name it arrived on (DEALER)
    frames: list = field(repr=False)
    on_link: bool = False  # True when it came back on one of our outgoing links
    peer_address: str = ""  # the sender's IP address as the connection sees it, if known
    user: str = ""  # the sender's CURVE public key (Z85), proven by the handshake; "" if insecure


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
    """

    def __init__(self, identity: str, listen: str, settings: Settings, key: JobKey | None):
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
        self._zap = ZapHandler(self._context) if key is not None else None
        if key is not None:
            self.public_key, self._secret_key = zmq.curve_keypair()
        else:
            self.public_key, self._secret_key = b"", b""
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
            wake_address = f"inproc://wake-{id(self)}"
            self._wake_in = self._context.socket(zmq.PAIR)
            self._wake_in.bind(wake_address)
            self._wake_out = self._context.socket(zmq.PAIR)
            self._wake_out.connect(wake_address)
        except zmq.ZMQError as exc:
            if self._zap is not None:
                self._zap.close()
            self._context.destroy(linger=0)
            raise TransportError(f"cannot listen on {listen}: {exc}") from exc
        self._poller = zmq.Poller()
        self._poller.register(self._router, zmq.POLLIN)
        self._poller.register(self._wake_in, zmq.POLLIN)

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

    def connect(self, link: str, endpoint: str) -> None:
        """Open (or keep) the outgoing link named ``link`` to ``endpoint``."""
        endpoint = normalize_endpoint(endpoint)
        if self._link_endpoints.get(link) == endpoint:
            return
        self.disconnect(link)
        try:
            sock = self._socket(zmq.DEALER)
            sock.setsockopt(zmq.ROUTING_ID, self.identity.encode())
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

    def rename_link(self, old: str, new: str) -> None:
        """Give an outgoing link a new name (e.g. its endpoint → the peer's node id)."""
        if old == new:
            return
        if new in self._links:
            self.disconnect(new)
        self._links[new] = self._links.pop(old)
        self._link_endpoints[new] = self._link_endpoints.pop(old)

    def disconnect(self, link: str) -> None:
        """Close an outgoing link, dropping whatever it still queues."""
        sock = self._links.pop(link, None)
        self._link_endpoints.pop(link, None)
        if sock is not None:
            self._poller.unregister(sock)
            sock.close(linger=0)

    def links(self) -> dict[str, str]:
        """Outgoing links: name → endpoint."""
        return dict(self._link_endpoints)

    # data path -----------------------------------------------------------------------------

    def wait(self, timeout: float, writable: str | None = None) -> tuple[bool, bool]:
        """Block until something arrives, ``writable`` can take a message, a wake, or timeout.

        Returns:
            (readable, can_send): whether :meth:`receive` has something, and whether a send on
            link ``writable`` would not block.
        """
        sock = self._links.get(writable) if writable is not None else None
        if sock is not None:
            self._poller.modify(sock, zmq.POLLIN | zmq.POLLOUT)
        try:
            events = dict(self._poller.poll(max(0, int(timeout * 1000))))
        except zmq.ZMQError as exc:
            raise TransportError(f"poll failed: {exc}") from exc
        finally:
            if sock is not None:
                self._poller.modify(sock, zmq.POLLIN)
        if self._wake_in in events:
            while self._wake_in.poll(0):
                self._wake_in.recv()
        readable = any(s is not self._wake_in and ev & zmq.POLLIN for s, ev in events.items())
        can_send = sock is not None and bool(events.get(sock, 0) & zmq.POLLOUT)
        return readable, can_send

    def receive(self) -> Incoming | None:
        """One waiting message, without blocking, or None."""
        try:
            frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            return Incoming(bytes(frames[0].bytes).decode("utf-8", "replace"), frames[1:],
                            peer_address=_frame_property(frames[-1], "Peer-Address"),
                            user=_frame_property(frames[-1], "User-Id") if self.key else "")
        except zmq.Again:
            pass
        except zmq.ZMQError as exc:
            raise TransportError(f"receive failed: {exc}") from exc
        for link, sock in list(self._links.items()):
            try:
                return Incoming(link, sock.recv_multipart(zmq.NOBLOCK, copy=False), on_link=True)
            except zmq.Again:
                continue
            except zmq.ZMQError as exc:
                raise TransportError(f"receive on link {link} failed: {exc}") from exc
        return None

    def try_send(self, link: str, frames: list, track: bool = False):
        """Send without blocking. Returns False if the link's queue is full, else True or a
        ``MessageTracker`` when ``track`` (buffers sent zero-copy must not change until it
        is done)."""
        sock = self._links.get(link)
        if sock is None:
            raise TransportError(f"no link to {link}")
        try:
            tracker = sock.send_multipart(frames, zmq.NOBLOCK, copy=False, track=track)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            raise TransportError(f"send to {link} failed: {exc}") from exc
        return tracker if track else True

    def reply(self, origin: str, frames: list) -> bool:
        """Answer a message that arrived on the ROUTER, over the same connection. Best effort:
        returns False if it could not be queued."""
        try:
            self._router.send_multipart([origin.encode(), *frames], zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    def send(self, link: str, frames: list, deadline: float) -> None:
        """Send, blocking until ``deadline`` (a ``time.monotonic()`` value)."""
        while not self.try_send(link, frames):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransportError(f"send to {link} did not complete before its deadline")
            self.wait(min(remaining, 0.05), writable=link)

    def wake(self) -> None:
        """Interrupt a :meth:`wait` in progress. Safe from any thread."""
        with self._wake_lock:
            try:
                self._wake_out.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the wake queue is full: a wake is already pending

    def close(self, linger: float | None = None) -> None:
        """Close every socket, letting queued messages drain for at most ``linger`` seconds."""
        linger_ms = int((self.settings.linger if linger is None else linger) * 1000)
        for link in list(self._links):
            sock = self._links.pop(link)
            sock.close(linger=linger_ms)
        self._link_endpoints.clear()
        self._router.close(linger=linger_ms)
        with self._wake_lock:
            self._wake_out.close(linger=0)
        self._wake_in.close(linger=0)
        if self._zap is not None:
            self._zap.close()
        self._context.term()


def _frame_property(frame: zmq.Frame, name: str) -> str:
    try:
        return frame.get(name)
    except (zmq.ZMQError, UnicodeDecodeError):
        return ""
