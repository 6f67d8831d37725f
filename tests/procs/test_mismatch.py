"""A node that calls a collective with another shape, dtype, op or kind makes EVERY node raise
MismatchError within seconds, naming both nodes and both calls; then the ring goes on.

``progress_timeout`` is set far above the bound checked here, so a mismatch that were only
noticed by a stalled peer timing out would fail these tests instead of passing slowly.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from ringtrain.config import Settings
from ringtrain.testing import node_id, run_local

BOUND = 10.0  # seconds: generous; a mismatch is seen as soon as the first segment arrives
SETTINGS = Settings(progress_timeout=30.0, collective_timeout=60.0)

# name -> (what every other node calls, what the odd node calls, texts the message must hold)
SCENARIOS = {
    "shape": (("all_reduce", (4,), "float32", "sum"), ("all_reduce", (5,), "float32", "sum"),
              ("[4]", "[5]")),
    "same size, other shape": (("all_reduce", (2, 3), "float64", "sum"),
                               ("all_reduce", (3, 2), "float64", "sum"), ("[2, 3]", "[3, 2]")),
    "dtype": (("all_reduce", (6,), "float32", "sum"), ("all_reduce", (6,), "int32", "sum"),
              ("float32", "int32")),
    "float width": (("all_reduce", (6,), "float32", "sum"),
                    ("all_reduce", (6,), "float64", "sum"), ("float32", "float64")),
    "op": (("all_reduce", (6,), "float32", "sum"), ("all_reduce", (6,), "float32", "max"),
           ("op=sum", "op=max")),
    "weighted": (("all_reduce", (6,), "float32", "mean"),
                 ("all_reduce_weighted", (6,), "float32", "mean"),
                 ("weighted=False", "weighted=True")),
    "broadcast, odd node is root": (("all_reduce", (6,), "float32", "sum"),
                                    ("broadcast_self", (6,), "float32", "sum"),
                                    ("all_reduce(", "broadcast(")),
    "broadcast, odd node is not root": (("all_reduce", (6,), "float32", "sum"),
                                        ("broadcast_next", (6,), "float32", "sum"),
                                        ("all_reduce(", "broadcast(")),
    "all_gather": (("all_reduce", (6,), "float32", "sum"), ("all_gather", (6,), "float32", "sum"),
                   ("all_reduce(", "all_gather(")),
    "reduce_scatter": (("reduce_scatter", (6,), "float32", "sum"),
                       ("all_reduce", (6,), "float32", "sum"),
                       ("reduce_scatter(", "all_reduce(")),
    "many arrays": (("many", (3000,), "float32", "sum"), ("many", (3001,), "float32", "sum"),
                    ("3000", "3001")),  # a descriptor of ~20 KB: beyond one descriptor frame
    "large, shape": (("all_reduce", (300_000,), "float32", "sum"),
                     ("all_reduce", (300_001,), "float32", "sum"), ("[300000]", "[300001]")),
}


def make_call(node, spec):
    kind, shape, dtype, op = spec
    array = np.full(shape, node.rank + 1, dtype=dtype)
    if kind == "all_reduce":
        return node.all_reduce(array, op=op)
    if kind == "many":
        return node.all_reduce_many([np.full(2, node.rank + 1, dtype=dtype)] * shape[0], op=op)
    if kind == "all_reduce_weighted":
        return node.all_reduce(array, op=op, weight=1.0)
    if kind == "broadcast_self":
        return node.broadcast(array, root=node.rank)
    if kind == "broadcast_next":
        return node.broadcast(array, root=(node.rank + 1) % node.world_size)
    if kind == "all_gather":
        return node.all_gather(array)
    if kind == "reduce_scatter":
        return node.reduce_scatter(array, op=op)
    raise AssertionError(kind)


def run_scenarios(node, plan: list[tuple[str, int]]) -> list[dict]:
    """Each scenario with its odd node, then a matching all_reduce that must be right."""
    outcomes = []
    for name, odd in plan:
        usual, different, _ = SCENARIOS[name]
        started = time.monotonic()
        outcome: dict = {"error": None}
        try:
            make_call(node, different if node.rank == odd else usual)
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            outcome = {"error": type(exc).__name__, "message": str(exc),
                       "generation": getattr(exc, "generation", None)}
        outcome["elapsed"] = time.monotonic() - started
        after = node.all_reduce(np.full(3, node.rank + 1.0), timeout=20)
        outcome["after"] = after.tolist()
        outcomes.append(outcome)
    return outcomes


def check(n: int, plan: list[tuple[str, int]], results: list[list[dict]]) -> None:
    problems = []
    for index, (name, odd) in enumerate(plan):
        texts = SCENARIOS[name][2]
        for rank in range(n):
            o = results[rank][index]
            where = f"N={n}, {name!r}, odd node {node_id(odd)}, at {node_id(rank)}"
            if o["error"] != "MismatchError":
                problems.append(f"{where}: {o['error'] or 'no error'} after {o['elapsed']:.1f} s: "
                                f"{o.get('message', '')[:400]}")
                continue
            if o["elapsed"] >= BOUND:
                problems.append(f"{where}: took {o['elapsed']:.1f} s")
            message = o["message"]
            named = [node_id(r) for r in range(n) if node_id(r) in message]
            if node_id(odd) not in named or len(named) < 2:
                problems.append(f"{where}: message names {named}, not the odd node and its "
                                f"neighbour: {message[:400]}")
            missing = [t for t in texts if t not in message]
            if missing:
                problems.append(f"{where}: message lacks {missing}: {message[:400]}")
            if len(message) > 2000:
                problems.append(f"{where}: a message of {len(message)} characters: {message[:200]}")
            if o["after"] != [n * (n + 1) / 2] * 3:
                problems.append(f"{where}: the next all_reduce gave {o['after']}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_every_node_raises_mismatch_error_and_the_ring_goes_on(n):
    plan = [(name, (index + n - 1) % n) for index, name in enumerate(SCENARIOS)]
    results = run_local(run_scenarios, n, args=(plan,), timeout=90.0, settings=SETTINGS,
                        job=f"mismatch-{n}")
    check(n, plan, results)


def root_disagreement(node) -> dict:
    """Every node names a root other than itself: nobody would send first."""
    started = time.monotonic()
    try:
        node.broadcast(np.zeros(3), root=(node.rank + 1) % node.world_size)
        outcome = {"error": None}
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        outcome = {"error": type(exc).__name__, "message": str(exc)}
    outcome["elapsed"] = time.monotonic() - started
    outcome["after"] = node.all_reduce(np.ones(2), timeout=20).tolist()
    return outcome


@pytest.mark.parametrize("n", [2, 3])
def test_broadcast_roots_that_disagree_are_a_mismatch_not_a_stall(n):
    """If each node passes a different root and none passes its own rank, no node is the root
    in its own eyes, so none sends first: that too must be a MismatchError within seconds,
    not a PeerFailedError after progress_timeout."""
    results = run_local(root_disagreement, n, timeout=90.0, settings=SETTINGS,
                        job=f"roots-{n}")
    for rank, outcome in enumerate(results):
        assert outcome["error"] == "MismatchError", (rank, outcome)
        assert outcome["elapsed"] < BOUND, (rank, outcome)
        assert outcome["after"] == [float(n)] * 2
