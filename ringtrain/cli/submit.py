"""``ringtrain submit JOB``: hand a job to idle agents (``ringtrain agent``) and print
their reports.

JOB is ``digits`` (the built-in job: the digits classifier, ``--epochs``) or
``script:NAME.py`` (a script each agent already holds in its ``--scripts`` directory; the
agent refuses if it has none). The submitter joins the agents' pool ring with the job key:
without the key the agents' links refuse it, and nothing is handed out. Exit code 0 when
every agent's job exited 0.
"""

from __future__ import annotations

import argparse
import secrets

from ..agent import JobRequest, submit
from ..errors import MembershipError, RingtrainError
from .agent import add_pool_arguments, pool_node

SUBMIT_PORT = 0  # any free port: a submitter is nobody's peer for long


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the subcommand."""
    parser.add_argument("job", help="'digits' (the built-in job) or 'script:NAME.py'")
    parser.add_argument("--arg", action="append", default=[], dest="script_args",
                        help="an argument for a script job (repeatable)")
    parser.add_argument("--nodes", type=int, default=2, help="agents to run it (default 2)")
    parser.add_argument("--epochs", type=int, default=5,
                        help="built-in job: epochs (default 5)")
    parser.add_argument("--job-name", default=None,
                        help="the job's ring name (default: digits-<random>)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for the reports (default 600)")
    add_pool_arguments(parser, SUBMIT_PORT)


def run(args: argparse.Namespace) -> int:
    """Join the pool, hand the job over, print each agent's report."""
    request_id = secrets.token_hex(8)
    kind, _, script = args.job.partition(":")
    if args.job == "digits":
        kind, script = "builtin", ""
    request = JobRequest(request_id, args.job_name or f"{kind}-{request_id[:6]}",
                         kind, args.nodes, args.epochs, script, tuple(args.script_args))
    try:
        node = pool_node(args, world_size=2)
    except MembershipError as exc:
        why = str(exc).split(";")[0]  # the node's state follows; -v logs say more
        raise MembershipError(f"no agent pool {args.pool!r} let this node in: {why}; are "
                              f"agents running there, and is {args.key_file} their key?"
                              ) from exc
    with node:
        print(f"submit {node.node_id}: in pool {args.pool} with {node.world_size - 1} other "
              f"member(s); job {request.job} for {request.nodes} agents", flush=True)
        outcome = submit(node, request, args.timeout,
                         say=lambda line: print(line, flush=True))
        for agent, report in sorted(outcome.reports.items()):
            print(f"submit: {agent} exit code {report.exit_code}: {report.summary}",
                  flush=True)
        node.leave()
    if not outcome.ok:
        raise RingtrainError(f"job {request.job} failed on "
                             f"{sorted(a for a, r in outcome.reports.items() if r.exit_code)}")
    return 0
