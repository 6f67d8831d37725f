"""Endpoints as text: normalising ``host:port``, checking an endpoint a peer gave us, telling
loopback apart. Pure (no sockets): what the transport, membership, discovery and the commands
that take addresses agree on.
"""

from __future__ import annotations

import ipaddress
import re

from ..errors import ConfigError

MAX_ENDPOINT_LENGTH = 64
_FINGERPRINT = re.compile(r"[a-z2-7]{16}")  # a device fingerprint (see ``identity``)


def split_pin(text: str) -> tuple[str, str]:
    """``FINGERPRINT@address`` -> (the device fingerprint, lowercase; address); an address
    without one -> ("", address). A pin says which device must listen there.

    Raises:
        ConfigError: the part before ``@`` is not a device fingerprint (16 base32 digits).
    """
    pin, at, address = text.partition("@") if isinstance(text, str) else ("", "", text)
    if not at:
        return "", text
    if not _FINGERPRINT.fullmatch(pin.lower()):
        raise ConfigError(f"{text[:80]!r}: before @ goes a device fingerprint (16 letters a-z "
                          f"and digits 2-7, as in the node id laptop-k3j5h2g7f6d5s4a3)")
    return pin.lower(), address


def normalize_endpoint(address: str) -> str:
    """``host:port`` or ``tcp://host:port`` → ``tcp://host:port``; other schemes pass through."""
    if "://" in address:
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"address {address!r} is not host:port")
    return f"tcp://{host}:{port}"


def peer_endpoint(text: object, allow_unspecified: bool = False) -> str:
    """An endpoint a peer (or an advert) gave us, checked: ``tcp://IP:PORT`` with a literal
    unicast IPv4 address (or a bracketed IPv6 one) and a port in 1..65535; ``IP:PORT`` is
    taken as tcp. Anything else (other schemes, host names, which would make us resolve
    names a stranger picked, bad ports) is refused. ``allow_unspecified`` lets 0.0.0.0 (or
    ``[::]``) through, for a peer that listens on every address and whose host part the
    caller replaces by the address it saw the peer at.

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
    if address.is_multicast or (address.is_unspecified and not allow_unspecified) \
            or str(address) == "255.255.255.255":
        raise ConfigError(f"endpoint {text!r} is not a unicast address")
    return f"tcp://{host}:{int(port)}"


def named_host(endpoint: str) -> tuple[str, int] | None:
    """``(host, port)`` when the ``tcp://`` ``endpoint`` names its host (``tcp://node1:7077``)
    rather than giving an IP address; None otherwise."""
    if not endpoint.startswith("tcp://"):
        return None
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return (host, int(port)) if host not in ("*", "") and port.isdigit() else None
    return None


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

