"""The ``ringtrain`` command. Each subcommand lives in the module that owns its feature; this
module only parses arguments and maps errors to exit codes.

Exit codes: 0 success; 1 a ringtrain error at run time (ring failed, peer misbehaved);
2 bad usage or configuration; 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .errors import ConfigError, RingtrainError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# subcommand -> (module implementing add_arguments(parser) and run(args) -> int, help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("ringtrain.demo",
             "start N local nodes that train a digits classifier together, beside one alone"),
    "node": ("ringtrain.run_node",
             "run this device's node of a job: the built-in job, or a training script"),
    "peers": ("ringtrain.peers",
              "list the ringtrain nodes announcing themselves on the LAN"),
    "keygen": ("ringtrain.keygen",
               "write a new job key to a file (mode 0600); print its fingerprint"),
    "bench": ("ringtrain.bench",
              "all-reduce time and bandwidth per size, beside Gloo, on loopback or an emulated "
              "LAN"),
    "bench-formation": ("ringtrain.formation_bench",
                        "time from the last node's start to a formed ring, 4 and 8 nodes on an "
                        "emulated LAN (root)"),
    "bench-recovery": ("ringtrain.recovery_bench",
                       "time recovery after a SIGKILL (detect, re-form, redo) for N local nodes"),
    "bench-scaling": ("ringtrain.scaling_bench",
                      "training throughput and weak-scaling efficiency for 1, 2, 4 devices on "
                      "an emulated LAN, each with its own CPU budget (root)"),
    "bench-security": ("ringtrain.security_bench",
                       "time all_reduce with and without encryption (CURVE) on loopback"),
    "allreduce-demo": ("ringtrain.local_demo",
                       "start N local nodes and all-reduce arrays among them (a smoke test)"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="ringtrain",
        description="Train one model together on the devices you already have.")
    parser.add_argument("--version", action="version", version=f"ringtrain {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.module.run(args))
    except ConfigError as exc:
        print(f"ringtrain: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RingtrainError as exc:
        print(f"ringtrain: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("ringtrain: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
