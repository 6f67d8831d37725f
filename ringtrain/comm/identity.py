"""Device identity: each device's own key pair, the node id it derives, and how long it lives.

The job key (``security``) says who may join a job; a *device key* says which device is
speaking. Every device makes its own CURVE key pair on first start and keeps it (mode 0600,
created with ``O_EXCL | O_NOFOLLOW``) in ``RINGTRAIN_DEVICE_DIR``, by default
``$XDG_CONFIG_HOME/ringtrain/devices`` (``~/.config/ringtrain/devices``), one file per node
name, so several nodes on one host (a demo, a test) are several devices. Nothing else is
needed: one job key copied to every device is still all a user sets up.

* Every link a device dials authenticates with its device key (CURVE proves the dialler holds
  the secret), and its HELLO proves the job key for that device key (``membership``): a
  job key holder admits its device keys.
* The *device fingerprint* is 16 base32 digits of SHA-256 of the public key (80 bits: making
  a key with a given fingerprint takes about 2^80 tries).
* A node's default id derives from it: ``<name>-<fingerprint>``. Nobody can claim such an id
  without the device's secret key. A node id chosen by hand (``--node-id NAME``) is bound to
  the first device key admitted under it, and every member keeps that binding in its ledger
  (``ledger``), so another device claiming it later is refused, also after restarts.
* The device file is locked while a node uses it: a second node of the same name on the same
  host is told to pick another name instead of becoming the same device twice.
* Each start counts up the device's *boot counter* (a file beside the key): a node's
  incarnation. A restarted node is recognised by its higher incarnation however the wall
  clock moved.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import env
from ..errors import ConfigError, SecurityError
from .security import write_private_file

FINGERPRINT_CHARS = 16  # base32 digits: 80 bits
MAX_NAME = 13  # a derived id, name-fingerprint, must fit a node id (30 characters)
DEVICE_FILE_HEADER = "# ringtrain device key: this device's identity; never copy it elsewhere\n"
_Z85_KEY = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
_DERIVED = re.compile(rf"(.+)-([a-z2-7]{{{FINGERPRINT_CHARS}}})")
_NAME = re.compile(r"[^A-Za-z0-9_-]")


def device_fingerprint(public_key: str) -> str:
    """The fingerprint of a device's public key (Z85 text): 16 lowercase base32 digits."""
    digest = hashlib.sha256(public_key.encode("ascii", "replace")).digest()
    return base64.b32encode(digest[:10]).decode().lower()


def is_public_key(text: str) -> bool:
    """Whether ``text`` has the form of a CURVE public key in Z85 (40 characters)."""
    return isinstance(text, str) and _Z85_KEY.fullmatch(text) is not None


def derived_node_id(name: str, public_key: str) -> str:
    """The node id a device with this public key takes: ``<name>-<fingerprint>``."""
    name = _NAME.sub("-", name).strip("-_")[:MAX_NAME].strip("-_") or "node"
    return f"{name}-{device_fingerprint(public_key)}"


def derives_from(node_id: str, public_key: str) -> bool:
    """Whether ``node_id`` is derived from this key (ends with its fingerprint)."""
    match = _DERIVED.fullmatch(node_id)
    return match is not None and match.group(2) == device_fingerprint(public_key)


def looks_derived(node_id: str) -> bool:
    """Whether ``node_id`` has the form of a derived id (then only its key may hold it)."""
    return _DERIVED.fullmatch(node_id) is not None


@dataclass(frozen=True)
class DeviceKey:
    """One device's CURVE key pair (Z85 text). ``repr`` never shows the secret."""

    public: str
    secret: str = field(repr=False)

    def __post_init__(self) -> None:
        if not (_Z85_KEY.fullmatch(self.public) and _Z85_KEY.fullmatch(self.secret)):
            raise SecurityError("a device key is two 40-character Z85 keys")

    @property
    def fingerprint(self) -> str:
        """The device fingerprint (see :func:`device_fingerprint`)."""
        return device_fingerprint(self.public)


