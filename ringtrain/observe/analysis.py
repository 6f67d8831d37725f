"""Who is holding the ring up: pure reasoning over what the nodes report.

Two sources say the same thing in different tenses. Live (``ringtrain status``): each
answering node's current collective and what it waits for (segments from its predecessor,
its successor to take data); a node that does not answer cannot say anything. After the fact
(``ringtrain doctor`` over flight-recorder dumps): each node's records of the collective that
failed, with whom it blamed and what it was waiting for when it gave up.

Either way the culprit is found by following the waits: a node waiting on a peer that is
itself waiting passes the blame on, until it reaches a peer that does not answer, has not
started the collective (it is behind: busy outside collectives), or waits on nobody.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Holdup:
    """The node holding a collective up, and why, in one sentence (:meth:`sentence`)."""

    node: str
    collective: str  # e.g. "all_reduce #17 of generation 3"
    step: int
    reason: str
    waiting: tuple[str, ...]  # who waited on it, and for what

    def sentence(self) -> str:
        """One sentence for people."""
        waited = f" ({'; '.join(self.waiting)})" if self.waiting else ""
        step = f" at step {self.step}" if self.step else ""
        return f"node {self.node} held up {self.collective}{step}: {self.reason}{waited}."


def _label(record: dict[str, Any]) -> str:
    return f"{record.get('name', 'collective')} #{record.get('sequence')} of generation " \
           f"{record.get('generation')}"


def _key(record: dict[str, Any]) -> tuple[int, int]:
    return int(record.get("generation", -1)), int(record.get("sequence", -1))


def _waits(node: str, record: dict[str, Any]) -> list[tuple[str, str]]:
    """(peer, what) pairs a record says its node waited on."""
    waiting = record.get("waiting") or {}
    found = []
    source = waiting.get("from")
    if isinstance(source, str) and source:
        got, want = waiting.get("received"), waiting.get("expected")
        count = f" ({got}/{want} received)" if got is not None else ""
        found.append((source, f"{node} waited for its segments{count}"))
    target = waiting.get("to")
    if isinstance(target, str) and target:
        found.append((target, f"{node} waited for it to take data"))
    return found


BUSY_AFTER_S = 2.0
"""A member busy outside collectives holds the others up only once they have waited this
long: shorter, it is computing its step, as every member does (a SIGSTOPped member's successor
looks like that for a moment, before it too waits on the stopped one)."""


def live_holdup(nodes: dict[str, dict[str, Any] | None]) -> Holdup | None:
    """From live statuses (node id -> its status, None if it did not answer): the node
    holding up the collective the answering nodes are stuck in, if any is running.

    A status has ``collective`` (the node's latest record) and may have ``view``."""
    running = {n: s["collective"] for n, s in nodes.items()
               if s and isinstance(s.get("collective"), dict)
               and s["collective"].get("state") == "running"}
    if not running:
        return _failed_holdup(nodes)
    # the collective most nodes are in first; while a ring re-forms, those already in the
    # new generation wait on nobody yet, and a node still in the old one names the culprit
    for key, _ in Counter(_key(r) for r in running.values()).most_common():
        holdup = _chain_end(key, {n: r for n, r in running.items() if _key(r) == key}, nodes)
        if holdup is not None:
            return holdup
    return None


def _chain_end(key: tuple[int, int], stuck: dict[str, dict[str, Any]],
               nodes: dict[str, dict[str, Any] | None]) -> Holdup | None:
    """Follow the waits of the nodes ``stuck`` in collective ``key`` to the node at the end."""
    example = next(iter(stuck.values()))
    waited_on: dict[str, list[str]] = {}
    for node, record in stuck.items():
        age = record.get("age")
        for peer, what in _waits(node, record):
            waited_on.setdefault(peer, []).append(
                what + (f" for {age:.1f} s" if isinstance(age, (int, float)) else ""))
    if not waited_on:
        return None
    ages = [r.get("age") for r in stuck.values()]
    waited = max((a for a in ages if isinstance(a, (int, float))), default=0.0)

    def verdict(peer: str) -> str | None:
        """Why ``peer`` is the end of the chain, or None if it is in the collective too."""
        if peer not in nodes:
            return "it is not among the nodes asked"
        status = nodes[peer]
        if status is None:
            return "it does not answer (stopped, stalled or unreachable)"
        record = status.get("collective")
        if not isinstance(record, dict) or _key(record) < key:
            last = _label(record) if isinstance(record, dict) else "none yet"
            return f"it has not started that collective (its latest: {last}): it is busy " \
                   f"outside collectives"
        return None

    for start in sorted(waited_on, key=lambda p: -len(waited_on[p])):
        peer, seen = start, set()
        while peer not in seen:
            seen.add(peer)
            reason = verdict(peer)
            if reason is not None and reason.endswith("busy outside collectives") \
                    and waited < BUSY_AFTER_S:
                break  # a step's computing, not a holdup (yet): look along another chain
            if reason is not None:
                return Holdup(peer, _label(example), int(example.get("step", 0)), reason,
                              tuple(waited_on.get(peer, [])))
            record = nodes[peer]["collective"]  # type: ignore[index]
            nxt = [p for p, _ in _waits(peer, record) if p not in seen]
            if not nxt:
                break
            peer = nxt[0]
    return None


def _failed_holdup(nodes: dict[str, dict[str, Any] | None]) -> Holdup | None:
    """No collective runs: if the latest one failed and the ring has not moved on (no newer
    generation), the member the nodes blamed holds the ring up."""
    latest = {n: s["collective"] for n, s in nodes.items()
              if s and isinstance(s.get("collective"), dict)}
    if not latest:
        return None
    key = max(_key(r) for r in latest.values())
    failed = {n: r for n, r in latest.items() if _key(r) == key and r.get("state") == "failed"}
    blamed = Counter(r.get("suspect") for r in failed.values() if r.get("suspect"))
    if not blamed:
        return None
    # a member that answers nothing at all while the others are stuck is the first suspect,
    # whatever each node's first guess was (a node blames the neighbour it waited on, who
    # may only have been waiting on the silent one)
    example = next(iter(failed.values()))
    members = example.get("members") or list(nodes)
    silent = [m for m in members if m in nodes and nodes[m] is None]
    culprit = max(silent, key=lambda m: blamed.get(m, 0)) if silent else \
        blamed.most_common(1)[0][0]
    if culprit not in nodes:
        reason = "the others gave up on it; it is not among the nodes asked"
    elif nodes[culprit] is None:
        reason = "it does not answer (stopped, stalled or unreachable); the others gave up " \
                 "on it and wait for the ring to re-form"
    else:
        reason = "the others gave up on it and wait for the ring to re-form"
    waits = [f"{n} blamed it: {r.get('error')}" for n, r in sorted(failed.items())
             if r.get("suspect") == culprit][:2] or [
        f"{n} gave up: {r.get('error')}" for n, r in sorted(failed.items())][:1]
    return Holdup(culprit, _label(example), int(example.get("step", 0)), reason, tuple(waits))


def dump_holdup(dumps: list[dict[str, Any]]) -> Holdup | None:
    """From flight-recorder dumps of a job's nodes: who held up the latest collective that
    failed, by the blame of the nodes that recorded it (and the waits they recorded)."""
    failed = [(d.get("node", "?"), r) for d in dumps for r in d.get("collectives", [])
              if isinstance(r, dict) and r.get("state") in ("failed", "running")]
    if not failed:
        return None
    key = max(_key(r) for _, r in failed)
    latest = [(n, r) for n, r in failed if _key(r) == key]
    blamed = Counter(r.get("suspect") for _, r in latest if r.get("suspect"))
    waits: dict[str, list[str]] = {}
    for node, record in latest:
        for peer, what in _waits(node, record):
            waits.setdefault(peer, []).append(what)
    if blamed:
        culprit = blamed.most_common(1)[0][0]
    elif waits:
        culprit = max(waits, key=lambda p: len(waits[p]))
    else:
        return None
    reporters = {d.get("node") for d in dumps}
    record = latest[0][1]
    errors = [f"{n}: {r.get('error')}" for n, r in latest if r.get("error")]
    reason = "the others gave up on it" if culprit in reporters else \
        "it left no dump (killed, stopped or unreachable) and the others gave up on it"
    by_peer = {d.get("node"): d for d in dumps}
    theirs = by_peer.get(culprit)
    if theirs is not None:
        mine = [r for r in theirs.get("collectives", []) if isinstance(r, dict)]
        if mine and max(_key(r) for r in mine) < key:
            last = max(mine, key=_key)
            reason = f"it had not started that collective (its latest was {_label(last)}): " \
                     f"busy outside collectives"
    if errors:
        reason += f"; {errors[0]}"
    details = waits.get(culprit, []) + [f"{n} blamed it" for n, r in latest
                                        if r.get("suspect") == culprit and
                                        not any(w.startswith(f"{n} ") for w in
                                                waits.get(culprit, []))]
    return Holdup(culprit, _label(record), int(record.get("step", 0)), reason, tuple(details))
