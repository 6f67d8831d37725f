"""A deterministic simulator for the membership protocol: the real ``Membership`` objects on
a virtual clock and a network that delays, drops, duplicates and reorders, with partitions,
crashes, closes (a job's end), stalls, graceful leaves and restarts. One seed replays one
schedule exactly.

Each schedule: 2-9 devices, each with an endpoint; a fault phase (``FAULT_SECONDS`` of
virtual time) with random faults; then every fault stops (partitions heal, stalls end, every
crashed device restarts) and the protocol must converge within the liveness bound. The
invariants (docs/design.md, Membership) are checked after every event; a violation raises
:class:`Violation` with the seed and the command that replays it.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any

from ringtrain.membership.agreement import has_quorum
from ringtrain.membership.messages import Accepted, Message
from ringtrain.membership.peers import BACKOFF_CAP, MAX_PEERS
from ringtrain.membership.protocol import Membership, MembershipConfig

FAULT_SECONDS = 8.0  # virtual seconds of faults
SETTLE_BOUND = 12.0  # liveness: after faults stop, one view of everyone within this (+ back-off)
QUIET = 2.0  # ... and no view change for this long after it
HELLO_INTERVAL = 0.5  # how often a process dials every endpoint (the node re-sends HELLO)
CONFIG = dict(heartbeat_interval=0.25, suspect_timeout=1.0, round_timeout=0.3, stagger=0.05)


class Violation(AssertionError):
    """An invariant failed; the message names it, the seed and how to replay."""


@dataclass(slots=True)
class Process:
    """One running process of a device."""

    node_id: str
    endpoint: str
    incarnation: int
    membership: Membership
    alive: bool = True
    stalled_until: float = 0.0
    held: list = field(default_factory=list)  # deliveries during a stall, in order
    last_generation: int = 0
    installs: int = 0
    leaving_at: float | None = None
    fenced: bool = False
    evicted: bool = False


# An event is a tuple (time, order, kind, data): tuples compare in C, and ``order`` (unique,
# growing) breaks ties so that kind and data are never compared.
Event = tuple[float, int, str, Any]
KEPT_AFTER_CALM = frozenset({"tick", "dial", "deliver", "hello", "resume"})


class World:
    """One schedule, from one seed."""

    def __init__(self, seed: int, nodes: int | None = None, trace: bool = False):
        self.seed = seed
        self.rng = random.Random(seed)
        self.devices = nodes or self.rng.randint(2, 9)
        self.trace = trace
        rng = self.rng
        n = self.devices
        # strict (every ring needs a majority of the devices) in some schedules: what
        # `ringtrain node --min-nodes M` runs with M > devices / 2 (it sets the first view's
        # size and the least ring size both to M); the others let rings shrink to one node
        self.strict = rng.random() < 0.3
        form = n // 2 + 1 if self.strict else rng.randint(1, max(1, min(2, n)))
        self.config = MembershipConfig(form_size=form, min_size=form if self.strict else 1,
                                       max_size=64,
                                       settle=rng.choice([0.0, 0.3]), **CONFIG)
        self.drop = rng.choice([0.0, 0.01, 0.05, 0.15])
        self.duplicate = rng.choice([0.0, 0.02, 0.1])
        self.delay = rng.choice([0.001, 0.01, 0.05])
        self.now = 0.0
        self.events: list[Event] = []
        self._order = 0
        self.processes: dict[str, Process] = {}  # by endpoint: the one listening there
        self.by_id: dict[str, Process] = {}
        self.groups: dict[str, int] = {}  # endpoint -> partition group (same group talks)
        self.next_incarnation = 1
        self.fresh_id = 0
        self.decided: dict[tuple[str, int], tuple] = {}  # (lineage, generation) -> members
        self.accepted_seen: dict[tuple, set[str]] = {}  # (to, lineage, gen, ballot) -> from
        self.log: list[str] = []
        self._changed = False
        self._epoch = 0  # grows whenever _converged() may change its answer
        self.calm = False  # the faults stopped
        for k in range(n):
            endpoint = f"e{k}"
            self._start(endpoint, f"n{k}")
        if rng.random() < 0.3 and n >= 2:  # a split start, healed later
            cut = rng.randint(1, n - 1)
            for k in range(n):
                self.groups[f"e{k}"] = 0 if k < cut else 1
            self._at(rng.uniform(1.0, FAULT_SECONDS), "heal")
        self._plan_faults()

    # --- setup --------------------------------------------------------------------------------

    def _at(self, time: float, kind: str, data: Any = None) -> None:
        self._order += 1
        heapq.heappush(self.events, (time, self._order, kind, data))

    def _start(self, endpoint: str, node_id: str) -> Process:
        incarnation = self.next_incarnation
        self.next_incarnation += 1
        process = Process(node_id, endpoint, incarnation,
                          Membership(node_id, incarnation, self.config))
        old = self.by_id.get(node_id)
        if old is not None and old.alive:
            raise AssertionError("two live processes with one id")
        self.processes[endpoint] = process
        self.by_id[node_id] = process
        self._epoch += 1
        self._at(self.now + self.rng.uniform(0, 0.05), "tick", process)
        self._at(self.now + self.rng.uniform(0, 0.05), "dial", process)
        self._note(f"start {node_id}#{incarnation} at {endpoint}")
        return process

    def _plan_faults(self) -> None:
        rng = self.rng
        for _ in range(rng.randint(0, 6)):
            when = rng.uniform(0.5, FAULT_SECONDS)
            kind = rng.choice(["crash", "crash", "close", "stall", "leave", "partition",
                               "isolate"])
            self._at(when, kind, f"e{rng.randrange(self.devices)}")

    def _note(self, text: str) -> None:
        line = f"{self.now:8.3f} {text}"
        self.log.append(line)
        if len(self.log) > 400:
            del self.log[:100]
        if self.trace:
            print(line)

    # --- the network --------------------------------------------------------------------------

    def _connected(self, a: str, b: str) -> bool:
        return self.groups.get(a, 0) == self.groups.get(b, 0)

    def _send(self, source: Process, to: str, message: Message) -> None:
        # the hottest path of the simulator: a message is most events of a schedule
        target = self.by_id.get(to)
        groups = self.groups
        if target is None or (groups and groups.get(source.endpoint, 0)
                              != groups.get(target.endpoint, 0)):
            return
        random = self.rng.random
        copies = 2 if random() < self.duplicate else 1
        data = (source.node_id, source.incarnation, source.endpoint, to, message)
        for _ in range(copies):
            if random() < self.drop:
                continue
            # the delay's tail is exponential (rng.expovariate(1.0), inlined: same numbers)
            delay = self.delay * (1 - math.log(1.0 - random()))
            self._order += 1
            heapq.heappush(self.events, (self.now + delay, self._order, "deliver", data))

    # --- running ------------------------------------------------------------------------------

    def run(self) -> None:
        """Run the schedule to its end; raise Violation if an invariant fails."""
        end_faults = FAULT_SECONDS
        self._at(end_faults, "calm")
        deadline = None
        stable_since = None
        handlers = {kind: getattr(self, f"_on_{kind}") for kind in (
            "tick", "dial", "hello", "deliver", "resume", "crash", "close", "restart", "stall",
            "leave", "partition", "isolate", "heal", "calm")}
        pop, events = heapq.heappop, self.events
        converged, epoch = False, -1
        while events:
            self.now, _, kind, data = pop(events)
            handlers[kind](data)
            if self._changed:  # a view installed or a promise made: who can train changed
                self._changed = False
                self._check_safety()
            if kind == "calm":
                events = self.events  # calm filtered the queue into a new list
                deadline = self.now + SETTLE_BOUND + self.remaining_backoff()
            if deadline is not None:
                if epoch != self._epoch:  # a view, a forming flag or a process changed
                    converged, epoch = self._converged(), self._epoch
                if converged:
                    stable_since = self.now if stable_since is None else stable_since
                    if self.now - stable_since >= QUIET:
                        self._check_bounded()
                        return
                else:
                    if stable_since is not None and self.now - stable_since > 0:
                        stable_since = None
                    if self.now > deadline:
                        self._fail(f"liveness: no single view of every live node "
                                   f"{SETTLE_BOUND:.0f} s (+ back-off) after the faults "
                                   f"stopped: {self._views()}")
        self._fail("ran out of events")

    def remaining_backoff(self) -> float:
        worst = 0.0
        for process in self.by_id.values():
            if process.alive:
                for _, state in process.membership.peers.items():
                    worst = max(worst, state.backoff_until - self.now)
        return min(worst, BACKOFF_CAP)

    def _live(self) -> list[Process]:
        return [p for p in self.processes.values() if p.alive]

    def _on_tick(self, process: Process) -> None:
        if not process.alive:
            return
        if self.now < process.stalled_until:
            self._at(process.stalled_until, "tick", process)
            return
        m = process.membership
        if process.leaving_at is not None and self.now >= process.leaving_at:
            m.leave()
            self._flush(process)
            self._note(f"{process.node_id} leaves")
            process.alive = False
            self._epoch += 1
            if self.calm:  # a leave begun in the fault phase (a stall delayed it): faults
                self._on_restart(process.endpoint)  # are over, so its device starts again
            return
        m.tick(self.now)
        if m.reform_due and not m.reforming and not m.leaving:
            m.start_reform(self.now)  # what the training layer does at its step boundary
            m.tick(self.now)
        self._flush(process)
        self._at(max(self.now + 0.01, min(m.next_tick(), self.now + 0.25)), "tick", process)

    def _on_dial(self, process: Process) -> None:
        if not process.alive:
            return
        if self.now >= process.stalled_until:
            for endpoint, target in list(self.processes.items()):
                if target is not process and self._connected(process.endpoint, endpoint) \
                        and self.rng.random() >= self.drop:
                    self._at(self.now + self.delay, "hello", (process, endpoint))
        self._at(self.now + HELLO_INTERVAL, "dial", process)

    def _on_hello(self, data: tuple) -> None:
        source, endpoint = data
        target = self.processes.get(endpoint)
        if target is None or not target.alive or not source.alive \
                or self.now < target.stalled_until:
            return
        if self.by_id.get(source.node_id) is not source:
            return  # that process is gone
        target.membership.hello(source.node_id, source.incarnation, source.endpoint, self.now)
        self._flush(target)

    def _on_deliver(self, data: tuple) -> None:
        sender, incarnation, source_endpoint, to, message = data
        target = self.by_id.get(to)
        if target is None or not target.alive:
            return
        groups = self.groups
        if groups and groups.get(source_endpoint, 0) != groups.get(target.endpoint, 0):
            return
        if self.now < target.stalled_until:
            target.held.append(data)
            return
        if type(message) is Accepted:
            key = (to, target.incarnation, message.lineage, message.generation, message.ballot)
            self.accepted_seen.setdefault(key, set()).add(sender)
        target.membership.receive(sender, incarnation, message, self.now)
        self._flush(target)

    def _flush(self, process: Process) -> None:
        m = process.membership
        for to, message in m.take_sends():
            self._send(process, to, message)
        fenced = m.fenced
        if m.installs != process.installs:
            process.installs = m.installs
            self._on_install(process)
            self._changed = True
            self._epoch += 1
        elif fenced != process.fenced:
            self._changed = True
        process.fenced = fenced
        if m.evicted != process.evicted:
            process.evicted = m.evicted
            self._epoch += 1

    # --- faults -------------------------------------------------------------------------------

    def _on_crash(self, endpoint: str) -> None:
        process = self.processes.get(endpoint)
        if process is None or not process.alive:
            return
        process.alive = False
        self._epoch += 1
        self._note(f"crash {process.node_id}#{process.incarnation}")
        if self.rng.random() < 0.7:
            self._at(self.now + self.rng.uniform(0.1, 3.0), "restart", endpoint)

    def _on_close(self, endpoint: str) -> None:
        """The process ends as at the end of its job: it tells the peers outside its view
        (joiners, a member left out) that it leaves, then is gone (to its members, a crash)."""
        process = self.processes.get(endpoint)
        if process is None or not process.alive:
            return
        self._note(f"close {process.node_id}#{process.incarnation}")
        process.membership.leave_outsiders()
        self._flush(process)
        self._on_crash(endpoint)

    def _on_restart(self, endpoint: str) -> None:
        process = self.processes.get(endpoint)
        if process is not None and process.alive:
            return
        how = self.rng.choice(["same id", "new id", "new endpoint"])
        node_id = process.node_id if process else ""
        if how == "new id" or process is None:  # None: its device moved to a new endpoint
            self.fresh_id += 1
            node_id = f"x{self.fresh_id}"
        if how == "new endpoint":
            self.processes.pop(endpoint, None)
            endpoint = f"{endpoint}'"
            if self.processes.get(endpoint) is not None and self.processes[endpoint].alive:
                return
        self._note(f"restart ({how})")
        self._start(endpoint, node_id)

    def _on_stall(self, endpoint: str) -> None:
        process = self.processes.get(endpoint)
        if process is not None and process.alive:
            process.stalled_until = self.now + self.rng.uniform(0.5, 4.0)
            self._note(f"stall {process.node_id} until {process.stalled_until:.3f}")
            self._at(process.stalled_until, "resume", process)

    def _on_resume(self, process: Process) -> None:
        held, process.held = process.held, []
        for data in held:
            self._on_deliver(data)

    def _on_leave(self, endpoint: str) -> None:
        process = self.processes.get(endpoint)
        if process is not None and process.alive and process.leaving_at is None:
            process.membership.prepare_leave()
            process.leaving_at = self.now + 0.3
            self._note(f"{process.node_id} will leave")
            if self.rng.random() < 0.7:
                self._at(self.now + self.rng.uniform(0.5, 3.0), "restart", endpoint)

    def _on_partition(self, endpoint: str) -> None:
        endpoints = list(self.processes)
        self.rng.shuffle(endpoints)
        cut = self.rng.randint(1, max(1, len(endpoints) - 1))
        self.groups = {e: int(i < cut) for i, e in enumerate(endpoints)}
        self._note(f"partition {sorted(endpoints[:cut])} | {sorted(endpoints[cut:])}")
        self._at(self.now + self.rng.uniform(0.5, 4.0), "heal")

    def _on_isolate(self, endpoint: str) -> None:
        self.groups = {e: int(e == endpoint) for e in self.processes}
        self._note(f"isolate {endpoint}")
        self._at(self.now + self.rng.uniform(0.5, 4.0), "heal")

    def _on_heal(self, _: Any) -> None:
        self.groups = {}
        self._note("heal")

    def _on_calm(self, _: Any) -> None:
        """Faults stop: heal, wake, restart every crashed device (and any device whose
        graceful leave completes later), no more message faults."""
        self.calm = True
        self.groups = {}
        self.drop = self.duplicate = 0.0
        self.events = [e for e in self.events if e[2] in KEPT_AFTER_CALM]
        heapq.heapify(self.events)
        for endpoint, process in list(self.processes.items()):
            if self.now < process.stalled_until:
                process.stalled_until = self.now
                self._on_resume(process)
            if not process.alive:
                self._on_restart(endpoint)
        self._note("calm: faults stop")

    # --- invariants ---------------------------------------------------------------------------

    def _fail(self, what: str) -> None:
        raise Violation(f"{what}\nseed {self.seed} ({self.devices} devices, strict "
                        f"{self.strict}, drop {self.drop}); replay: python -m tests.sim "
                        f"--seed {self.seed} --trace\nlast events:\n" + "\n".join(self.log[-40:]))

    def _on_install(self, process: Process) -> None:
        m = process.membership
        view, decision = m.view, m.decision
        assert view is not None and decision is not None
        self._note(f"{process.node_id}#{process.incarnation} installs {view.lineage[-8:]}/"
                   f"{view.generation} {list(view.members)}")
        key = (view.lineage, view.generation)
        known = self.decided.setdefault(key, decision.members)
        if known != decision.members:  # agreement
            self._fail(f"agreement: {key} installed as {known} and as {decision.members}")
        if view.generation <= process.last_generation:  # monotonic
            self._fail(f"monotonic: {process.node_id} went from generation "
                       f"{process.last_generation} to {view.generation}")
        process.last_generation = view.generation
        if not decision.includes(process.node_id, process.incarnation):
            self._fail(f"{process.node_id} installed a view without itself")
        if m.evidence is not None:
            self._check_evidence(process, decision)

    def _check_evidence(self, process: Process, decision: Any) -> None:
        """Re-derive a decision from the ACCEPTED messages delivered to its decider."""
        lineage, generation, ballot, voters = process.membership.evidence
        delivered = self.accepted_seen.get((process.node_id, process.incarnation, lineage,
                                            generation, ballot), set())
        unproven = set(voters) - delivered - {process.node_id}
        if unproven:
            self._fail(f"decided without delivered votes: {process.node_id} counted "
                       f"{sorted(unproven)} for {lineage[-8:]}/{generation}, never delivered")
        if generation == 0:
            if set(voters) != set(decision.ids):
                self._fail(f"first view {decision.ids} decided by {sorted(voters)} only")
            return
        previous = self.decided.get((lineage, generation))
        if previous is None:
            self._fail(f"decided a successor of unknown view {lineage[-8:]}/{generation}")
        if not has_quorum(tuple(m for m, _ in previous), voters):
            self._fail(f"quorum: {decision.ids} decided by {sorted(voters)}, not a quorum of "
                       f"{[m for m, _ in previous]}")

    def _check_safety(self) -> None:
        """At most one group per lineage can train: a view whose every member runs it,
        unfenced (strict: one group over all lineages)."""
        running: dict[tuple, list[Process]] = {}
        for process in self.by_id.values():
            m = process.membership
            if process.alive and not m.forming and not m.fenced and m.view is not None:
                running.setdefault((m.view.lineage, m.view.generation), []).append(process)
        training = []
        for (lineage, generation), processes in running.items():
            members = set(self.decided[(lineage, generation)])
            if {(p.node_id, p.incarnation) for p in processes} >= members:
                training.append((lineage, generation))
        lineages = [lineage for lineage, _ in training]
        if len(set(lineages)) != len(lineages):
            self._fail(f"two groups of one lineage can train: {training}")
        if self.strict and len(training) > 1:
            self._fail(f"strict ring size, yet two groups can train: {training}")

    def _views(self) -> dict[str, Any]:
        return {f"{p.node_id}#{p.incarnation}": (
            None if p.membership.view is None else
            (p.membership.view.lineage[-8:], p.membership.view.generation,
             p.membership.view.members, "evicted" if p.membership.evicted else "",
             p.membership.waiting)) for p in self._live()}

    def _converged(self) -> bool:
        live = self._live()
        views = {(p.membership.view.lineage, p.membership.view.generation)
                 if p.membership.view is not None and not p.membership.forming else None
                 for p in live}
        if len(views) != 1 or None in views:
            return False
        view = live[0].membership.view
        return set(view.members) == {p.node_id for p in live}

    def _check_bounded(self) -> None:
        for process in self._live():
            m = process.membership
            if len(m.peers) > MAX_PEERS or not set(m.suspects) <= set(m.view.members):
                self._fail(f"unbounded state at {process.node_id}")
            if m._instance.round is not None and \
                    len(m._instance.round.promises) > len(m.view.members):
                self._fail(f"unbounded promises at {process.node_id}")


def run_schedule(seed: int, trace: bool = False) -> World:
    """Run one seeded schedule (raises Violation on a failed invariant)."""
    logging.getLogger("ringtrain.membership").setLevel(logging.INFO if trace
                                                       else logging.CRITICAL)
    world = World(seed, trace=trace)
    world.run()
    return world

