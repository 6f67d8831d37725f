"""``ringtrain revoke``: expel a device from a job, without re-keying the others.

    ringtrain revoke k3j5h2g7f6d5s4a3 --key-file job.key     # by device fingerprint
    ringtrain revoke laptop-k3j5h2g7f6d5s4a3 --key-file job.key   # or by node id
    ringtrain revoke --list --key-file job.key
    ringtrain revoke --admit m2n3b4v5c6x7z8a9 --key-file job.key  # a new device, job closed

Run it on any device of the job. It writes this device's ledger of the job (beside its device
keys); a node running here picks the change up within a second and tells every member, each
of which refuses the device from its next step on and keeps the revocation in its own ledger
(so it holds across restarts). From the first revocation on the job is closed to devices no
member knew: admit a new one with ``--admit``. A revocation cannot be undone short of a new
job key.
"""

from __future__ import annotations

import argparse

from ..comm.identity import FINGERPRINT_CHARS, device_dir
from ..comm.ledger import Ledger, is_fingerprint, ledger_file
from ..comm.security import key_from_environment, read_key_file
from ..errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ringtrain revoke``."""
    parser.add_argument("device", nargs="?", help="the device's fingerprint, or a node id "
                        "(one ending in its fingerprint, or a name this device's ledger "
                        "binds to one)")
    parser.add_argument("--key-file", default=None,
                        help="the job key (default: RINGTRAIN_KEY_FILE); names the job")
    parser.add_argument("--admit", action="store_true",
                        help="admit the device instead (a new device, once the job is closed)")
    parser.add_argument("--list", action="store_true",
                        help="print this device's ledger of the job")


def run(args: argparse.Namespace) -> int:
    """Revoke (or admit) the device, or list the ledger."""
    key = read_key_file(args.key_file) if args.key_file else key_from_environment()
    if key is None:
        raise ConfigError("which job? pass --key-file job.key (or set RINGTRAIN_KEY_FILE)")
    path = ledger_file(device_dir(), key.fingerprint)
    ledger = Ledger.open(path)
    if args.list or not args.device:
        print(f"job key {key.fingerprint}: ledger {path}")
        print(f"  revoked:  {', '.join(sorted(ledger.revoked)) or '(none)'}"
              f"{'  (the job is closed to new devices)' if ledger.closed else ''}")
        print(f"  admitted: {', '.join(sorted(ledger.admitted)) or '(none)'}")
        print(f"  known:    {', '.join(sorted(ledger.known)) or '(none)'}")
        for name, fp in sorted(ledger.bindings.items()):
            print(f"  name {name} -> device {fp}")
        return 0
    fingerprint = _fingerprint_of(args.device, ledger)
    if args.admit:
        news = ledger.admit(fingerprint)
        print(f"{'admitted' if news else 'already admitted (or revoked)'}: device "
              f"{fingerprint} may join job {key.fingerprint} although it is closed")
        return 0
    news = ledger.revoke(fingerprint)
    print(f"{'revoked' if news else 'already revoked'}: device {fingerprint} from job "
          f"{key.fingerprint} (ledger {path})")
    print("a node running on this device tells every member within seconds; each refuses the "
          "device from its next step on and remembers it across restarts")
    return 0


def _fingerprint_of(text: str, ledger: Ledger) -> str:
    if is_fingerprint(text):
        return text
    suffix = text.rpartition("-")[2]
    if len(suffix) == FINGERPRINT_CHARS and is_fingerprint(suffix):
        return suffix
    if text in ledger.bindings:
        return ledger.bindings[text]
    raise ConfigError(f"{text!r} is neither a device fingerprint ({FINGERPRINT_CHARS} "
                      f"characters a-z, 2-7) nor a node id this device's ledger knows; see "
                      f"`ringtrain revoke --list`")
