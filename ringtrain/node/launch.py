"""``ringtrain.join()``: the node of a script started by ``ringtrain node`` (or by hand).

    import ringtrain
    with ringtrain.join() as node:          # options from RINGTRAIN_* (set by `ringtrain node`)
        ...node.all_reduce(...)

Outside ``ringtrain node`` the same variables (or keyword overrides) configure it, so a script
runs the same way under the launcher, by hand, or from a service manager.
"""

from __future__ import annotations

import dataclasses

from ..config import LaunchOptions, Settings
from .node import Node


def join(options: LaunchOptions | None = None, *, settings: Settings | None = None,
         schema: str = "", **overrides: object) -> Node:
    """This process's node, built from ``RINGTRAIN_*`` variables plus ``overrides``
    (fields of :class:`~ringtrain.config.LaunchOptions`). The job key comes from
    ``RINGTRAIN_KEY_FILE`` / ``RINGTRAIN_KEY``.

    Raises:
        ConfigError: bad options, or no key off loopback.
        MembershipError: no ring formed in time.
    """
    options = dataclasses.replace(options or LaunchOptions.from_env(), **overrides)
    host = "0.0.0.0"
    if options.interface is not None and options.interface.replace(".", "").isdigit():
        host = options.interface  # pinned to one address
    elif not options.discovery and options.peers and all(
            p.startswith(("127.", "localhost")) for p in options.peers):
        host = "127.0.0.1"
    return Node(options.peers, listen=f"{host}:{options.port}", job=options.job,
                min_size=options.min_nodes, max_size=options.max_nodes,
                world_size=options.min_nodes, node_id=options.node_id, settings=settings,
                insecure=options.insecure, discover=options.discovery,
                interface=options.interface, schema=schema, peers_dns=options.peers_dns)
