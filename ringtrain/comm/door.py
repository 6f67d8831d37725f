"""The key door: how a node that knows only an address learns which device listens there.

Every node's listening socket is a CURVE server with its own device key, so a dialler must
know that key before it connects. Adverts, WELCOMEs and HELLOs carry it; ``--peer IP:PORT``,
peers by name and DNS answers do not. For those, each node answers on a *door*: a UDP socket
on the same address and port number as its listening TCP socket. One datagram each way:

* ask: ``MAGIC | nonce (16) | the asker's device public key (40, Z85) | MAC (32)``, the MAC
  being HMAC-SHA256 under a key derived from the job key (``JobKey.derive("door")``) over
  ``"ask" | nonce | asker key``;
* answer: ``MAGIC | nonce | the answerer's device public key | MAC`` over ``"answer" | nonce
  | asker key | answerer key``: only a job key holder can answer, only to this ask;
* refusal, to an ask whose MAC does not verify: ``MAGIC | nonce | "?" | our job key
  fingerprint``, unauthenticated, at most ``REFUSALS_PER_S`` a second, never longer than an
  ask: the asker holds another job key and is told so at once (``node.wrong_key``).

A door reads at most ``ASKS_PER_S`` datagrams a second; beyond, it is not read for a tenth of
a second and the kernel drops what does not fit its buffer, so a flood costs a bounded share
of a core (an asker asks again every second).

An answer names a key, nothing more: only the holder of that key's secret can then complete
the CURVE handshake, so a wrong answer costs a failed connection. An ask that verifies
*introduces* the asker's device key, and an answer the answerer's: a node's key check
(``zap``) lets through only keys introduced this way or admitted by membership, so a
stranger who read a device key off an advert still cannot finish a handshake.

Pure socket code (stdlib): no zmq.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import TransportError
from .identity import is_public_key
from .security import JobKey

log = logging.getLogger(__name__)

MAGIC = b"RTDOOR1\0"
NONCE_BYTES = 16
KEY_CHARS = 40  # a CURVE public key in Z85
MAC_BYTES = 32
ASK_BYTES = len(MAGIC) + NONCE_BYTES + KEY_CHARS + MAC_BYTES
REFUSED = b"?"
REFUSALS_PER_S = 100.0  # refusals sent at most (a stranger cannot use us as a reflector)
ASKS_PER_S = 1000.0  # datagrams read at most (a flood costs a bounded share of a core)
PAUSE_S = 0.1  # a door that read its share is not read for this long
MAX_PENDING = 1024  # asks awaiting an answer, remembered at most
MAX_LOGGED = 1024  # addresses whose wrong key was logged


def door_key(key: JobKey) -> bytes:
    """The MAC key of the door, derived from the job key."""
    return key.derive("door")


def door_address(endpoint: str) -> tuple[int, tuple[str, int]] | None:
    """(address family, (IP, port)) of the door of a ``tcp://IP:PORT`` endpoint; None for
    other endpoints (other schemes, host names)."""
    if not endpoint.startswith("tcp://"):
        return None
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    host = "0.0.0.0" if host == "*" else host.strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if not port.isdigit():
        return None
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    return family, (str(address), int(port))


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"|".join(parts), hashlib.sha256).digest()


def encode_ask(key: bytes, nonce: bytes, asker: bytes) -> bytes:
    """The datagram asking a door for its device key."""
    return MAGIC + nonce + asker + _mac(key, b"ask", nonce, asker)


def read_ask(key: bytes, data: bytes) -> tuple[bytes, bytes, bool] | None:
    """(nonce, asker key, whether the MAC verifies) of an ask; None if it is not one."""
    if len(data) != ASK_BYTES or not data.startswith(MAGIC):
        return None
    body = data[len(MAGIC):]
    nonce, asker, mac = body[:NONCE_BYTES], body[NONCE_BYTES:-MAC_BYTES], body[-MAC_BYTES:]
    return nonce, asker, hmac.compare_digest(mac, _mac(key, b"ask", nonce, asker))


def encode_answer(key: bytes, nonce: bytes, asker: bytes, answerer: bytes) -> bytes:
    """The datagram answering an ask with our device key."""
    return MAGIC + nonce + answerer + _mac(key, b"answer", nonce, asker, answerer)


def encode_refusal(nonce: bytes, fingerprint: str) -> bytes:
    """The datagram refusing an ask that another job key made."""
    return (MAGIC + nonce + REFUSED + fingerprint.encode("ascii", "replace"))[:ASK_BYTES]


@dataclass(frozen=True)
class DoorReply:
    """What a door said: its device key (Z85), or that it holds another job key."""

    endpoint: str
    key: str = ""  # the answerer's device public key; "" if refused
    other_job: str = ""  # the refusing door's job key fingerprint (unauthenticated)


def read_reply(key: bytes, data: bytes, nonce: bytes, asker: bytes, endpoint: str
               ) -> DoorReply | None:
    """The reply to our ask ``nonce``, or None if ``data`` is not one (or forged)."""
    if not data.startswith(MAGIC + nonce):
        return None
    rest = data[len(MAGIC) + NONCE_BYTES:]
    if len(data) < ASK_BYTES and rest.startswith(REFUSED):
        text = rest[1:].decode("ascii", "replace")
        return DoorReply(endpoint, other_job="".join(c for c in text if c.isalnum())[:16])
    answerer, mac = rest[:KEY_CHARS], rest[KEY_CHARS:]
    text = answerer.decode("ascii", "replace")
    if not is_public_key(text) or not hmac.compare_digest(
            mac, _mac(key, b"answer", nonce, asker, answerer)):
        return None
    return DoorReply(endpoint, key=text)


def open_door(host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket bound to ``host:port`` (the listening TCP socket's).

    Raises:
        OSError: it cannot be bound (the UDP port is taken).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class DoorServer:
    """Answers asks on a node's door (module docstring); driven by the key check's thread.

    Args:
        sock: the door's UDP socket (see :func:`open_door`); closed by :meth:`close`.
        job: the job key.
        public_key: this device's public key (Z85).
        introduce: called with the device key of every asker whose ask verifies.
    """

    def __init__(self, sock: socket.socket, job: JobKey, public_key: bytes,
                 introduce: Callable[[str], None]):
        self.sock = sock
        self._key = door_key(job)
        self._fingerprint = job.fingerprint
        self._public = public_key
        self._introduce = introduce
        self.wrong_key: dict[str, int] = {}  # remote address -> asks under another job key
        self._allowance = REFUSALS_PER_S
        self._last = time.monotonic()
        self._reads = ASKS_PER_S * PAUSE_S  # datagrams it may read now
        self._reads_at = self._last

    def fileno(self) -> int:
        """The socket's descriptor, to poll."""
        return self.sock.fileno()

    def serve(self, most: int = 64) -> float:
        """Answer the asks waiting, at most ``most`` of them (never blocks). Returns 0.0, or
        the monotonic time until which the door should not be read (it read its share)."""
        now = time.monotonic()
        self._reads = min(ASKS_PER_S * PAUSE_S,
                          self._reads + (now - self._reads_at) * ASKS_PER_S)
        self._reads_at = now
        for _ in range(most):
            if self._reads < 1.0:
                return now + PAUSE_S
            self._reads -= 1.0
            try:
                data, source = self.sock.recvfrom(ASK_BYTES + 1)
            except (BlockingIOError, InterruptedError):
                return 0.0
            except OSError:
                continue  # an ICMP error from an earlier reply: nothing to read
            ask = read_ask(self._key, data)
            if ask is None:
                continue
            nonce, asker, verified = ask
            if verified:
                self._introduce(asker.decode("ascii", "replace"))
                self._send(encode_answer(self._key, nonce, asker, self._public), source)
            else:
                self._refuse(nonce, source)
        return 0.0

    def _refuse(self, nonce: bytes, source: tuple) -> None:
        now = time.monotonic()
        self._allowance = min(REFUSALS_PER_S,
                              self._allowance + (now - self._last) * REFUSALS_PER_S)
        self._last = now
        address = str(source[0])
        count = self.wrong_key.get(address, 0) + 1
        if count == 1 and len(self.wrong_key) < MAX_LOGGED:
            log.warning("a node at %s asks for this node's key under another job key (a wrong "
                        "key file, or another job's); it cannot join", address)
        if address in self.wrong_key or len(self.wrong_key) < MAX_LOGGED:
            self.wrong_key[address] = count
        if self._allowance >= 1.0:
            self._allowance -= 1.0
            self._send(encode_refusal(nonce, self._fingerprint), source)

    def _send(self, data: bytes, destination: tuple) -> None:
        try:
            self.sock.sendto(data, destination)
        except OSError:
            pass  # best effort: the asker asks again

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


