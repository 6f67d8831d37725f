"""The status protocol: a node answers "what are you doing?" over an authenticated link.

Each node run by ``ringtrain node`` serves its status on its own port (the node's port + 1 by
default), on a :class:`~ringtrain.comm.transport.Transport` of its own, so a node busy in a
collective, or a runner that hangs, still answers; only a stopped process does not, and that
silence is what ``ringtrain status`` reports.

Authentication: unlike a node's own socket (its device key), the status socket listens with
the CURVE server key derived from the job key, so any job key holder may ask a node it knows
only by address (a client without the key cannot even finish the handshake), and
every request carries ``HMAC(job key, "status:" + the client's CURVE public key)``, which
CURVE proved the client holds the secret of: only holders of the job key can read a node's
status, and a request cannot be replayed from another connection.

Messages are two frames: ``MAGIC`` and a UTF-8 JSON object (a request of at most
``MAX_REQUEST_BYTES``; a reply of at most one transport message). A request is
``{"op": "status" | "clock", "proof": hex}``; a reply is ``{"ok": true, ...}`` or
``{"ok": false, "error": text}``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..comm.endpoints import normalize_endpoint
from ..comm.security import JobKey
from ..comm.transport import Transport
from ..config import Settings
from ..errors import ProtocolError, RingtrainError

log = logging.getLogger(__name__)

MAGIC = b"RTSTATUS1"
MAX_REQUEST_BYTES = 4096
OPS = ("status", "clock")
SERVE_POLL = 0.2  # seconds between looks at the stop flag


def status_proof(key: JobKey | None, public_key: str) -> str:
    """The request proof for a client whose CURVE public key (Z85) is ``public_key``."""
    if key is None:
        return ""
    return hmac.new(key.derive("status"), b"status:" + public_key.encode(),
                    hashlib.sha256).hexdigest()


def status_endpoint(node_endpoint: str, offset: int = 1) -> str:
    """The status endpoint of a node listening on ``node_endpoint`` (its port + ``offset``).

    Raises:
        ConfigError: ``node_endpoint`` is not ``host:port``.
    """
    endpoint = normalize_endpoint(node_endpoint)
    host, _, port = endpoint.rpartition(":")
    return f"{host}:{int(port) + offset}"


def decode_request(frames: Sequence[bytes], sender: str) -> dict[str, Any]:
    """A request's fields, checked one by one.

    Raises:
        ProtocolError: naming the field that was wrong and who sent it.
    """
    if len(frames) != 2 or frames[0] != MAGIC:
        raise ProtocolError("frames", f"[{MAGIC!r}, request]", f"{len(frames)} frames", sender)
    if len(frames[1]) > MAX_REQUEST_BYTES:
        raise ProtocolError("request", f"at most {MAX_REQUEST_BYTES} bytes",
                            f"{len(frames[1])} bytes", sender)
    try:
        request = json.loads(bytes(frames[1]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError("request", "a UTF-8 JSON object", str(exc), sender) from None
    if not isinstance(request, dict):
        raise ProtocolError("request", "a JSON object", type(request).__name__, sender)
    if request.get("op") not in OPS:
        raise ProtocolError("op", f"one of {OPS}", repr(request.get("op"))[:40], sender)
    proof = request.get("proof", "")
    if not isinstance(proof, str) or len(proof) > 128:
        raise ProtocolError("proof", "a hex string", repr(proof)[:40], sender)
    return request


class StatusServer:
    """Answers status requests on ``listen`` from a thread of its own.

    Args:
        node_id: the node served (the socket's identity is ``<node_id>-status``).
        listen: ``host:port`` to bind.
        key: the job key (None: no authentication; the node itself is loopback-only then).
        status: returns the node's status as plain JSON data; called on the server thread.
        settings: transport limits and timeouts.

    Raises:
        TransportError: the port cannot be bound.
    """

    def __init__(self, node_id: str, listen: str, key: JobKey | None,
                 status: Callable[[], dict[str, Any]], settings: Settings | None = None):
        self._key = key
        self._status = status
        self._transport = Transport(f"{node_id}-status", listen, settings or Settings(), key,
                                    job_server=True)
        self.endpoint = self._transport.endpoint
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"ringtrain-status-{node_id}",
                                        daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        transport = self._transport
        while not self._stop.is_set():
            try:
                transport.wait(SERVE_POLL)
                while (message := transport.receive()) is not None:
                    self._answer(message)
            except RingtrainError as exc:
                log.warning("status server stopped: %s", exc)
                return

    def _answer(self, message: Any) -> None:
        transport = self._transport
        sender = f"{message.origin}@{message.peer_address or '?'}"
        try:
            request = decode_request([bytes(f) for f in message.frames], sender)
            if self._key is not None:
                if message.tag != message.user or not hmac.compare_digest(
                        request["proof"].encode(),
                        status_proof(self._key, message.user).encode()):
                    raise ProtocolError("proof", "HMAC of the job key", "a wrong proof", sender)
        except ProtocolError as exc:
            self.refused += 1
            if self.refused <= 5:
                log.warning("status request refused: %s", exc)
            return
        if request["op"] == "clock":
            reply: dict[str, Any] = {"ok": True, "time": time.time()}
        else:
            try:
                reply = {"ok": True, **self._status()}
            except Exception as exc:  # noqa: BLE001 - a status bug must not kill the server
                log.exception("status failed")
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        if self._key is not None:
            transport.admitted[message.origin] = message.user
        try:
            transport.reply(message.origin, [MAGIC, json.dumps(reply, default=str).encode()])
        finally:
            transport.admitted.pop(message.origin, None)

    def close(self) -> None:
        """Stop answering and close the socket."""
        self._stop.set()
        self._thread.join(2 * SERVE_POLL + 1.0)
        self._transport.close(linger=0)


def query(endpoints: Sequence[str], key: JobKey | None, timeout: float, op: str = "status",
          settings: Settings | None = None) -> dict[str, dict[str, Any] | None]:
    """Ask every status endpoint at once; each answer, or None where none came within
    ``timeout`` seconds (the node is stopped, unreachable, or holds another key).

    Returns:
        endpoint -> the reply (with ``"rtt"``, the round trip in seconds, and
        ``"received"``, our ``time.time()`` when it came), or None.
    """
    replies: dict[str, dict[str, Any] | None] = {e: None for e in endpoints}
    if not endpoints:
        return replies
    client = Transport(f"status-client-{time.monotonic_ns() % 10**9}", "127.0.0.1:0",
                       settings or Settings(), key)
    try:
        proof = status_proof(key, client.public_key.decode() if key else "")
        request = [MAGIC, json.dumps({"op": op, "proof": proof}).encode()]
        sent_at: dict[str, float] = {}
        for endpoint in endpoints:
            client.connect(endpoint, endpoint)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(r is None for r in replies.values()):
            for endpoint in endpoints:
                if endpoint not in sent_at and client.try_send(endpoint, request):
                    sent_at[endpoint] = time.monotonic()
            client.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            while (message := client.receive()) is not None:
                endpoint = message.origin
                if not message.on_link or endpoint not in replies or endpoint not in sent_at:
                    continue
                reply = _decode_reply([bytes(f) for f in message.frames])
                if reply is not None:
                    reply["rtt"] = time.monotonic() - sent_at[endpoint]
                    reply["received"] = time.time()
                    replies[endpoint] = reply
    finally:
        client.close(linger=0)
    return replies


def _decode_reply(frames: list[bytes]) -> dict[str, Any] | None:
    if len(frames) != 2 or frames[0] != MAGIC:
        return None
    try:
        reply = json.loads(frames[1].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return reply if isinstance(reply, dict) else None
