"""Peers that die or never come: survivors raise the named error within a bound, never hang.

The elastic-membership work extends this file; here the ring is static, so a collective
with a dead member must fail fast with :class:`PeerFailedError` naming the dead peer.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ringtrain import MembershipError, Node
from ringtrain.config import Settings
from ringtrain.errors import MismatchError, PeerFailedError
from ringtrain.testing import ClusterFailed, LocalCluster, free_ports, node_id

PROGRESS_TIMEOUT = 2.0
MARGIN = 5.0  # generous: detection, the abort's trip, a loaded 2-core machine
SETTINGS = Settings(progress_timeout=PROGRESS_TIMEOUT, heartbeat_timeout=2.0,
                    heartbeat_interval=0.5, collective_timeout=60.0)


def wait_for(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def lose_a_peer(node, flags: str, victim: int, when: str) -> dict:
    """Form, pass a barrier, then the victim waits to be killed while the others all-reduce:
    after the kill (``when="before"``) or while it is being killed (``"during"``)."""
    node.barrier(timeout=20)
    flag_dir = Path(flags)
    if node.rank == victim:
        (flag_dir / "ready").touch()
        threading.Event().wait(60)  # the parent kills us long before this
        return {"error": "victim was not killed"}
    if when == "before" and not wait_for(flag_dir / "killed", 30):
        return {"error": "the parent never killed the victim"}
    started = time.monotonic()
    try:
        node.all_reduce(np.ones(100_000, dtype=np.float32), timeout=30)
        outcome = {"error": None}
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        outcome = {"error": type(exc).__name__, "message": str(exc),
                   "peer": getattr(exc, "peer", None)}
    outcome["elapsed"] = time.monotonic() - started
    return outcome


def run_with_a_death(n: int, victim: int, when: str, tmp_path: Path) -> list[dict]:
    cluster = LocalCluster(lose_a_peer, n, args=(str(tmp_path), victim, when), timeout=60.0,
                           settings=SETTINGS, job=f"failure-{n}-{victim}-{when}").start()
    try:
        assert wait_for(tmp_path / "ready", 40), "the ring never formed"
        process = cluster.process(victim)
        process.kill()  # SIGKILL: no goodbye, sockets reset by the kernel
        process.join(10)
        assert not process.is_alive()
        (tmp_path / "killed").touch()
    except BaseException:
        cluster.stop()
        raise
    results = cluster.results(allow_failed=[victim])
    return [r for rank, r in enumerate(results) if rank != victim]


@pytest.mark.parametrize("n,victim,when", [
    (2, 0, "before"), (3, 1, "before"), (3, 0, "before"), (4, 2, "before"), (5, 3, "before"),
    (3, 2, "during"), (4, 1, "during"),
])
def test_survivors_raise_peer_failed_within_the_progress_timeout(n, victim, when, tmp_path):
    survivors = run_with_a_death(n, victim, when, tmp_path)
    problems = []
    for outcome in survivors:
        if outcome["error"] != "PeerFailedError":
            problems.append(f"{outcome}")
        elif outcome["elapsed"] > PROGRESS_TIMEOUT + MARGIN:
            problems.append(f"took {outcome['elapsed']:.1f} s: {outcome['message']}")
    assert not problems, "\n".join(problems)


def test_a_node_whose_peers_never_come_raises_membership_error():
    absent = free_ports(2)
    started = time.monotonic()
    with pytest.raises(MembershipError) as info:
        Node([f"127.0.0.1:{p}" for p in absent], listen="127.0.0.1:0", node_id="lonely",
             settings=Settings(form_timeout=1.5), insecure=True)
    elapsed = time.monotonic() - started
    assert 1.4 < elapsed < 1.5 + MARGIN
    assert "3" in str(info.value)  # the ring size it waited for


def test_a_node_told_to_expect_more_members_than_it_finds_raises_membership_error():
    started = time.monotonic()
    with pytest.raises(MembershipError):
        Node([], listen="127.0.0.1:0", world_size=2, settings=Settings(form_timeout=1.0),
             insecure=True)
    assert time.monotonic() - started < 1.0 + MARGIN


def end_once_a_joiner_waits(node, joiner: str, flags: str) -> int:
    """A member of a full ring: say it trains, train until ``joiner`` is a would-be joiner
    (its heartbeat says it hears every member), check no re-form is due (no room) and that
    the member said once why the joiner waits, end.
    Bounded by the cluster's deadline, whose report has every node's state."""
    node.all_reduce(np.ones(4))
    (Path(flags) / node.node_id).touch()
    ready = 0
    while ready < node.world_size:  # every member holds it (all agree on the sum)
        peer = node.state()["membership"]["peers"].get(joiner, {})
        mine = set(node.members) <= set(peer.get("hears", ()))
        ready = int(node.all_reduce(np.array([mine], dtype=np.int64))[0])
    # the snapshot that showed it is taken after the membership tick that read the same
    # heartbeat: reform_due already says whether that joiner is due
    due = node.all_reduce(np.array([node.reform_due], dtype=np.int64))[0]
    assert due == 0, "a full ring re-forms for a joiner it cannot admit"
    told = [e["message"] for e in node.recorder.snapshot()["events"] if e["event"] == "full"]
    assert told == [f"{joiner} asks to join, but the ring is full (2 nodes, --max-nodes); it "
                    f"joins when a member leaves"], told  # one line, when it starts waiting
    return node.world_size


def test_a_full_ring_keeps_a_joiner_waiting_then_tells_it_the_ring_ended(tmp_path):
    """A full ring does not re-form for a joiner it has no room for (it did, at every step:
    "same members"); and when it ends (its nodes close, no leave asked) it tells the nodes
    outside it that were waiting to join: their line says who left, not just how few nodes
    are found (and a left-out member on its way back does not wait for a ring that is gone)."""
    joiner = node_id(2)
    cluster = LocalCluster(end_once_a_joiner_waits, 2, args=(joiner, str(tmp_path)),
                           timeout=60.0, node_options={"max_size": 2},
                           settings_of={2: Settings(form_timeout=8.0)})
    cluster.start()
    if not (wait_for(tmp_path / node_id(0), 30) and wait_for(tmp_path / node_id(1), 30)):
        cluster.fail("the ring of two did not train")
    cluster.start_extra(2, node_options={"max_size": 3})  # it names 3 endpoints
    with pytest.raises(ClusterFailed) as info:
        cluster.results()
    report = str(info.value)
    assert "node-00:" not in report and "node-01:" not in report, report  # they ended well
    assert (f"{joiner}: MembershipError: the ring did not form within 8 s: waiting for "
            f"nodes: 1 of 3 found (node-00, node-01 left)") in report, report


@pytest.mark.parametrize("n,victim", [(4, 2), (5, 3)])
def test_every_survivor_names_the_dead_peer(n, victim, tmp_path):
    """A stall spreads round the ring and every starved survivor reaches its progress
    deadline within milliseconds of the others; each would blame its own predecessor. Before
    peer liveness (heartbeats) reached the collectives this failed: the first ABORT to arrive
    could name an alive node."""
    survivors = run_with_a_death(n, victim, "before", tmp_path)
    dead = node_id(victim)
    wrong = [f"blames {o.get('peer')}: {o.get('message')}" for o in survivors
             if o.get("peer") != dead]
    assert not wrong, "\n".join(wrong)


# a ring ordered by measured links (Settings.link_probe_bytes) ---------------------------------

def first_collective_then_reform(node) -> dict:
    """The first collective after forming: its error, if any; then, if a peer failed, re-form
    and all-reduce again."""
    try:
        total = node.all_reduce(np.ones(3), timeout=30)
        return {"error": None, "sum": total.tolist(), "size": node.world_size}
    except MismatchError as exc:
        return {"error": f"MismatchError: {exc}"}
    except PeerFailedError as exc:
        error = f"PeerFailedError: {exc}"
    node.reform(timeout=30)
    total = node.all_reduce(np.ones(3), timeout=30)
    return {"error": error, "sum": total.tolist(), "size": node.world_size}


def test_members_that_probe_links_differently_all_raise_a_mismatch_naming_the_setting():
    n = 3
    probing = Settings(link_probe_bytes=256 * 1024, collective_timeout=30.0)
    cluster = LocalCluster(first_collective_then_reform, n, timeout=60.0, job="probe-mismatch",
                           settings=probing,
                           settings_of={2: Settings(link_probe_bytes=128 * 1024,
                                                    collective_timeout=30.0)})
    results = cluster.start().results()
    for result in results:
        assert result["error"] is not None and result["error"].startswith("MismatchError"), \
            result
        assert "RINGTRAIN_LINK_PROBE_BYTES" in result["error"], result


def test_a_member_that_dies_while_links_are_measured_never_hangs_the_others():
    """Node 2 is killed while the members stream their link probes (1 GiB per link on
    loopback takes seconds): the others finish forming, their first collective names the
    failure, and after re-forming (two members: nothing to measure) they go on."""
    n = 3
    settings = Settings(link_probe_bytes=1 << 30, progress_timeout=PROGRESS_TIMEOUT,
                        heartbeat_timeout=2.0, heartbeat_interval=0.5, collective_timeout=60.0)
    cluster = LocalCluster(first_collective_then_reform, n, timeout=90.0, job="probe-death",
                           settings=settings)
    cluster.start()
    time.sleep(4.0)  # formed (about 1 s) and deep into the first 1 GiB stream
    cluster.process(2).kill()
    # a hang fails inside results(): the cluster's 90 s bound reports every stuck node
    results = cluster.results(allow_failed=[2])
    for result in results[:2]:
        assert result["error"] is not None and "ring order" in result["error"], result
        assert result["size"] == 2 and result["sum"] == [2.0, 2.0, 2.0], result
