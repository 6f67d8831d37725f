"""The device ledger of one job, as one member knows it: which devices it has admitted, which
node names they hold, which are revoked. Kept in a file (so it survives restarts) and spread
to the other members (``LEDGER`` messages, see ``node.gate``).

Entries (one per line, in ``<device dir>/<job fingerprint>.ledger``, mode 0600):

    known FP            a device this member admitted (or was told of before the job closed)
    bind NAME FP        node name NAME is held by device FP (names chosen by hand)
    revoke FP           device FP is expelled: refused from now on, by every member
    admit FP            device FP may join although the job is closed

Rules (:meth:`Ledger.check`):

* a revoked device is refused (its key check refuses it already at the handshake);
* a derived node id (``name-fingerprint``) is held by its key only; a chosen name by the
  first device admitted under it: another device claiming it is refused, naming both;
* once any device has been revoked, the job is *closed*: a device this member never knew
  is refused unless a member ran ``ringtrain revoke --admit FP``. Otherwise a thief holding a
  stolen device's copy of the job key would come back as a new device; with it, expelling a
  device needs no re-keying of the others.

Revocations and admissions spread: every member adds those it is told of to its own file,
and never forgets one (there is no un-revoke short of a new job key). The job key is the
admin credential: any member can revoke any device. Bounded: at most ``MAX_ENTRIES`` of
each kind.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .identity import derives_from, device_fingerprint, looks_derived
from .security import write_private_file

MAX_ENTRIES = 4096
_FINGERPRINT = re.compile(r"[a-z2-7]{16}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def is_fingerprint(text: object) -> bool:
    """Whether ``text`` has the form of a device fingerprint."""
    return isinstance(text, str) and _FINGERPRINT.fullmatch(text) is not None


@dataclass
class Ledger:
    """One member's device ledger of one job (see the module docstring).

    Args:
        path: its file, or None to keep it in memory only.
    """

    path: Path | None = None
    known: set[str] = field(default_factory=set)
    bindings: dict[str, str] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    admitted: set[str] = field(default_factory=set)
    _stamp: tuple[int, int] | None = None  # (mtime_ns, size) of the file as last read

    @classmethod
    def open(cls, path: Path | None) -> Ledger:
        """The ledger in ``path`` (empty if there is no file yet)."""
        ledger = cls(path)
        ledger.reload()
        return ledger

    @property
    def closed(self) -> bool:
        """Whether devices this member does not know are refused (after a revocation)."""
        return bool(self.revoked)

    def check(self, node_id: str, public_key: str) -> str | None:
        """Admit device ``public_key`` under ``node_id``, or say why not (a refusal to
        name to the peer and in the log). Records what it admits."""
        fp = device_fingerprint(public_key)
        if fp in self.revoked:
            return f"device {fp} ({node_id}) was revoked from this job"
        derived = derives_from(node_id, public_key)
        if not derived:
            if looks_derived(node_id):
                return (f"node id {node_id} belongs to another device key (it ends with "
                        f"another device's fingerprint; this key's is {fp})")
            holder = self.bindings.get(node_id)
            if holder is not None and holder != fp:
                return (f"node id {node_id} belongs to device {holder}; device {fp} claims "
                        f"it (a node named by hand keeps its name on its first device)")
        if self.closed and fp not in self.known and fp not in self.admitted:
            return (f"device {fp} ({node_id}) is new and this job is closed to new devices "
                    f"since a device was revoked: on a member run `ringtrain revoke --admit "
                    f"{fp}` to let it in")
        changed = fp not in self.known
        self.known.add(fp)
        if not derived and node_id not in self.bindings and len(self.bindings) < MAX_ENTRIES:
            self.bindings[node_id] = fp
            changed = True
        if changed:
            self._trim()
            self.save()
        return None

    def revoke(self, fingerprint: str) -> bool:
        """Expel a device; True if it was not revoked yet."""
        if fingerprint in self.revoked or len(self.revoked) >= MAX_ENTRIES:
            return False
        self.revoked.add(fingerprint)
        self.admitted.discard(fingerprint)
        self.save()
        return True

    def admit(self, fingerprint: str) -> bool:
        """Let a new device join a closed job; True if that is news."""
        if fingerprint in self.admitted or fingerprint in self.revoked \
                or len(self.admitted) >= MAX_ENTRIES:
            return False
        self.admitted.add(fingerprint)
        self.save()
        return True

    def merge(self, revoked: list[str], admitted: list[str]) -> set[str]:
        """What a member told us: add its revocations and admissions. Returns the devices
        revoked by this news."""
        news = {fp for fp in revoked[:MAX_ENTRIES] if is_fingerprint(fp)} - self.revoked
        news = set(sorted(news)[: MAX_ENTRIES - len(self.revoked)])
        grants = {fp for fp in admitted[:MAX_ENTRIES] if is_fingerprint(fp)} \
            - self.admitted - self.revoked - news
        grants = set(sorted(grants)[: MAX_ENTRIES - len(self.admitted)])
        if news or grants:
            self.revoked |= news
            self.admitted = (self.admitted | grants) - self.revoked
            self.save()
        return news

    def gossip(self) -> dict[str, list[str]]:
        """What to tell the other members."""
        return {"revoked": sorted(self.revoked), "admitted": sorted(self.admitted)}

    # the file --------------------------------------------------------------------------------

    def changed_on_disk(self) -> bool:
        """Whether the file changed since it was last read or written (e.g. by
        ``ringtrain revoke`` on this device)."""
        return self.path is not None and _stamp(self.path) != self._stamp

    def reload(self) -> set[str]:
        """Read the file again, keeping what is in memory too. Returns newly revoked
        devices."""
        if self.path is None:
            return set()
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            self._stamp = None
            return set()
        except OSError as exc:
            raise ConfigError(f"cannot read the device ledger {self.path}: "
                              f"{exc.strerror}") from None
        with os.fdopen(fd) as handle:
            lines = handle.read(4 * MAX_ENTRIES * 64).splitlines()
            self._stamp = _stamp(self.path)
        before = set(self.revoked)
        for line in lines:
            parts = line.split()
            if len(parts) == 2 and is_fingerprint(parts[1]):
                table = {"known": self.known, "revoke": self.revoked,
                         "admit": self.admitted}.get(parts[0])
                if table is not None:
                    table.add(parts[1])
            elif len(parts) == 3 and parts[0] == "bind" and _NAME.fullmatch(parts[1]) \
                    and is_fingerprint(parts[2]):
                self.bindings.setdefault(parts[1], parts[2])
        self.admitted -= self.revoked
        self._trim()
        return self.revoked - before

    def save(self) -> None:
        """Write the ledger (a new file that replaces the old one)."""
        if self.path is None:
            return
        lines = ["# ringtrain device ledger of one job: known devices, names, revocations"]
        lines += [f"known {fp}" for fp in sorted(self.known)]
        lines += [f"bind {name} {fp}" for name, fp in sorted(self.bindings.items())]
        lines += [f"revoke {fp}" for fp in sorted(self.revoked)]
        lines += [f"admit {fp}" for fp in sorted(self.admitted)]
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private_file(self.path, "\n".join(lines) + "\n", overwrite=True)
        self._stamp = _stamp(self.path)

    def _trim(self) -> None:
        while len(self.known) > MAX_ENTRIES:
            self.known.discard(min(self.known))


def ledger_file(directory: Path, job_fingerprint: str) -> Path:
    """The ledger of the job whose key has this fingerprint, among a device's files."""
    return directory / f"{job_fingerprint}.ledger"


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size
