"""``ringtrain doctor``: what went wrong, in sentences.

With run folders (``ringtrain doctor ringtrain-default/ [more folders...]``, e.g. copied from
every device of a job), it merges the nodes' flight-recorder dumps and says in one sentence
which node held up which collective and why.

Without, it answers "why can't I see my peer?" for this device: it listens for the job's
mDNS adverts on the chosen interface and the others, compares key fingerprints, connects and
handshakes with every peer found or named, asks named peers for mDNS by unicast, and reads
the firewall; each cause found is named with what to do
(:mod:`ringtrain.observe.diagnose`).

Exit code 0 when nothing is wrong (every peer answers; no failed collective), 1 when a cause
was found.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..comm.endpoints import normalize_endpoint
from ..comm.security import key_from_environment, read_key_file
from ..errors import ConfigError
from ..observe.analysis import dump_holdup
from ..observe.diagnose import diagnose
from ..observe.recorder import load_dump


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the subcommand."""
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                        help="run folders (or flight-recorder dump files) of a job: say which "
                             "node held up which collective; without: check why this device "
                             "cannot see its peers")
    parser.add_argument("--job", default="default", help="the job (default 'default')")
    parser.add_argument("--key-file", default=None,
                        help="this device's job key (or RINGTRAIN_KEY_FILE)")
    parser.add_argument("--interface", default=None,
                        help="the interface `ringtrain node --interface` uses (default: every "
                             "non-loopback one)")
    parser.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                        help="a peer to check directly (repeatable)")
    parser.add_argument("--listen", type=float, default=3.0, metavar="SECONDS",
                        help="how long to listen for mDNS adverts (default 3)")
    parser.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS",
                        help="bound on each connection attempt (default 3)")
    parser.add_argument("--json", action="store_true", help="one JSON object, for programs")


def _dumps(paths: list[str]) -> list[dict]:
    found = []
    for name in paths:
        path = Path(name)
        if not path.exists():
            raise ConfigError(f"no such run folder or dump: {path}")
        files = [path] if path.is_file() else sorted(path.glob("flight-*.json")) + sorted(
            path.glob("*/flight-*.json"))
        for file in files:
            try:
                found.append(load_dump(file))
            except ValueError as exc:
                print(f"ringtrain doctor: skipping {exc}")
    return found


def run(args: argparse.Namespace) -> int:
    """Explain a failed run, or why peers cannot be seen."""
    if args.run_dirs:
        dumps = _dumps(args.run_dirs)
        holdup = dump_holdup(dumps)
        if args.json:
            print(json.dumps({"dumps": len(dumps), "holdup": None if holdup is None else {
                "node": holdup.node, "collective": holdup.collective,
                "reason": holdup.reason, "sentence": holdup.sentence()}}))
        elif not dumps:
            print(f"no flight-recorder dumps in {', '.join(args.run_dirs)}")
        elif holdup is None:
            print(f"{len(dumps)} dumps ({', '.join(sorted(d.get('node', '?') for d in dumps))})"
                  f": no collective failed or hung in them")
        else:
            print(holdup.sentence())
        return 0 if holdup is None else 1
    for peer in args.peer:
        normalize_endpoint(peer)
    key = read_key_file(args.key_file) if args.key_file else key_from_environment()
    findings = diagnose(args.job, key, args.interface, args.peer, seconds=args.listen,
                        timeout=args.timeout)
    problems = [f for f in findings if f.cause != "ok"]
    if args.json:
        print(json.dumps({"findings": [{"cause": f.cause, "sentence": f.sentence,
                                        "fix": f.fix} for f in findings]}))
    else:
        for finding in findings:
            print(("problem: " if finding.cause != "ok" else "ok: ")
                  + "\n".join(finding.lines()))
        if not findings:
            print("no peer found and no cause either: give the peers' addresses with --peer")
    return 1 if problems or not findings else 0
