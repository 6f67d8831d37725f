"""``ringtrain keygen``: write a new job key to a file only its owner can read.

    ringtrain keygen --out job.key
    RINGTRAIN_KEY_FILE=job.key ringtrain ...       # on every device of the job

The key itself is never printed (a terminal's scrollback is not a secret store); its
fingerprint is, so devices can be checked to hold the same key.
"""

from __future__ import annotations

import argparse

from ..comm.security import JobKey, write_key_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ringtrain keygen``."""
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="file to write the key to (created with mode 0600)")
    parser.add_argument("--force", action="store_true", help="overwrite PATH if it exists")


def run(args: argparse.Namespace) -> int:
    """Write the key; print where, its fingerprint and how to use it."""
    key = JobKey.generate()
    path = write_key_file(args.out, key, overwrite=args.force)
    print(f"wrote a new job key to {path} (readable by you only)")
    print(f"fingerprint: {key.fingerprint}")
    print("copy it to every device of the job (e.g. with scp), then run ringtrain there with")
    print(f"  RINGTRAIN_KEY_FILE={path} ringtrain ...   or   ringtrain ... --key-file {path}")
    print("anyone holding this file can join the job's ring: keep it off shared folders")
    return 0
