"""Settings with finite defaults; the one place that reads ``RINGTRAIN_*`` environment variables.

Every timeout is in seconds; every default is finite, so no wait in ringtrain is unbounded.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import ConfigError

ENV_PREFIX = "RINGTRAIN_"
OFF_AT_ZERO = ("direct_bytes", "shm_lane_bytes", "link_probe_bytes",
               "spin_seconds")  # settings 0 turns off


@dataclass(frozen=True)
class Settings:
    """Tunables of a node. Construct with keywords, or :meth:`from_env` for the defaults plus
    any ``RINGTRAIN_<FIELD>`` variables (e.g. ``RINGTRAIN_SEGMENT_BYTES=524288``)."""

    segment_bytes: int = 1 << 20
    """Largest payload of one message. Gloo uses 1 MiB; zmq slows down past 4 MiB here."""
    queue_bytes: int = 8 << 20
    """Bytes that may wait in each send or receive queue; turned into ZeroMQ high-water marks."""
    collective_timeout: float = 120.0
    """Hard cap on one collective, start to finish."""
    progress_timeout: float = 10.0
    """Cap on the wait for the next segment of a collective before the member holding it up
    is declared stalled. The wait actually allowed adapts to measured segment times, between
    ``progress_floor`` and this cap."""
    progress_floor: float = 2.0
    """Floor of the adaptive progress deadline."""
    heartbeat_interval: float = 0.25
    """How often nodes send membership heartbeats."""
    heartbeat_timeout: float = 2.0
    """A peer silent for this long is suspected dead; an idle TCP connection this long gets
    keepalive probes (closed after three unanswered)."""
    handshake_timeout: float = 5.0
    """Longest a connection may take to finish the ZMTP (and CURVE) handshake."""
    form_timeout: float = 60.0
    """Longest wait for the ring to form at start."""
    reform_timeout: float = 30.0
    """Longest wait for the ring to re-form after a failure, before reporting it."""
    settle: float = 0.5
    """Seconds the set of discovered nodes must stay unchanged before a first ring forms."""
    linger: float = 1.0
    """How long close() lets queued messages drain before dropping them."""
    max_stash_bytes: int = 1 << 30
    """Cap on data received ahead of the collective it belongs to."""
    direct_bytes: int = 16 * 1024
    """All-reduces up to this size take one round (each member sends its buffer to every
    other) instead of 2(N-1) ring hops; 0 always uses the ring. Members must agree."""
    shm_lane_bytes: int = 8 << 20
    """Bytes of the shared-memory lane a node writes to a successor on the same host (same
    user and network namespace, Linux), instead of sending segments over TCP; 0 turns shared
    memory off (``RINGTRAIN_SHM_LANE_BYTES=0``)."""
    link_probe_bytes: int = 0
    """Bytes each member streams to every other member when a view of three or more is
    installed, to measure link rates and order the ring so that its slowest link is as fast
    as the links allow (``RINGTRAIN_LINK_PROBE_BYTES=2097152``); 0 keeps the ring in sorted
    id order. Members must agree."""
    spin_seconds: float = 300e-6
    """How long a thread that expects its turn within microseconds yields the core and looks
    again before it sleeps: the engine waiting for the next collective, the caller for its
    result, a collective for data from peers on this host. A sleep and its wake-up
    (two context switches; on a VM, an interrupt between cores) cost more than that: with
    it, a 4 KiB all-reduce of 4 local nodes on 2 cores took about half the time. Costs at
    most this much CPU per wait; 0 always sleeps."""
    dns_interval: float = 5.0
    """Longest wait between two lookups of the DNS name that lists the peers
    (``--peers-dns``); a shorter TTL in the answer shortens it, down to 1 s."""
    slow_link_fraction: float = 0.5
    """With links measured (``link_probe_bytes``), a ring link slower than this fraction of
    the ring's fastest link is slow, and a compressed all-reduce encodes only over slow
    links (none slow: it runs exact). Above 1 every link counts as slow. Members must
    agree."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not (value > 0 or (field.name in OFF_AT_ZERO and value == 0)):
                raise ConfigError(f"setting {field.name} must be positive, got {value!r}")
        if self.segment_bytes % 8:
            raise ConfigError(f"setting segment_bytes must be a multiple of 8, "
                              f"got {self.segment_bytes}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Defaults, then ``RINGTRAIN_*`` variables, then ``overrides``."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + field.name.upper())
            if raw is None:
                continue
            caster = int if field.type in ("int", int) else float
            try:
                values[field.name] = caster(raw)
            except ValueError:
                raise ConfigError(f"{ENV_PREFIX}{field.name.upper()}={raw!r} is not "
                                  f"{'an integer' if caster is int else 'a number'}") from None
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


def env(name: str, default: str | None = None) -> str | None:
    """The value of ``RINGTRAIN_<NAME>``, or ``default``."""
    return os.environ.get(ENV_PREFIX + name, default)


@dataclass(frozen=True)
class LaunchOptions:
    """How ``ringtrain node`` starts a node, and how a script it runs finds its node again
    (:func:`ringtrain.join`): flags on the command line, ``RINGTRAIN_*`` variables in the
    script's environment."""

    job: str = "default"
    peers: tuple[str, ...] = ()
    port: int = 7077
    interface: str | None = None
    min_nodes: int = 2
    max_nodes: int = 64
    discovery: bool = True
    insecure: bool = False
    node_id: str | None = None
    peers_dns: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LaunchOptions:
        """Options from ``RINGTRAIN_JOB``, ``RINGTRAIN_PEERS`` (comma-separated host:port),
        ``RINGTRAIN_PORT``, ``RINGTRAIN_INTERFACE``, ``RINGTRAIN_MIN_NODES``,
        ``RINGTRAIN_MAX_NODES``, ``RINGTRAIN_DISCOVERY`` (0/1), ``RINGTRAIN_INSECURE`` (0/1),
        ``RINGTRAIN_NODE_ID``, ``RINGTRAIN_PEERS_DNS`` (a DNS name listing the peers);
        defaults for the rest."""
        environ = os.environ if environ is None else environ
        get = lambda name: environ.get(ENV_PREFIX + name)  # noqa: E731
        defaults = cls()
        try:
            return cls(
                job=get("JOB") or defaults.job,
                peers=tuple(p.strip() for p in (get("PEERS") or "").split(",") if p.strip()),
                port=int(get("PORT") or defaults.port),
                interface=get("INTERFACE") or None,
                min_nodes=int(get("MIN_NODES") or defaults.min_nodes),
                max_nodes=int(get("MAX_NODES") or defaults.max_nodes),
                discovery=_flag(get("DISCOVERY"), defaults.discovery),
                insecure=_flag(get("INSECURE"), defaults.insecure),
                node_id=get("NODE_ID") or None,
                peers_dns=get("PEERS_DNS") or None)
        except ValueError as exc:
            raise ConfigError(f"bad RINGTRAIN_* variable: {exc}") from None

    def to_env(self) -> dict[str, str]:
        """The variables that make :meth:`from_env` return these options."""
        values = {"JOB": self.job, "PEERS": ",".join(self.peers), "PORT": str(self.port),
                  "INTERFACE": self.interface or "", "MIN_NODES": str(self.min_nodes),
                  "MAX_NODES": str(self.max_nodes), "DISCOVERY": str(int(self.discovery)),
                  "INSECURE": str(int(self.insecure)), "NODE_ID": self.node_id or "",
                  "PEERS_DNS": self.peers_dns or ""}
        return {ENV_PREFIX + name: value for name, value in values.items()}


def _flag(raw: str | None, default: bool) -> bool:
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{raw!r} is not 0 or 1")
