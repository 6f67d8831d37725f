"""``ringtrain.join()``: the node of a script started by ``ringtrain node`` (or by hand).

    import ringtrain
    with ringtrain.join() as node:          # options from RINGTRAIN_* (set by `ringtrain node`)
        ...node.all_reduce(...)

Outside ``ringtrain node`` the same variables (or keyword overrides) configure it, so a script
runs the same way under the launcher, by hand, or from a service manager. Under ``ringtrain
node script.py`` the ring is formed before the script starts (so that torchrun's variables can
describe it, :func:`torchrun_environment`) and ``join()`` returns that node.
"""

from __future__ import annotations

import dataclasses

from ..config import LaunchOptions, Settings
from ..errors import ConfigError
from .node import Node

_launched: list[Node] = []  # the node `ringtrain node` formed for the script it runs


def launched_node() -> Node | None:
    """The node ``ringtrain node`` formed for the script running in this process, if any."""
    return _launched[0] if _launched else None


def set_launched_node(node: Node | None) -> None:
    """Make ``node`` the one :func:`join` returns in this process (None: forget it)."""
    _launched[:] = [] if node is None else [node]


def torchrun_environment(node: Node) -> dict[str, str]:
    """torchrun's variables for this node's current ring, so a script written for torchrun
    (and the frameworks that detect a torchrun launch) runs unchanged.

    One process per device: RANK = GROUP_RANK = the node's rank in the ring, WORLD_SIZE =
    the ring's size, LOCAL_RANK 0 of LOCAL_WORLD_SIZE 1. They describe one generation of
    the ring: the elastic helper rewrites them when the ring changes, where torchrun would
    restart every worker instead.
    """
    rank, size = str(node.rank), str(node.world_size)
    return {"RANK": rank, "WORLD_SIZE": size, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
            "GROUP_RANK": rank, "GROUP_WORLD_SIZE": size, "ROLE_RANK": rank,
            "ROLE_WORLD_SIZE": size, "ROLE_NAME": "default", "TORCHELASTIC_RUN_ID": node.job,
            "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
            "RINGTRAIN_GENERATION": str(node.generation)}


def join(options: LaunchOptions | None = None, *, settings: Settings | None = None,
         schema: str = "", world_size: int | None = None, **overrides: object) -> Node:
    """This process's node, built from ``RINGTRAIN_*`` variables plus ``overrides``
    (fields of :class:`~ringtrain.config.LaunchOptions`). The job key comes from
    ``RINGTRAIN_KEY_FILE`` / ``RINGTRAIN_KEY``. ``world_size``: how many nodes the first
    ring waits for (default ``min_nodes``; the ring may later shrink to ``min_nodes``).

    Raises:
        ConfigError: bad options, or no key off loopback.
        MembershipError: no ring formed in time.
    """
    if _launched and not _launched[0].closed:
        if options is not None or settings is not None or schema or overrides or world_size:
            raise ConfigError("under `ringtrain node` the ring is formed before the script "
                              "starts: join() takes no options there (pass them to "
                              "`ringtrain node`)")
        return _launched[0]
    options = dataclasses.replace(options or LaunchOptions.from_env(), **overrides)
    host = "0.0.0.0"
    if options.interface is not None and options.interface.replace(".", "").isdigit():
        host = options.interface  # pinned to one address
    elif not options.discovery and options.peers and all(
            p.startswith(("127.", "localhost")) for p in options.peers):
        host = "127.0.0.1"
    return Node(options.peers, listen=f"{host}:{options.port}", job=options.job,
                min_size=options.min_nodes, max_size=options.max_nodes,
                world_size=world_size or options.min_nodes, node_id=options.node_id,
                settings=settings,
                insecure=options.insecure, discover=options.discovery,
                interface=options.interface, schema=schema, peers_dns=options.peers_dns)