class DoorClient:
    """Asks doors for their device keys, without blocking: :meth:`ask`, then :meth:`replies`.

    Args:
        job: the job key.
        public_key: this device's public key (Z85), introduced to every door asked.
    """

    def __init__(self, job: JobKey, public_key: bytes):
        self._key = door_key(job)
        self._public = public_key
        self._pending: OrderedDict[bytes, str] = OrderedDict()  # nonce -> endpoint
        self._socks: dict[int, socket.socket] = {}  # address family -> socket

    def ask(self, endpoint: str) -> bool:
        """Send an ask to the door of ``endpoint``; False if it has none (not tcp://IP)."""
        where = door_address(endpoint)
        if where is None:
            return False
        family, address = where
        sock = self._socks.get(family)
        if sock is None:
            sock = self._socks[family] = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
        nonce = os.urandom(NONCE_BYTES)
        self._pending[nonce] = endpoint
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)
        try:
            sock.sendto(encode_ask(self._key, nonce, self._public), address)
        except OSError as exc:
            log.debug("cannot ask the door of %s: %s", endpoint, exc)
        return True

    def replies(self) -> list[DoorReply]:
        """The replies that came since the last call (never blocks)."""
        found = []
        for sock in self._socks.values():
            while True:
                try:
                    data = sock.recv(ASK_BYTES + 1)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    continue  # ICMP: a door that is closed; its probe expires
                nonce = data[len(MAGIC):len(MAGIC) + NONCE_BYTES]
                endpoint = self._pending.get(nonce)
                reply = None if endpoint is None else \
                    read_reply(self._key, data, nonce, self._public, endpoint)
                if reply is not None:
                    del self._pending[nonce]
                    found.append(reply)
        return found

    def forget(self, endpoint: str) -> None:
        """Drop the asks to ``endpoint`` still awaiting an answer."""
        for nonce in [n for n, e in self._pending.items() if e == endpoint]:
            del self._pending[nonce]

    def close(self) -> None:
        """Close the sockets."""
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()


