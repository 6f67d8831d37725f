"""What a node tells the LAN about itself: the :class:`Advert` and its TXT properties, every
field checked (pure: no sockets, no zeroconf).

An advert is only a *candidate*: mDNS has no authentication, so any device on the LAN can
claim anything. Identity is proven later, by the key handshake; here received records are only
checked to be well formed and bounded.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re

from ..comm.identity import derives_from, is_public_key, looks_derived
from ..errors import ConfigError

MAX_ADDRESSES = 16
TXT_KEYS = ("job", "id", "proto", "fp", "gen", "state")

_NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,29}")  # job-node_id fits 63 bytes
_JOB_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
_STATE_RE = re.compile(r"[a-z][a-z_]{0,15}")
_FINGERPRINT_RE = re.compile(r"[\x21-\x7e]{0,64}")  # printable ASCII, no spaces
_UINT_RE = re.compile(r"[0-9]{1,19}")
_MAX_GENERATION = 2**63 - 1
_MAX_PROTOCOL = 65535


@dataclasses.dataclass(frozen=True)
class Advert:
    """What one node tells the LAN about itself.

    Attributes:
        node_id: id of the node, unique within its job, 1-30 characters ``[A-Za-z0-9_-]``.
        job: the training job it belongs to, 1-32 characters ``[A-Za-z0-9_-]``.
        addresses: IPv4 addresses (text) where its transport listens.
        port: TCP port of its transport.
        protocol: ringtrain wire-protocol version.
        key_fingerprint: fingerprint of its public key, or "" when it has none.
        generation: the membership generation it is in.
        state: its lifecycle state, e.g. "forming" or "training".
        instance_name: the full DNS-SD service name; "" until announced.
        device_key: its device's public key (Z85; TXT ``dk``), which it listens with, or ""
            (none given). A derived node id must end with this key's fingerprint.

    Raises:
        ConfigError: a field is out of range or malformed.
    """

    node_id: str
    job: str
    addresses: tuple[str, ...]
    port: int
    protocol: int
    key_fingerprint: str
    generation: int
    state: str
    instance_name: str = ""
    device_key: str = ""

    def __post_init__(self) -> None:
        _check_text("node_id", self.node_id, _NODE_ID_RE)
        _check_text("job", self.job, _JOB_RE)
        _check_text("key_fingerprint", self.key_fingerprint, _FINGERPRINT_RE)
        _check_text("state", self.state, _STATE_RE)
        _check_int("port", self.port, 1, 65535)
        _check_int("protocol", self.protocol, 0, _MAX_PROTOCOL)
        _check_int("generation", self.generation, 0, _MAX_GENERATION)
        if not isinstance(self.addresses, tuple) or not 1 <= len(self.addresses) <= MAX_ADDRESSES:
            raise ConfigError(
                f"addresses must be a tuple of 1 to {MAX_ADDRESSES} IPv4 addresses, "
                f"got {self.addresses!r}"
            )
        for address in self.addresses:
            _check_ipv4(address)
        if not isinstance(self.instance_name, str) or len(self.instance_name) > 255:
            raise ConfigError(f"instance_name must be text of at most 255 characters, "
                              f"got {self.instance_name!r}")
        if self.device_key and not is_public_key(self.device_key):
            raise ConfigError(f"device_key must be a 40-character Z85 key, got "
                              f"{self.device_key[:50]!r}")
        if self.device_key and looks_derived(self.node_id) and \
                not derives_from(self.node_id, self.device_key):
            raise ConfigError(f"node id {self.node_id!r} does not derive from its device key")

    def txt(self) -> dict[str, str]:
        """The TXT properties that carry this advert."""
        return {
            "job": self.job,
            "id": self.node_id,
            "proto": str(self.protocol),
            "fp": self.key_fingerprint,
            "gen": str(self.generation),
            "state": self.state,
        } | ({"dk": self.device_key} if self.device_key else {})


def _check_text(name: str, value: object, pattern: re.Pattern[str]) -> None:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ConfigError(f"{name} must match {pattern.pattern!r}, got {value!r}")


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def _check_ipv4(address: object) -> None:
    try:
        parsed = ipaddress.IPv4Address(address)
    except (ipaddress.AddressValueError, TypeError, ValueError) as exc:
        raise ConfigError(f"not an IPv4 address: {address!r}") from exc
    if parsed.is_unspecified or parsed.is_multicast or parsed == ipaddress.IPv4Address(
        "255.255.255.255"
    ):
        raise ConfigError(f"not a unicast IPv4 address: {address!r}")


def _parse_uint(name: str, raw: str) -> int:
    if not _UINT_RE.fullmatch(raw):
        raise ConfigError(f"{name} must be decimal digits, got {raw!r}")
    return int(raw)


def check_job(job: object) -> None:
    """Raise ConfigError unless ``job`` is a well-formed job name."""
    _check_text("job", job, _JOB_RE)


def advert_from_txt(txt: dict[str, str], port: int | None, addresses: tuple[str, ...],
                    instance_name: str) -> Advert:
    """Build an :class:`Advert` from a service's decoded TXT properties, SRV port and
    addresses, validating every field.

    Raises:
        ConfigError: a field is missing, too long or malformed.
    """
    missing = [k for k in TXT_KEYS if k not in txt]
    if missing:
        raise ConfigError(f"TXT record lacks {', '.join(missing)}")
    if port is None:
        raise ConfigError("no SRV port")
    return Advert(
        node_id=txt["id"],
        job=txt["job"],
        addresses=addresses[:MAX_ADDRESSES],
        port=port,
        protocol=_parse_uint("proto", txt["proto"]),
        key_fingerprint=txt["fp"],
        generation=_parse_uint("gen", txt["gen"]),
        state=txt["state"],
        instance_name=instance_name,
        device_key=txt.get("dk", ""),
    )
