"""The key check of a node's listening socket: the ZAP handler that checks every key handshake
(and answers the node's key door, ``door``), and the budgets on connections a stranger can
open.

ZeroMQ has no option that bounds connections, so a monitor on the ROUTER counts open
connections per remote address (``EVENT_ACCEPTED`` / ``EVENT_DISCONNECTED``): connections still
in their handshake are bounded per address and in all (beyond, shut at once), and the ZAP
handler refuses a CURVE client whose address already holds ``MAX_CONNECTIONS_PER_ADDRESS``
connections, unless its key is one membership admitted (a member reconnecting is never
refused). See :class:`ZapHandler` for what this does and does not bound; :func:`raise_fd_limit`
makes room for these budgets below the process's limit on open files.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from collections import OrderedDict

import zmq
import zmq.utils.z85

from .door import DoorServer
from .identity import device_fingerprint

log = logging.getLogger(__name__)

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
MAX_INTRODUCED = 1024  # device keys introduced at the door, remembered (the oldest go first)


class ZapHandler:
    """Answers ZAP requests for the node's listening socket, and keeps its connections within
    budgets.

    CURVE clients are let through with their public key (Z85) as ``User-Id``; anything else is
    refused, and so is a key whose device fingerprint is in ``revoked``. With a door (the socket
    listens with the device key, which adverts make public), a key must also have been
    introduced by the job key (:meth:`introduce`: at our door, or by the door we asked) or
    admitted, so a stranger cannot finish a handshake. Whether a key belongs to a member is
    decided later, from the HELLO it sends (see ``membership``). A client whose
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
    cryptographic error: the client expected another server key) are blamed on the address
    of the connection that closes next, and counted per address in :attr:`wrong_key` (one
    log line per address). The door (``door``), if any, is answered on this thread too.

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
        self.door: DoorServer | None = None  # set before start, if the node has a door
        self._introduced: OrderedDict[str, None] = OrderedDict()
        self._introduced_lock = threading.Lock()
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
        self._shuts_logged: set[str] = set()
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

    def introduce(self, key: str) -> None:
        """Let device key ``key`` (Z85) through: the job key vouched for it. Any thread."""
        with self._introduced_lock:
            self._introduced[key] = None
            self._introduced.move_to_end(key)
            while len(self._introduced) > MAX_INTRODUCED:
                self._introduced.popitem(last=False)

    def _known(self, key: str) -> bool:
        """Whether ``key`` may finish a handshake: always without a door, else only if it
        was introduced or membership admitted it."""
        if self.door is None or key in frozenset(self.admitted.values()):
            return True
        with self._introduced_lock:
            return key in self._introduced

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
        door_resumes = 0.0  # while the door read its share: when it is read again
        if self.door is not None:
            poller.register(self.door.fileno(), zmq.POLLIN)
        while not self._stop.is_set():
            try:
                events = dict(poller.poll(100))
                if door_resumes and time.monotonic() >= door_resumes:
                    door_resumes = 0.0
                    poller.register(self.door.fileno(), zmq.POLLIN)
                # connection events first: a client is accepted long before it asks ZAP
                if self._monitor is not None and self._monitor in events:
                    while self._monitor.poll(0):
                        self._guarded(self._on_event, self._monitor.recv_multipart())
                if self.door is not None and self.door.fileno() in events:
                    door_resumes = self._guarded(lambda _: self.door.serve(), []) or 0.0
                    if door_resumes:
                        poller.unregister(self.door.fileno())
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
                    log.warning("a node at %s fails the key handshake: it dials this address "
                                "expecting another device key (one it was told or pinned)",
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
                if address not in self._shuts_logged and \
                        len(self._shuts_logged) < MAX_TRACKED_CONNECTIONS:
                    self._shuts_logged.add(address)
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
        if not self._known(text):
            self.refused += 1
            return _zap_refusal(request, b"400", b"not introduced")
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
        if self.door is not None:
            self.door.close()
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

