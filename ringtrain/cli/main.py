"""The ``ringtrain`` command. Each subcommand lives in the module that owns its feature; this
module only parses arguments and maps errors to exit codes.

Exit codes (also in ``ringtrain --help``): see ``EXIT_CODES``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import ConfigError, RingtrainError, SecurityError
from . import output

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CODES = ("exit codes: 0 done; 1 the ring failed (a peer died, stalled or misbehaved and "
              "the ring could not go on); 2 bad usage or configuration (a flag, a key file, "
              "a job setting); 130 interrupted (Ctrl-C / SIGTERM)")

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
    "bench-cost-model": ("ringtrain.bench.cost_model",
                         "all-reduce time for 2, 4, 8, 16 devices on an emulated LAN beside "
                         "the ring's cost model, its constants measured on the same links "
                         "(root)"),
    "bench-rl": ("ringtrain.bench.rl",
                 "distributed PPO on CartPole-v1: 1 vs 4 devices to solve, a stopped device in "
                 "async mode, a killed device (emulated LAN, CPU budgets, root)"),
    "bench-torch": ("ringtrain.bench.torch_ddp",
                    "PyTorch DDP step time with the ringtrain backend beside Gloo (and the int8 "
                    "hook), on loopback or an emulated LAN"),
    "bench-wifi": ("ringtrain.bench.wifi",
                   "time to a target accuracy on slow links (1000, 100, 20 Mbit/s): DiLoCo, "
                   "PowerSGD, int8, async beside DDP + Gloo, on an emulated LAN (root)"),
    "lab-restart": ("ringtrain.lab.restart",
                    "restart a device's node (SIGKILL, Ctrl-C) and split the LAN 2|2 at start, "
                    "on an emulated LAN of 4 real nodes: time back to full size, step gaps, "
                    "final models (root)"),
    "bench-security": ("ringtrain.bench.security",
                       "time all_reduce with and without encryption (CURVE) on loopback"),
    "models": ("ringtrain.cli.models",
               "list the model versions in a run directory: job, generation, step, hash, "
               "parent"),
    "predict": ("ringtrain.cli.predict",
                "run a saved model on a batch, locally or split over a ring (--ring)"),
    "export": ("ringtrain.cli.export",
               "write a model as a plain model file, float32 or int8 (--int8)"),
    "agent": ("ringtrain.cli.agent",
              "wait as an idle device in a pool until a key holder submits a job"),
    "submit": ("ringtrain.cli.submit",
               "hand a job (built-in, or a script on each device) to idle agents; print "
               "their reports"),
    "bench-infer": ("ringtrain.bench.infer",
                    "inference across 4 local nodes, one at half the CPU budget: measured "
                    "speeds and shares (root)"),
    "health": ("ringtrain.cli.health",
               "exit 0 if this device's node is training (its --state-file), for readiness "
               "probes"),
    "allreduce-demo": ("ringtrain.cli.allreduce_demo",
                       "start N local nodes and all-reduce arrays among them (a smoke test)"),
    "status": ("ringtrain.cli.status",
               "what every node of a job is doing: rank, generation, step, speed, links, last "
               "collective, last error; who holds the ring up"),
    "doctor": ("ringtrain.cli.doctor",
               "why a node cannot see its peers, or (with run folders) which node held up "
               "which collective and why"),
    "plot": ("ringtrain.cli.plot",
             "draw a run's metrics as PNGs and merge its nodes' timelines (Perfetto JSON)"),
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
        prog="ringtrain", epilog=EXIT_CODES,
        description="Train one model together on the devices you already have.")
    parser.add_argument("--version", action="version", version=f"ringtrain {__version__}")
    _add_output_flags(parser, argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  epilog=EXIT_CODES)
        _add_output_flags(sub, argparse.SUPPRESS)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(module=module)
    return parser


def _add_output_flags(parser: argparse.ArgumentParser, default: object) -> None:
    """``-v`` and ``--log-json``, accepted before and after the subcommand alike."""
    parser.add_argument("-v", "--verbose", action="count", default=default,
                        help="details: -v adds warnings and information from every part, "
                             "-vv debugging (default: one line per event, and errors)")
    parser.add_argument("--log-json", action="store_true", default=default,
                        help="print log lines and events as JSON objects, one per line")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(command_in(argv)).parse_args(argv)
    # -v before and after the subcommand add up: count them in argv itself
    output.configure(_verbosity(argv), bool(getattr(args, "log_json", False)))
    try:
        return int(args.module.run(args))
    except (ConfigError, SecurityError) as exc:  # a flag, a key file, a setting to fix
        print(f"ringtrain: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RingtrainError as exc:
        print(f"ringtrain: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("ringtrain: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _verbosity(argv: Sequence[str]) -> int:
    """How many -v were given anywhere (``-vv`` counts two), up to a script's own arguments
    (``ringtrain node train.py -v`` passes ``-v`` to the script)."""
    count = 0
    for index, word in enumerate(argv):
        if word == "--" or (word.endswith(".py") and index > 0):
            break
        if word == "--verbose":
            count += 1
        elif word.startswith("-") and not word.startswith("--") and set(word[1:]) == {"v"}:
            count += len(word) - 1
    return count


if __name__ == "__main__":
    sys.exit(main())
