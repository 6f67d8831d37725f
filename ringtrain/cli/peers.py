"""``ringtrain peers``: list the ringtrain nodes announcing themselves on the LAN."""

from __future__ import annotations

import argparse
import time

from ..discovery.interfaces import usable_ipv4_addresses
from ..discovery.mdns import Browser, Discovery


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the subcommand."""
    parser.add_argument("--job", default=None, help="only nodes of this job")
    parser.add_argument("--interface", default=None,
                        help="interface (name or IPv4 address) to listen on (default: every "
                             "non-loopback interface)")
    parser.add_argument("--wait", type=float, default=2.0,
                        help="seconds to listen for adverts (default 2)")


def run(args: argparse.Namespace) -> int:
    """Browse for ``--wait`` seconds, then print one line per node."""
    with Discovery(usable_ipv4_addresses(args.interface)) as discovery:
        browser: Browser = discovery.browse(job=args.job)
        time.sleep(max(0.0, args.wait))
        adverts = browser.adverts()
        browser.close()
    if not adverts:
        print("no ringtrain nodes seen" + (f" for job {args.job!r}" if args.job else ""))
        return 0
    rows = [("JOB", "NODE", "ADDRESS", "GENERATION", "STATE", "KEY")]
    rows += [(a.job, a.node_id, ", ".join(f"{ip}:{a.port}" for ip in a.addresses),
              str(a.generation), a.state, a.key_fingerprint or "(none)")
             for a in sorted(adverts, key=lambda a: (a.job, a.node_id))]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    return 0
