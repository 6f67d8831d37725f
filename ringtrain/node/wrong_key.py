"""Naming a wrong job key within seconds, on both sides.

A node started with another job key than its peers cannot complete a single handshake with
them, and nothing in the protocol can tell it so (they cannot even decrypt its HELLO). Two
pieces of evidence can, and this module weighs them:

* adverts: every node announces its job and its key's fingerprint over mDNS. An advert of
  our job under another fingerprint is a node holding another key (or a stranger claiming
  so: adverts are unauthenticated);
* doors (``comm.door``): every node listens with its own device key, and a dialler that knows
  only an address asks the door there first. A door that cannot verify our ask refuses it,
  naming its job key's fingerprint (unauthenticated: a stranger could send it); a door that
  answers as another device than the one pinned there (``FINGERPRINT@IP:PORT``) is not the
  peer we were told of;
* refused handshakes: a peer whose key check refuses our device key (e.g. it was revoked)
  says so in the handshake; one that drops our handshake at once does not hold the device
  key its door named.

Both sides log one line per other node: the healthy side keeps running (it has its ring);
the side that has linked no peer at all after ``settle`` seconds gives up with a
:class:`SecurityError` naming both fingerprints, so ``Node()`` raises within seconds and
``ringtrain node`` exits with code 2, instead of waiting for a ring that cannot form.

What a stranger can do with this: advertise our job under a made-up fingerprint, so that a
node which found no peer of its own key at all gives up at start. A node that has linked a
peer never gives up on this evidence.
"""

from __future__ import annotations

import logging
import threading

from ..errors import SecurityError

log = logging.getLogger(__name__)

MAX_FOREIGN = 64  # adverts under other fingerprints remembered (a hostile LAN can send many)
SETTLE_S = 2.0  # evidence must stand this long with no peer linked before we give up


def short(fingerprint: str) -> str:
    """A fingerprint as users see it in messages: its first 8 digits and an ellipsis."""
    return f"{fingerprint[:8]}…" if fingerprint else "(none)"


class WrongKeyDetector:
    """Collects the evidence of a key mismatch and decides when to give up (module docstring).

    Args:
        job: our job name.
        fingerprint: our job key's fingerprint.
        started: ``time.monotonic()`` when the node started.
        settle: seconds of evidence with no peer linked before :meth:`verdict` gives up.
    """

    def __init__(self, job: str, fingerprint: str, started: float, settle: float = SETTLE_S):
        self.job = job
        self.fingerprint = fingerprint
        self.started = started
        self.settle = settle
        self._lock = threading.Lock()  # adverts arrive on discovery's thread
        self._foreign: dict[str, tuple[str, str, float]] = {}  # "ip:port" -> (node, fp, seen)
        self._refused: dict[str, tuple[str, float]] = {}  # "ip:port" -> (why, first seen)
        self._logged: set[str] = set()

    def saw_advert(self, node_id: str, addresses: tuple[str, ...], port: int,
                   fingerprint: str, now: float) -> None:
        """An advert of our job; one under another fingerprint is evidence (and a log line)."""
        if fingerprint == self.fingerprint:
            return
        with self._lock:
            for address in addresses:
                where = f"{address}:{port}"
                if where not in self._foreign and len(self._foreign) >= MAX_FOREIGN:
                    return
                self._foreign.setdefault(where, (node_id, fingerprint, now))
            self._log_once(f"advert {node_id} {fingerprint}",
                           f"node {node_id} at {', '.join(addresses)}:{port} announces job "
                           f"{self.job!r} with key fingerprint {short(fingerprint)}, this "
                           f"node's is {short(self.fingerprint)}: it holds another job key "
                           f"and cannot join (every device of a job needs the same key file)")

    def saw_refusals(self, refused: dict[str, tuple[int, int]], now: float) -> None:
        """Probes whose peer refused our handshakes: endpoint -> (dropped at once, refused
        by its key check), from ``Transport.refused_links``."""
        with self._lock:
            for endpoint, (dropped, denied) in refused.items():
                where = endpoint.split("://", 1)[-1]
                why = "denied" if denied else "dropped" if dropped >= 2 else ""
                if why and where not in self._refused and len(self._refused) < MAX_FOREIGN:
                    self._refused[where] = (why, now)
                    self._log_once(f"refused {where}", self._describe(where, why))

    def saw_doors(self, news: dict[str, tuple[str, str]], now: float) -> None:
        """Doors that refused our asks or answered as another device: endpoint -> ("job",
        their job key fingerprint) or ("device", "wanted found"), from the dialler."""
        with self._lock:
            for endpoint, (kind, detail) in list(news.items()):
                where = endpoint.split("://", 1)[-1]
                if where in self._refused or len(self._refused) >= MAX_FOREIGN:
                    continue
                if kind == "job":
                    self._foreign.setdefault(where, ("", detail, now))
                    self._refused[where] = ("dropped", now)
                else:
                    self._refused[where] = (f"device {detail}", now)
                self._log_once(f"refused {where}", self._describe(where,
                                                                  self._refused[where][0]))

    def verdict(self, now: float, linked: bool) -> SecurityError | None:
        """The error to stop with, or None: only when no peer is linked and the evidence has
        stood for ``settle`` seconds."""
        if linked:
            return None
        with self._lock:
            refused = [(where, why) for where, (why, seen) in self._refused.items()
                       if now - seen >= self.settle]
            foreign = [(where, node, fp) for where, (node, fp, seen) in self._foreign.items()
                       if now - seen >= self.settle]
        if refused:
            where, why = refused[0]
            return SecurityError(self._describe(where, why) + "; giving up")
        if foreign:
            where, node, fp = foreign[0]
            return SecurityError(
                f"no node of job {self.job!r} holds our key: node {node} at {where} belongs to "
                f"a job with key fingerprint {short(fp)}, ours is {short(self.fingerprint)}; "
                f"copy the same key file to every device (or check RINGTRAIN_KEY_FILE)")
        return None

    def _describe(self, where: str, why: str) -> str:
        if why == "denied":
            return (f"peer {where} refused our device key at its key check (this device may "
                    f"have been revoked from job {self.job!r}: see `ringtrain revoke --list`)")
        if why.startswith("device "):
            wanted, found = why.split()[1:3]
            return (f"peer {where} is device {found}, not device {wanted} that was to listen "
                    f"there: refusing to talk to it (another device took that address, or "
                    f"the pinned fingerprint is wrong)")
        node, fp = self._foreign.get(where, ("", ""))[:2]
        theirs = (f"it belongs to a job with key fingerprint {short(fp)}" if fp else
                  "it does not hold the device key its door named")
        return (f"peer {where} refused our key: {theirs}, ours is {short(self.fingerprint)}; "
                f"copy the same key file to every device")

    def _log_once(self, what: str, text: str) -> None:
        if what not in self._logged and len(self._logged) < 4 * MAX_FOREIGN:
            self._logged.add(what)
            log.warning("%s", text)
