"""Membership messages: what nodes say to agree on views, as plain frozen values.

The protocol (``protocol``) takes these in and hands them out; it never sees bytes. The node
turns them into control messages (``to_body`` / ``from_body``: JSON objects, checked field
by field) and back. Ballots are ``(round, node id)`` pairs, compared as tuples.

A view is named by its *lineage* (the id of the first view it descends from: the genesis
proposer's incarnation, node id and round, so lineages order by when their proposer started)
and its *generation* (one more per change). Members are ``(node id, incarnation)`` pairs: a
restarted process has a new incarnation and is never its old self.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ProtocolError

Ballot = tuple[int, str]
NO_BALLOT: Ballot = (0, "")
MAX_ID_LENGTH = 64
MAX_MEMBERS = 256
MAX_LINEAGE_LENGTH = 128


@dataclass(frozen=True)
class Decision:
    """A view as an agreement instance decides it: generation, lineage and members
    ``(node id, incarnation)`` sorted by node id."""

    generation: int
    lineage: str
    members: tuple[tuple[str, int], ...]

    @property
    def ids(self) -> tuple[str, ...]:
        """Member node ids in ring order."""
        return tuple(member for member, _ in self.members)

    def includes(self, node_id: str, incarnation: int) -> bool:
        """Whether this incarnation of ``node_id`` is a member."""
        return (node_id, incarnation) in self.members


@dataclass(frozen=True)
class Heartbeat:
    """Liveness, and the sender's view: ``lineage`` "" when it has none; ``in_view`` False
    when it learnt it was left out of its lineage's newer views (it waits to be admitted);
    ``leaving`` True once it will leave after its current step (no next view includes it);
    ``hears`` the peers it heard from lately (a joiner is admitted once it hears every
    member: then each admitted the other's HELLO, and their data is not dropped); ``full``
    True when its view has as many members as its ``--max-nodes`` (a joiner then waits for a
    member to leave, and can say so)."""

    lineage: str
    generation: int
    members: tuple[str, ...]
    in_view: bool
    sequence: int  # the collective the sender is at (a stalled member lags)
    leaving: bool = False
    hears: tuple[str, ...] = ()
    full: bool = False


@dataclass(frozen=True)
class Prepare:
    """Phase 1 of the instance that changes view (lineage, generation); ``wanted`` is the
    member set the proposer means to propose, if no accepted value binds it."""

    lineage: str
    generation: int
    ballot: Ballot
    wanted: tuple[str, ...]


@dataclass(frozen=True)
class Promise:
    """An acceptor's answer to Prepare: it accepts no lower ballot from now on, and tells
    what it accepted last in this instance (if anything)."""

    lineage: str
    generation: int
    ballot: Ballot
    accepted_ballot: Ballot
    accepted: Decision | None


@dataclass(frozen=True)
class Accept:
    """Phase 2: accept ``value`` at ``ballot``. With generation 0 it proposes a first view
    (lineage is then the new lineage's id, and every proposed member must accept)."""

    lineage: str
    generation: int
    ballot: Ballot
    value: Decision


@dataclass(frozen=True)
class Accepted:
    """An acceptor accepted the proposal of ``ballot`` in this instance."""

    lineage: str
    generation: int
    ballot: Ballot


@dataclass(frozen=True)
class Nack:
    """An acceptor refused ``ballot``: it promised ``promised`` (or, at genesis, another
    proposal)."""

    lineage: str
    generation: int
    ballot: Ballot
    promised: Ballot


@dataclass(frozen=True)
class Decide:
    """The value an instance decided: install it (sent by whoever learnt it, as often as a
    member is seen behind)."""

    value: Decision


@dataclass(frozen=True)
class Release:
    """A first-view proposal that did not gather every member: forget having accepted it."""

    lineage: str


@dataclass(frozen=True)
class Leave:
    """The sender leaves on purpose."""


Message = Heartbeat | Prepare | Promise | Accept | Accepted | Nack | Decide | Release | Leave

KINDS: dict[str, type] = {"heartbeat": Heartbeat, "prepare": Prepare, "promise": Promise,
                          "accept": Accept, "accepted": Accepted, "nack": Nack,
                          "decide": Decide, "release": Release, "leave": Leave}
_NAMES = {kind: name for name, kind in KINDS.items()}


# --- to and from JSON bodies ------------------------------------------------------------------

def to_body(message: Message) -> dict:
    """A JSON-ready dict for ``message`` (its ``type`` names the kind)."""
    body: dict = {"type": _NAMES[type(message)]}
    for name, value in vars(message).items():
        if isinstance(value, Decision):
            value = _decision_body(value)
        elif isinstance(value, tuple):
            value = list(value)
        body[name] = value
    return body


def _decision_body(decision: Decision) -> dict:
    return {"generation": decision.generation, "lineage": decision.lineage,
            "members": [[m, i] for m, i in decision.members]}


def from_body(body: dict, peer: str) -> Message:
    """The message a JSON body carries; ProtocolError naming the field and ``peer`` if any
    field is missing or malformed."""
    kind = KINDS.get(body.get("type"))  # type: ignore[arg-type]
    if kind is None:
        raise ProtocolError("membership.type", sorted(KINDS), body.get("type"), peer)
    get = _Fields(body, peer, _NAMES[kind])
    if kind is Heartbeat:
        return Heartbeat(get.lineage("lineage"), get.count("generation"),
                         get.ids("members"), get.flag("in_view"), get.count("sequence"),
                         get.flag("leaving"), get.ids("hears"),
                         get.flag("full") if "full" in body else False)  # older peers: absent
    if kind is Prepare:
        return Prepare(get.lineage("lineage"), get.count("generation"), get.ballot("ballot"),
                       get.ids("wanted"))
    if kind is Promise:
        accepted = body.get("accepted")
        return Promise(get.lineage("lineage"), get.count("generation"), get.ballot("ballot"),
                       get.ballot("accepted_ballot"),
                       None if accepted is None else get.decision("accepted"))
    if kind is Accept:
        return Accept(get.lineage("lineage"), get.count("generation"), get.ballot("ballot"),
                      get.decision("value"))
    if kind is Accepted:
        return Accepted(get.lineage("lineage"), get.count("generation"), get.ballot("ballot"))
    if kind is Nack:
        return Nack(get.lineage("lineage"), get.count("generation"), get.ballot("ballot"),
                    get.ballot("promised"))
    if kind is Decide:
        return Decide(get.decision("value"))
    if kind is Release:
        return Release(get.lineage("lineage"))
    return Leave()


class _Fields:
    """Reads typed fields of one body; every failure names the field and the peer."""

    def __init__(self, body: dict, peer: str, kind: str):
        self.body, self.peer, self.kind = body, peer, kind

    def _bad(self, name: str, expected: str, got: object) -> ProtocolError:
        return ProtocolError(f"{self.kind}.{name}", expected, got, self.peer)

    def count(self, name: str, value: object = None) -> int:
        value = self.body.get(name) if value is None else value
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2 ** 63:
            raise self._bad(name, "an integer >= 0", value)
        return value

    def flag(self, name: str) -> bool:
        value = self.body.get(name)
        if not isinstance(value, bool):
            raise self._bad(name, "true or false", value)
        return value

    def node_id(self, name: str, value: object) -> str:
        if not isinstance(value, str) or len(value) > MAX_ID_LENGTH:
            raise self._bad(name, f"a node id of at most {MAX_ID_LENGTH} characters", value)
        return value

    def lineage(self, name: str, value: object = None) -> str:
        value = self.body.get(name) if value is None else value
        if not isinstance(value, str) or len(value) > MAX_LINEAGE_LENGTH:
            raise self._bad(name, f"a lineage id of at most {MAX_LINEAGE_LENGTH} characters",
                            value)
        return value

    def ids(self, name: str) -> tuple[str, ...]:
        value = self.body.get(name)
        if not isinstance(value, list) or len(value) > MAX_MEMBERS:
            raise self._bad(name, f"a list of at most {MAX_MEMBERS} node ids", value)
        return tuple(self.node_id(name, v) for v in value)

    def ballot(self, name: str) -> Ballot:
        value = self.body.get(name)
        if not (isinstance(value, list) and len(value) == 2):
            raise self._bad(name, "a [round, node id] pair", value)
        return self.count(name, value[0]), self.node_id(name, value[1])

    def decision(self, name: str) -> Decision:
        value = self.body.get(name)
        if not isinstance(value, dict):
            raise self._bad(name, "a view {generation, lineage, members}", value)
        members = value.get("members")
        if not (isinstance(members, list) and 0 < len(members) <= MAX_MEMBERS and all(
                isinstance(m, list) and len(m) == 2 for m in members)):
            raise self._bad(f"{name}.members", "a list of [node id, incarnation] pairs", members)
        pairs = tuple((self.node_id(name, m), self.count(name, i)) for m, i in members)
        if [m for m, _ in pairs] != sorted({m for m, _ in pairs}):
            raise self._bad(f"{name}.members", "distinct node ids in ring order", members)
        return Decision(self.count(name, value.get("generation")),
                        self.lineage(name, value.get("lineage")), pairs)
