"""The ``ringtrain`` command. Each subcommand lives in the module that owns its feature; this
module only parses arguments and maps errors to exit codes.

Exit codes: 0 success; 1 a ringtrain error at run time (ring failed, peer misbehaved);
2 bad usage or configuration, or a key problem (missing, refused, another job's); 130
interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import ConfigError, RingtrainError, SecurityError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# subcommand -> (module implementing add_arguments(parser) and run(args) -> int, help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("ringtrain.cli.demo",
             "start N local nodes that train a digits classifier together, beside one alone"),
    "node": ("ringtrain.cli.node",
             "run this device's node of a job: the built-in job, or a training script"),
    "peers": ("ringtrain.cli.peers",
              "list the ringtrain nodes announcing themselves on the LAN"),
    "keygen": ("ringtrain.cli.keygen",
               "write a new job key to a file (mode 0600); print its fingerprint"),
    "revoke": ("ringtrain.cli.revoke",
               "expel a device from a job (every member refuses it), or admit a new one"),
    "bench": ("ringtrain.bench.allreduce",
              "all-reduce time and bandwidth per size, beside Gloo, on loopback or an emulated "
              "LAN"),
    "bench-formation": ("ringtrain.bench.formation",
                        "time from the last node's start to a formed ring, 4 and 8 nodes on an "
                        "emulated LAN (root)"),
    "bench-recovery": ("ringtrain.bench.recovery",
                       "time recovery after a SIGKILL (detect, re-form, redo) for N local nodes"),
    "bench-scaling": ("ringtrain.bench.scaling",
                      "training throughput and weak-scaling efficiency for 1, 2, 4 devices on "
                      "an emulated LAN, each with its own CPU budget (root)"),
    "bench-hostile": ("ringtrain.bench.hostile",
                      "a keyless stranger floods a training ring with adverts and idle "
                      "connections on an emulated LAN (root): stalls and descriptors"),
    "bench-security": ("ringtrain.bench.security",
                       "time all_reduce with and without encryption (CURVE) on loopback"),
    "allreduce-demo": ("ringtrain.cli.allreduce_demo",
                       "start N local nodes and all-reduce arrays among them (a smoke test)"),
}


def command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv``: its first word that is not an option (the top-level
    options take no values)."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in SUBCOMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser: every subcommand's name and help, and the arguments of ``command``
    alone, so that running one command imports only its module (no benchmark or lab module
    for ``ringtrain keygen``)."""
    parser = argparse.ArgumentParser(
        prog="ringtrain",
        description="Train one model together on the devices you already have.")
    parser.add_argument("--version", action="version", version=f"ringtrain {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(command_in(argv)).parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.module.run(args))
    except (ConfigError, SecurityError) as exc:  # a key mismatch is the user's to fix, too
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
