"""Node ids and job names: what they may be (:func:`check_name`) and their defaults."""

from __future__ import annotations

import re
import secrets
import socket

from ..errors import ConfigError

MAX_NODE_ID, MAX_JOB = 30, 32  # they must fit one DNS label together (mDNS instance names)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def check_name(what: str, value: str, limit: int) -> None:
    """Node ids and job names: letters, digits, '-' and '_', starting with a letter or digit."""
    if not (isinstance(value, str) and len(value) <= limit and _NAME.fullmatch(value)):
        raise ConfigError(f"{what} {value!r} must be 1-{limit} letters, digits, '-' or '_', "
                          f"starting with a letter or digit")


def default_node_id() -> str:
    """This host's name (cleaned up) plus random digits, e.g. ``laptop-3f9a1c`` (rings with
    no key; with a key a node's id derives from its device key, see ``comm.identity``)."""
    return f"{default_name()[:MAX_NODE_ID - 7]}-{secrets.token_hex(3)}"


def default_name() -> str:
    """This host's name, cleaned up to letters, digits, '-' and '_'."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0]).strip("-_")
    return host or "node"
