"""How far our key handshakes with a peer got, seen from the dialling side: a watch on a link
we dialled (the peer refused our key, or its key check refused us) and a one-off probe of an
endpoint (``ringtrain doctor``: "why can't I see my peer").
"""

from __future__ import annotations

import struct
import time

import zmq

from ..errors import TransportError
from .door import ask_once
from .endpoints import normalize_endpoint
from .security import JobKey

# a dialled connection that fails its key handshake this soon after it connected was refused
# (the server could not open our CURVE HELLO: it lacks the key we dialled), not timed out
REFUSED_WITHIN_S = 1.0


def handshake_probe(endpoint: str, key: JobKey | None, timeout: float) -> str:
    """Dial ``endpoint`` as a node of ``key``'s job would (ask its door for its device key,
    then dial that key), send nothing, and say how far it got: ``"ok"`` (the ZMTP and CURVE
    handshake completed: the peer holds the job key), ``"closed"`` (the connection was
    refused: nothing listens there), ``"refused"`` (the door refused our ask, or TCP
    connected and the handshake failed: the peer holds another job key or is not a ringtrain
    node), or ``"timeout"`` (no answer within ``timeout`` seconds: a firewall drops the
    packets, TCP or the door's UDP, the host is down, or the process is stopped or far too
    busy)."""
    context = zmq.Context()
    try:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 200)
        sock.setsockopt(zmq.HANDSHAKE_IVL, max(1, int(timeout * 1000)))
        if key is not None:
            public, secret = zmq.curve_keypair()
            reply = ask_once(normalize_endpoint(endpoint), key, public, timeout)
            if isinstance(reply, str):
                return reply
            if not reply.key:
                return "refused"
            sock.curve_serverkey = reply.key.encode()
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


class HandshakeWatch:
    """The key handshakes of one link we dialled, from a monitor on its socket: a probe of a
    node we have not met, whose refusals say it does not hold the device key we dialled or
    refuses our device.

    Read it often (every turn or so): libzmq blocks its I/O thread once a monitor's queue is
    full.

    Args:
        sock: the link's DEALER socket; watched until :meth:`close`.
    """

    def __init__(self, sock: zmq.Socket):
        self._sock = sock
        self._monitor = sock.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self._connected_at = 0.0
        self.failed_fast = 0  # failed within REFUSED_WITHIN_S of connecting: another server key
        self.refused_by_check = 0  # refused by the peer's key check (e.g. a revoked device)

    def read(self) -> tuple[int, int] | None:
        """Take in the events queued so far, without blocking.

        Returns:
            (failed_fast, refused_by_check) so far, or None if the monitor could not be read.
        """
        try:
            while self._monitor.poll(0):
                frames = self._monitor.recv_multipart(zmq.NOBLOCK)
                if len(frames[0]) < 6:
                    continue
                event, _ = struct.unpack("=hi", frames[0][:6])
                now = time.monotonic()
                if event == zmq.EVENT_CONNECTED:
                    self._connected_at = now
                elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    self.refused_by_check += 1
                elif self._connected_at and now - self._connected_at < REFUSED_WITHIN_S:
                    self.failed_fast += 1
        except zmq.ZMQError:
            return None
        return self.failed_fast, self.refused_by_check

    def close(self) -> None:
        """Stop watching. First the events stop: libzmq's I/O thread blocks, and with it every
        socket of the context, on a monitor whose reader is gone (seen here)."""
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)
