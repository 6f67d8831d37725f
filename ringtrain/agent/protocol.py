"""What pool members tell each other, and which agents take a job: pure, no I/O.

Every member of the pool ring (idle agents, busy agents, submitters) contributes one row to
each round's all-gather: a bounded JSON object saying who it is, where its job port is,
whether it is busy, a job request (submitters), and its latest job report (agents). Every
member decodes the same gathered bytes, so :func:`assign` gives every member the same
answer: each request, in rank order, gets the first ``nodes`` idle agents in rank order;
a request that cannot be served yet waits for a later round. A request names a job, never
code: ``builtin`` (the digits job) or ``script`` (a file by name in the directory each
agent's owner chose; no path, no upload). The agent checks that the script is there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError

__all__ = ["KINDS", "ROW_BYTES", "JobReport", "JobRequest", "PoolRow", "assign", "decode",
           "encode"]

ROW_BYTES = 2048  # one member's row in a round's all-gather
KINDS = ("builtin", "script")
MAX_NODES = 64
MAX_EPOCHS = 10_000
MAX_ARGS = 16
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
_SCRIPT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\.py")  # a file name: no '/', no '..'


@dataclass(frozen=True)
class JobRequest:
    """A job a submitter hands to the pool.

    Attributes:
        request: the submit's unique id (hex).
        job: the job name its ring runs under.
        kind: ``builtin`` or ``script``.
        nodes: how many agents run it.
        epochs: for ``builtin``, epochs to train.
        script: for ``script``, the file name in each agent's scripts directory.
        args: for ``script``, its arguments.
    """

    request: str
    job: str
    kind: str = "builtin"
    nodes: int = 2
    epochs: int = 5
    script: str = ""
    args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{8,32}", self.request):
            raise ConfigError(f"request id must be 8-32 hex digits, got {self.request!r}")
        if not _NAME.fullmatch(self.job):
            raise ConfigError(f"job name {self.job!r}: 1-32 letters, digits, '-' or '_'")
        if self.kind not in KINDS:
            raise ConfigError(f"job kind must be one of {KINDS}, got {self.kind!r}")
        for name, value, top in (("nodes", self.nodes, MAX_NODES),
                                 ("epochs", self.epochs, MAX_EPOCHS)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise ConfigError(f"{name} must be an integer in [1, {top}], got {value!r}")
        if self.kind == "script" and not _SCRIPT.fullmatch(self.script):
            raise ConfigError(f"script must be a file name ending in .py (no directories), "
                              f"got {self.script!r}")
        if len(self.args) > MAX_ARGS or not all(isinstance(a, str) and len(a) <= 64
                                                for a in self.args):
            raise ConfigError(f"at most {MAX_ARGS} script arguments of at most 64 characters")


@dataclass(frozen=True)
class JobReport:
    """What an agent reports when a job it ran ended."""

    request: str
    exit_code: int
    summary: str


@dataclass(frozen=True)
class PoolRow:
    """One member's row: see the module docstring."""

    node: str
    role: str  # "agent" or "submitter"
    address: str = ""  # host:port the agent's job node listens on
    busy: str = ""  # the request it runs, if any
    request: JobRequest | None = None
    report: JobReport | None = None
    reform: bool = False  # this member needs the ring re-formed (a joiner waits, a suspect)
    extra: dict = field(default_factory=dict)


def encode(row: PoolRow) -> np.ndarray:
    """The row as ``ROW_BYTES`` bytes (JSON, zero-padded).

    Raises:
        ConfigError: the row does not fit.
    """
    data = {"node": row.node, "role": row.role, "address": row.address, "busy": row.busy,
            "reform": row.reform}
    if row.request is not None:
        data["request"] = {**row.request.__dict__, "args": list(row.request.args)}
    if row.report is not None:
        data["report"] = dict(row.report.__dict__)
    raw = json.dumps(data, separators=(",", ":")).encode()
    if len(raw) > ROW_BYTES:
        raise ConfigError(f"a pool row of {len(raw)} bytes exceeds {ROW_BYTES}")
    out = np.zeros(ROW_BYTES, dtype=np.uint8)
    out[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return out


def decode(raw: np.ndarray, member: str) -> PoolRow:
    """A member's row from its bytes.

    Raises:
        ConfigError: not a valid row; the message names the member.
    """
    try:
        data = json.loads(bytes(raw).rstrip(b"\0"))
        if not isinstance(data, dict) or data.get("node") != member:
            raise ValueError(f"row of node {data.get('node') if isinstance(data, dict) else '?'}")
        if data.get("role") not in ("agent", "submitter"):
            raise ValueError(f"role {data.get('role')!r}")
        request = data.get("request")
        report = data.get("report")
        return PoolRow(
            member, data["role"], str(data.get("address", "")), str(data.get("busy", "")),
            None if request is None else JobRequest(**{**request,
                                                       "args": tuple(request.get("args", []))}),
            None if report is None else JobReport(str(report["request"]),
                                                  int(report["exit_code"]),
                                                  str(report["summary"])[:400]),
            bool(data.get("reform", False)))
    except (ValueError, TypeError, KeyError, ConfigError) as exc:
        raise ConfigError(f"pool member {member} sent a bad row: {exc}") from exc


def assign(rows: Sequence[PoolRow]) -> dict[str, list[str]]:
    """request id -> the agents (node ids) that take it this round; requests that cannot
    be served yet are absent."""
    idle = [row for row in rows if row.role == "agent" and not row.busy and row.address]
    taken: dict[str, list[str]] = {}
    for row in rows:
        request = row.request
        if row.role != "submitter" or request is None or request.request in taken:
            continue
        if len(idle) >= request.nodes:
            taken[request.request] = [agent.node for agent in idle[:request.nodes]]
            idle = idle[request.nodes:]
    return taken
