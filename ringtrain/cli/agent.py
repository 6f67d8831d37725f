"""``ringtrain agent``: wait as an idle device in a pool until a key holder submits a job.

The agent joins the pool ring (job ``--pool``, the job key's CURVE links: only key holders
get in), and runs what ``ringtrain submit`` hands it: the built-in digits job, or a script
by name from ``--scripts DIR`` (off unless given). Nothing that arrives over the network is
run; a request names a job, the code is what lies on this device. The job runs as a child
``ringtrain node`` on ``--job-port``; its log and checkpoints go to ``--workdir/<job>/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..agent import AgentPool
from ..agent.pool import pool_settings
from ..comm.security import read_key_file
from ..discovery.interfaces import usable_ipv4_addresses
from ..errors import ConfigError
from ..node.node import Node

POOL = "pool"
POOL_PORT, JOB_PORT = 7079, 7078


def add_pool_arguments(parser: argparse.ArgumentParser, port: int) -> None:
    """The flags that find the pool (shared with ``ringtrain submit``)."""
    parser.add_argument("--key-file", required=True,
                        help="the job key (`ringtrain keygen`): only its holders join the pool")
    parser.add_argument("--pool", default=POOL, help=f"pool name (default {POOL!r})")
    parser.add_argument("--port", type=int, default=port,
                        help=f"TCP port in the pool ring (default {port})")
    parser.add_argument("--interface", default=None,
                        help="interface (name or IPv4 address) to announce and listen on")
    parser.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                        help="a pool member to dial directly (repeatable)")
    parser.add_argument("--no-discovery", action="store_true",
                        help="do not use mDNS; only --peer addresses")
    parser.add_argument("--node-id", default=None, help="this node's id")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the subcommand."""
    add_pool_arguments(parser, POOL_PORT)
    parser.add_argument("--job-port", type=int, default=JOB_PORT,
                        help=f"TCP port of the job nodes this agent runs (default {JOB_PORT})")
    parser.add_argument("--address", default=None,
                        help="the IPv4 address other agents reach this one at (default: the "
                             "first address of --interface, or of this host)")
    parser.add_argument("--workdir", default="ringtrain-agent",
                        help="where job logs and checkpoints go (default ./ringtrain-agent)")
    parser.add_argument("--scripts", default=None, metavar="DIR",
                        help="scripts a submit may name, by file name (default: none, the "
                             "built-in job only)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="exit after this many jobs (default: serve until Ctrl-C)")


def pool_node(args: argparse.Namespace, world_size: int) -> Node:
    """This device's node in the pool ring."""
    if args.no_discovery and not args.peer:
        raise ConfigError("--no-discovery needs at least one --peer HOST:PORT")
    host = args.interface if args.interface and args.interface.replace(".", "").isdigit() \
        else "0.0.0.0"
    discover = not args.no_discovery
    return Node(args.peer, listen=f"{host}:{args.port}", job=args.pool, min_size=1,
                world_size=world_size, node_id=args.node_id, key=read_key_file(args.key_file),
                settings=pool_settings(),
                discover=discover, interface=args.interface,
                candidates=None if discover else (lambda add: None))  # elastic either way


def run(args: argparse.Namespace) -> int:
    """Serve jobs until Ctrl-C (or ``--jobs`` of them)."""
    address = args.address or usable_ipv4_addresses(args.interface)[0]
    scripts = Path(args.scripts).resolve() if args.scripts else None
    if scripts is not None and not scripts.is_dir():
        raise ConfigError(f"--scripts {args.scripts} is not a directory")
    with pool_node(args, world_size=1) as node:
        pool = AgentPool(node, f"{address}:{args.job_port}", str(Path(args.key_file).resolve()),
                         Path(args.workdir).resolve(), scripts,
                         say=lambda line: print(line, flush=True))
        pool.run(jobs=args.jobs)
        node.leave()
    return 0
