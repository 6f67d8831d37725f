"""CURVE key pairs as zmq takes them (Z85): the server pair a job-keyed server (the status
server) listens with, derived from the job key; the pair a node listens and dials with, its
device's; a fresh pair for a new device.
"""

from __future__ import annotations

import zmq
import zmq.utils.z85

from ..errors import SecurityError
from .identity import DeviceKey
from .security import JobKey


def curve_keypair(key: JobKey, purpose: str) -> tuple[bytes, bytes]:
    """The CURVE (public, secret) pair, Z85-encoded, derived from ``key`` for ``purpose``."""
    secret = zmq.utils.z85.encode(key.derive(purpose))
    return zmq.curve_public(secret), secret


def new_curve_keypair() -> tuple[str, str]:
    """A fresh CURVE key pair, (public, secret) as Z85 text: a new device's key."""
    public, secret = zmq.curve_keypair()
    return public.decode(), secret.decode()



def dialling_keypair(device: DeviceKey | None) -> tuple[bytes, bytes]:
    """The (public, secret) pair a node listens with and every link it dials authenticates
    with: the device's own key, or a random pair for this process if None.

    Raises:
        SecurityError: the device key's halves do not match.
    """
    if device is None:
        return zmq.curve_keypair()
    public, secret = device.public.encode(), device.secret.encode()
    if zmq.curve_public(secret) != public:
        raise SecurityError("the device key's public half does not match its secret half: "
                            "delete the device key file")
    return public, secret