def ask_once(endpoint: str, job: JobKey, public_key: bytes, timeout: float
             ) -> DoorReply | str:
    """Ask the door of ``endpoint`` once, waiting up to ``timeout`` seconds (asking again
    every half second): its reply, or ``"closed"`` (nothing listens there: the port is
    unreachable) or ``"timeout"`` (no reply).

    Raises:
        TransportError: ``endpoint`` has no door (not ``tcp://IP:PORT``).
    """
    where = door_address(endpoint)
    if where is None:
        raise TransportError(f"{endpoint} has no key door: it is not tcp://IP:PORT")
    family, address = where
    key = door_key(job)
    deadline = time.monotonic() + timeout
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect(address)  # so that a closed port says so (ICMP port unreachable)
        while time.monotonic() < deadline:
            nonce = os.urandom(NONCE_BYTES)
            try:
                sock.send(encode_ask(key, nonce, public_key))
                retry = time.monotonic() + 0.5
                while (now := time.monotonic()) < min(retry, deadline):
                    sock.settimeout(min(retry, deadline) - now)
                    reply = read_reply(key, sock.recv(ASK_BYTES + 1), nonce, public_key,
                                       endpoint)
                    if reply is not None:
                        return reply
            except ConnectionRefusedError:
                return "closed"
            except TimeoutError:
                continue
            except OSError as exc:
                raise TransportError(f"cannot ask the door of {endpoint}: {exc}") from exc
    return "timeout"
