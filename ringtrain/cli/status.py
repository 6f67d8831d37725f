"""``ringtrain status``: what every node of a job is doing, asked of the nodes themselves.

Nodes are found from ``--peer`` addresses (their node ports; the status server is on the
port + 1), from run folders (``--run-dir``: each node's ``node.json``), or by mDNS; every
answer names the node's peers, which are asked in turn, so one address finds the whole
ring. Each node answers over a CURVE link only to holders of the job key (see
:mod:`ringtrain.observe.status`). A node that does not answer within ``--timeout`` is
marked NOT ANSWERING; when the answering nodes are stuck in a collective, the node holding
it up is named.

Exit code 0 when every node answered, 1 when one did not (or none was found).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..comm.endpoints import normalize_endpoint
from ..comm.security import JobKey, key_from_environment, read_key_file
from ..errors import ConfigError
from ..observe.analysis import live_holdup
from ..observe.status import query, status_endpoint

EXIT_NOT_ANSWERING = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the subcommand."""
    parser.add_argument("--job", default="default", help="the job (default 'default')")
    parser.add_argument("--key-file", default=None,
                        help="the job key (or RINGTRAIN_KEY_FILE): nodes answer only holders")
    parser.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                        help="a node's address, as given to `ringtrain node --peer` "
                             "(repeatable); its status is asked on PORT + 1")
    parser.add_argument("--run-dir", action="append", default=[], metavar="DIR",
                        help="a run folder of `ringtrain node` (finds its nodes' status "
                             "servers on this host)")
    parser.add_argument("--interface", default=None,
                        help="find nodes by mDNS on this interface (default: when no --peer "
                             "or --run-dir is given, every non-loopback interface)")
    parser.add_argument("--listen", type=float, default=2.0, metavar="SECONDS",
                        help="how long to listen for mDNS adverts (default 2)")
    parser.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS",
                        help="a node that has not answered within this is marked NOT "
                             "ANSWERING (default 3)")
    parser.add_argument("--watch", type=float, nargs="?", const=2.0, default=None,
                        metavar="SECONDS", help="ask again every SECONDS (default 2) until "
                                                "Ctrl-C")
    parser.add_argument("--json", action="store_true", help="one JSON object, for programs")


def _key(args: argparse.Namespace) -> JobKey | None:
    return read_key_file(args.key_file) if args.key_file else key_from_environment()