def device_dir() -> Path:
    """Where device keys live: ``RINGTRAIN_DEVICE_DIR``, else the user's config directory."""
    chosen = env("DEVICE_DIR")
    if chosen:
        return Path(chosen)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "ringtrain" / "devices"


def device_file(name: str, directory: Path | None = None) -> Path:
    """The key file of the device a node named ``name`` is."""
    clean = _NAME.sub("-", name).strip("-_") or "node"
    return (directory or device_dir()) / f"{clean}.key"


@dataclass
class DeviceIdentity:
    """A device key in use by this process: its key, its file, the lock on it, its boot.

    Use :func:`open_device`; :meth:`close` releases the lock."""

    key: DeviceKey
    path: Path | None
    incarnation: int
    _lock_fd: int | None = field(default=None, repr=False)

    @property
    def fingerprint(self) -> str:
        """The device fingerprint."""
        return self.key.fingerprint

    def close(self) -> None:
        """Release the device file (another process may use it from now on)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def open_device(name: str, new_keypair: Callable[[], tuple[str, str]],
                directory: Path | None = None) -> DeviceIdentity:
    """The device identity of a node named ``name``: its key (made on first use with
    ``new_keypair() -> (public, secret)``), locked for this process, and its next boot.

    Raises:
        ConfigError: the file is in use by another node, unreadable or not writable.
        SecurityError: the file is malformed or readable by other users.
    """
    path = device_file(name, directory)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the device directory {path.parent}: "
                          f"{exc.strerror} (set RINGTRAIN_DEVICE_DIR)") from None
    if not path.exists() and not path.is_symlink():
        public, secret = new_keypair()
        try:
            write_private_file(path, f"{DEVICE_FILE_HEADER}public {public}\nsecret {secret}\n")
        except ConfigError:
            pass  # another process made it first: read theirs
    key = read_device_file(path)
    lock_fd = _lock(path)
    try:
        boots = path.with_suffix(".boots")
        incarnation = _read_count(boots) + 1
        write_private_file(boots, f"{incarnation}\n", overwrite=True)
    except BaseException:
        os.close(lock_fd)
        raise
    return DeviceIdentity(key, path, incarnation, lock_fd)


def ephemeral_device(new_keypair: Callable[[], tuple[str, str]]) -> DeviceIdentity:
    """A device key that lives as long as this process (nothing written): for tools and
    tests that need no identity across restarts."""
    public, secret = new_keypair()
    return DeviceIdentity(DeviceKey(public, secret), None, 1)


def read_device_file(path: Path) -> DeviceKey:
    """The key in a device file (``O_NOFOLLOW``: never a symlink planted there).

    Raises:
        ConfigError: it cannot be read. SecurityError: malformed, or readable by others.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ConfigError(f"cannot read device key {path}: {exc.strerror}") from None
    with os.fdopen(fd) as handle:
        mode = os.fstat(handle.fileno()).st_mode
        text = handle.read(4096)
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecurityError(f"device key {path} is readable by other users; "
                            f"run: chmod 600 {path}")
    fields = dict(line.split(" ", 1) for line in text.splitlines()
                  if line.strip() and not line.startswith("#") and " " in line)
    try:
        return DeviceKey(fields["public"].strip(), fields["secret"].strip())
    except (KeyError, SecurityError):
        raise SecurityError(f"device key {path} is malformed; delete it to make a new one "
                            f"(this device then joins as a new device)") from None


def _lock(path: Path) -> int:
    """Hold an exclusive lock on ``path`` for as long as the returned descriptor is open."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        import fcntl  # POSIX only
    except ImportError:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError(f"device key {path} is in use by another node on this host: give "
                          f"this node another name (--node-id)") from None
    return fd


def _read_count(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd) as handle:
        text = handle.read(64).strip()
    return int(text) if text.isdigit() else 0
