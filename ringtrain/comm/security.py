"""Job keys: who may join a ring.

A job key is 32 random bytes shared by every device of one job (``ringtrain keygen`` writes one
to a file). It never travels: nodes prove they hold it without sending it (see ``transport``
and ``membership``):

* the CURVE *server* keypair, the same on every node, is derived from the job key: a node that
  dials a peer only completes the handshake if that peer holds the job key, so a spoofed
  advert costs at most a failed connection;
* each node dials with its own random CURVE keypair, and its first message (HELLO) carries an
  HMAC under the job key of (job, node id, that public key). A listener admits the key for that
  id only if the proof holds and CURVE proved the dialler holds the key's secret: only a holder
  of the job key can speak, and only under its own id. No member can speak for another.

Keys are read from a file or an environment variable, never from the command line (where
``ps`` would show them to every user of the machine).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..config import env
from ..errors import ConfigError, SecurityError

KEY_BYTES = 32
KEY_FILE_HEADER = "# ringtrain job key: anyone holding this file can join the job's ring\n"


@dataclass(frozen=True)
class JobKey:
    """The shared secret of one job. ``repr`` never shows it."""

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_BYTES:
            raise SecurityError(f"a job key has {KEY_BYTES} bytes, got {len(self.secret)}")

    @classmethod
    def generate(cls) -> JobKey:
        """A new random key."""
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def from_hex(cls, text: str) -> JobKey:
        """A key from its 64 hex digits."""
        try:
            return cls(bytes.fromhex(text.strip()))
        except ValueError:
            raise SecurityError("a job key is 64 hex digits") from None

    def hex(self) -> str:
        """The key as 64 hex digits (secret: keep it out of logs and command lines)."""
        return self.secret.hex()

    def derive(self, purpose: str) -> bytes:
        """32 bytes derived from the key for one purpose (e.g. "server", "client:<node id>")."""
        return hmac.new(self.secret, purpose.encode(), hashlib.sha256).digest()

    @property
    def fingerprint(self) -> str:
        """A short public name of the key, safe to advertise: 16 hex digits."""
        return self.derive("fingerprint")[:8].hex()


def write_key_file(path: str | os.PathLike, key: JobKey, overwrite: bool = False) -> Path:
    """Write ``key`` to ``path`` readable by its owner only."""
    return write_private_file(path, KEY_FILE_HEADER + key.hex() + "\n", overwrite)


def write_private_file(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    """Create ``path`` holding ``text``, mode 0600, never through a symlink planted there.

    The file is created with ``O_EXCL | O_NOFOLLOW``: an existing file (or a symlink to
    somewhere else, e.g. another user's file) is never written through. With ``overwrite``
    the text goes to a new file beside it that then replaces ``path`` (``rename`` replaces a
    symlink itself, not its target), so a reader never sees half a file either.

    Raises:
        ConfigError: ``path`` exists and ``overwrite`` is off, or it cannot be written.
    """
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise ConfigError(f"{path} exists; pass --force to overwrite it")
    target = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp") if overwrite else path
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(target, flags, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists; pass --force to overwrite it") from None
    except OSError as exc:
        raise ConfigError(f"cannot write key file {path}: {exc.strerror}") from None
    try:
        if os.name == "posix":
            os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if target != path:
            os.replace(target, path)
    except OSError as exc:
        target.unlink(missing_ok=True)
        raise ConfigError(f"cannot write key file {path}: {exc.strerror}") from None
    return path


def read_key_file(path: str | os.PathLike) -> JobKey:
    """Read a key written by :func:`write_key_file` (comment lines are ignored)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc.strerror}") from None
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecurityError(f"key file {path} is readable by other users; "
                            f"run: chmod 600 {path}")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if len(lines) != 1:
        raise SecurityError(f"key file {path} must hold one line of 64 hex digits")
    return JobKey.from_hex(lines[0])


def key_from_environment() -> JobKey | None:
    """The key named by ``RINGTRAIN_KEY_FILE`` (a path) or given in ``RINGTRAIN_KEY`` (hex)."""
    path = env("KEY_FILE")
    if path:
        return read_key_file(path)
    text = env("KEY")
    return JobKey.from_hex(text) if text else None