def _seed_endpoints(args: argparse.Namespace) -> dict[str, str | None]:
    """Status endpoint -> node id (when known) to ask first."""
    found: dict[str, str | None] = {}
    for peer in args.peer:
        found[status_endpoint(peer)] = None
    for folder in args.run_dir:
        for info in sorted(Path(folder).glob("*/node.json")):
            try:
                data = json.loads(info.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(data, dict) and data.get("status"):
                endpoint = str(data["status"]).replace("0.0.0.0", "127.0.0.1")
                found[endpoint] = str(data.get("node"))
    if not found or args.interface:
        from ..discovery.interfaces import usable_ipv4_addresses  # only when browsing
        from ..discovery.mdns import Discovery
        with Discovery(usable_ipv4_addresses(args.interface)) as discovery:
            browser = discovery.browse(job=args.job)
            time.sleep(max(0.0, args.listen))
            for advert in browser.adverts():
                found[status_endpoint(f"{advert.addresses[0]}:{advert.port}")] = advert.node_id
            browser.close()
    return found


def gather(args: argparse.Namespace, key: JobKey | None) -> dict[str, Any]:
    """Ask every node found (and the peers they name); the statuses and the verdict."""
    names = _seed_endpoints(args)
    asked: dict[str, dict[str, Any] | None] = {}
    while True:
        todo = [e for e in names if e not in asked]
        if not todo:
            break
        asked.update(query(todo, key, args.timeout))
        for endpoint, reply in list(asked.items()):
            if reply and reply.get("ok"):
                names[endpoint] = reply.get("node") or names[endpoint]
                for peer, address in (reply.get("peers") or {}).items():
                    target = status_endpoint(address)
                    if target not in names:
                        names[target] = peer
    nodes: dict[str, dict[str, Any] | None] = {}
    for endpoint, reply in asked.items():
        name = names.get(endpoint) or endpoint
        good = reply if reply and reply.get("ok") else None
        if name not in nodes or good is not None:
            nodes[name] = good
    holdup = live_holdup(nodes)
    return {"time": time.time(), "nodes": {
        name: ({"answering": True, "status_endpoint": next(
            (e for e, n in names.items() if n == name), None), **status}
            if status is not None else {"answering": False, "status_endpoint": next(
                (e for e, n in names.items() if n == name), None)})
        for name, status in sorted(nodes.items())},
        "holdup": None if holdup is None else {"node": holdup.node,
                                               "collective": holdup.collective,
                                               "reason": holdup.reason,
                                               "sentence": holdup.sentence()}}


def _collective_text(record: dict[str, Any] | None) -> str:
    if not record:
        return "-"
    text = f"{record.get('name')} #{record.get('sequence')} g{record.get('generation')} " \
           f"{record.get('state')}"
    if record.get("state") == "running":
        waiting = record.get("waiting") or {}
        parts = [f"{record.get('age', 0):.1f} s"]
        if waiting.get("from"):
            parts.append(f"waits for {waiting['from']} ({waiting.get('received')}/"
                         f"{waiting.get('expected')})")
        if waiting.get("to"):
            parts.append(f"waits for {waiting['to']} to take data")
        text += " (" + ", ".join(parts) + ")"
    elif record.get("seconds") is not None:
        text += f" in {1000 * record['seconds']:.1f} ms"
    return text


def rows(report: dict[str, Any]) -> list[list[str]]:
    """The table: one row per node."""
    table = [["NODE", "RANK", "GEN", "STEP", "SAMPLES/S", "LINKS (Mbit/s out)",
              "LAST COLLECTIVE", "LAST ERROR"]]
    holdup = (report.get("holdup") or {}).get("node")
    for name, status in report["nodes"].items():
        if not status.get("answering"):
            mark = "NOT ANSWERING (stalled or stopped)"
            if name == holdup:
                mark += ", holding the collective up"
            table.append([name, "-", "-", "-", "-", "-", mark, "-"])
            continue
        view = status.get("view") or {}
        links = ", ".join(f"{peer} {rate.get('out_mbit_s', 0):.1f}"
                          for peer, rate in (status.get("links") or {}).items()) or "-"
        rate = status.get("samples_per_s")
        table.append([name, str(view.get("rank", "-")), str(view.get("generation", "-")),
                      str(status.get("step") if status.get("step") is not None else "-"),
                      f"{rate:,.0f}" if isinstance(rate, (int, float)) else "-", links,
                      _collective_text(status.get("collective")),
                      (status.get("last_error") or "-")[:80]])
    return table


def render(report: dict[str, Any]) -> str:
    """Plain text: the table, then who holds the ring up."""
    table = rows(report)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in table]
    if report.get("holdup"):
        lines.append(report["holdup"]["sentence"])
    return "\n".join(lines)


def _print(report: dict[str, Any], as_json: bool, live: bool) -> None:
    if as_json:
        print(json.dumps(report, default=str), flush=True)
        return
    try:
        from rich.console import Console  # the optional extra: ringtrain[status]
        from rich.table import Table
    except ImportError:
        Console = None  # noqa: N806
    if Console is not None and sys.stdout.isatty():
        console = Console()
        table_rows = rows(report)
        table = Table(*table_rows[0], title=f"ringtrain status  {time.strftime('%H:%M:%S')}")
        for row in table_rows[1:]:
            table.add_row(*row, style="bold red" if "NOT ANSWERING" in row[6] else None)
        if live:
            console.clear()
        console.print(table)
        if report.get("holdup"):
            console.print(report["holdup"]["sentence"], style="red")
        return
    print(render(report), flush=True)


def run(args: argparse.Namespace) -> int:
    """Ask the nodes; print; exit 1 if a node did not answer."""
    if not args.timeout > 0:
        raise ConfigError(f"--timeout must be positive, got {args.timeout}")
    for peer in args.peer:
        normalize_endpoint(peer)  # a bad address is a usage error, said before any waiting
    key = _key(args)
    while True:
        report = gather(args, key)
        _print(report, args.json, args.watch is not None)
        if args.watch is None:
            silent = [n for n, s in report["nodes"].items() if not s.get("answering")]
            return EXIT_NOT_ANSWERING if silent or not report["nodes"] else 0
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0
