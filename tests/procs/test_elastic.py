"""Elastic training across real node processes: members die, stall, join and leave while the
others go on, and nothing is lost or applied twice.

The invariant, checked against a failure-free run of the same configuration (4 nodes, fixed
global batch, ``adaptive=False``, computed once per module): with a fixed global batch, each
global step's gradient is the weighted mean over the same global batch whoever computes which
part of it, so after any mix of failures, joins and leaves

* every survivor holds bit-identical parameters and optimizer state (equal content hash),
* they equal the failure-free run's up to float summation order (``TOLERANCE``),
* step count and data position equal the failure-free run's: no step lost, none applied twice
  (an extra or a missing gradient step would move the parameters far beyond the tolerance).

The failure-free run is itself checked against a one-process oracle that trains on the whole
global batch. Every wait is bounded; a hang fails with every node's state and stacks
(``LocalCluster``'s watchdog).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from ringtrain.config import Settings
from ringtrain.node.node import Node
from ringtrain.ring import runner
from ringtrain.testing import LocalCluster, free_ports, node_id
from ringtrain.train.datasets import load_digits
from ringtrain.train.nn import Dense, Sequential, Tanh, softmax_cross_entropy
from ringtrain.train.optim import SGD
from ringtrain.train.sharding import DataPosition, Sampler
from ringtrain.train.trainer import BUCKET_BYTES, Trainer

N = 4
STEPS = 30
KILL_STEP = 10
BATCH, GLOBAL_BATCH = 16, 64
TOLERANCE = 1e-9  # float64: only the summation order differs between rings of other sizes
RECOVERY_BOUND = 10.0  # seconds: a hang bound, not a speed claim (the issue asks for 5 s)
# realistic timing, a little tighter than the defaults so the suite stays short
# direct_bytes=0: the small model's gradient goes round the ring (not in one round), so a
# victim can die in the middle of its reduce-scatter or all-gather
SETTINGS = Settings(heartbeat_interval=0.25, heartbeat_timeout=2.0, reform_timeout=20.0,
                    form_timeout=30.0, collective_timeout=30.0, direct_bytes=0)
TIMEOUT = 60.0  # each cluster's deadline: the watchdogs report a hang before it


# --- what every node process runs ----------------------------------------------------------

def _data() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    return digits.x, digits.y


def _model() -> Sequential:
    return Sequential(Dense(64, 16), Tanh(), Dense(16, 10), seed=1, dtype=np.float64)


def _oracle(steps: int) -> tuple[np.ndarray, DataPosition]:
    """One process training on the whole global batch every step."""
    x, y = _data()
    model = _model()
    optimizer = SGD(model.params, lr=0.1, momentum=0.9)
    sampler, at = Sampler(len(x), seed=0), DataPosition()
    for _ in range(steps):
        (indices,), at = sampler.next_batches(at, [GLOBAL_BATCH])
        _, grad = softmax_cross_entropy(model.forward(x[indices]), y[indices])
        model.backward(grad)
        optimizer.step(model.grads)
    return model.params.copy(), at


class _Recorder(logging.Handler):
    """Keeps this node's ringtrain log lines, and appends warnings to a file the test reads."""

    def __init__(self, path: Path) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        line = f"{record.levelname} {record.name}: {record.getMessage()}"
        if len(self.lines) < 300:
            self.lines.append(line)
        if record.levelno >= logging.WARNING:
            with open(self.path, "a") as log_file:
                log_file.write(line + "\n")


def _arm_suicide(fraction: float, stamp: Path, last_beat: Node | None = None) -> dict:
    """Make this process SIGKILL itself once it has received ``fraction`` of the receives of
    the next all_reduce after arming (the victim's own runner; nothing else is changed).
    With ``last_beat`` (this node), it first sends a heartbeat, which names that very
    collective: its peers hear it after their last data moved, so their progress deadline
    passes before its silence is long enough to suspect it."""
    original = runner.RingRunner.take_segment
    armed = {"on": False, "count": 0}

    def accept(self, collective, view, sequence, message, expected, *rest):
        original(self, collective, view, sequence, message, expected, *rest)
        if armed["on"] and collective.name == "all_reduce":
            armed["count"] += 1
            total = len(collective.plan.receives)
            if armed["count"] >= max(1, int(fraction * total)):
                phase = "reduce-scatter" if expected.reduce else "all-gather"
                stamp.write_text(json.dumps({"time": time.time(), "phase": phase,
                                             "received": armed["count"], "of": total,
                                             "elements": collective.buffer.size}))
                if last_beat is not None:
                    membership = last_beat._engine.membership
                    membership.protocol.heartbeats.send_at_next_tick()
                    membership.tick()
                    time.sleep(0.05)  # for libzmq's I/O thread to put it on the wire
                os.kill(os.getpid(), signal.SIGKILL)

    runner.RingRunner.take_segment = accept
    return armed


def _target(out: Path, default: int) -> int:
    try:
        return int((out / "target").read_text())
    except (OSError, ValueError):
        return default


def train(node: Node, plan: dict) -> dict:
    """Train the digits MLP with a fixed global batch until ``plan["steps"]`` (or the step
    written to ``<out>/target``), acting out the plan's event for this node."""
    out = Path(plan["out"])
    me = node.node_id
    first_view = {"generation": node.generation, "joined": node.joined_running_ring}
    recorder = _Recorder(out / f"{me}.log")
    logging.getLogger("ringtrain").addHandler(recorder)
    logging.getLogger("ringtrain").setLevel(logging.INFO)
    views: list[tuple[float, int, tuple[str, ...]]] = []
    node.on_view_change(lambda view: views.append((time.time(), view.generation, view.members)))
    kill = plan.get("kill") if plan.get("kill", {}).get("node") == me else None
    if kill:
        armed = _arm_suicide(kill["fraction"], out / "killed",
                             node if kill.get("last_beat") else None)
    x, y = _data()
    model = _model()
    trainer = Trainer(node, model, SGD(model.params, lr=0.1, momentum=0.9), x, y,
                      batch_size=BATCH, global_batch_size=GLOBAL_BATCH, adaptive=False,
                      timeout=SETTINGS.collective_timeout, rejoin_timeout=40.0,
                      checkpoint_dir=plan.get("checkpoints", {}).get(me),
                      checkpoint_every=plan.get("checkpoint_every", 100),
                      bucket_bytes=plan.get("bucket_bytes", BUCKET_BYTES))
    start = {"step": trainer.step_count, "hash": trainer.version.content_hash,
             "generation": node.generation, "joined": node.joined_running_ring,
             "time": time.time()}
    hashes = {trainer.step_count: trainer.version.content_hash}
    step_times: dict[int, float] = {}
    joined_seen = node.joined_running_ring
    if kill and kill["step"] == 1:
        armed["on"] = True
    steps = plan["steps"]
    while trainer.step_count < _target(out, steps):
        report = trainer.step()
        step_times[report.step] = time.time()
        hashes[trainer.step_count] = trainer.version.content_hash
        joined_seen = joined_seen or node.joined_running_ring
        progress = out / f"{me}.json"
        progress.with_suffix(".tmp").write_text(json.dumps(
            {"step": trainer.step_count, "generation": node.generation,
             "members": list(node.members), "time": time.time()}))
        os.replace(progress.with_suffix(".tmp"), progress)
        if kill and report.step == kill["step"] - 1:
            armed["on"] = True
        if plan.get("leave", {}).get("node") == me and report.step == plan["leave"]["step"]:
            trainer.request_leave()
        elif trainer.optimizer.leave_announced:  # the others know: go (as Trainer.fit does)
            node.leave()
            break
        time.sleep(plan.get("pace", 0.0))
    membership = node.state()["membership"]
    return {"node": me, "params": model.params.copy(), "step": trainer.step_count,
            "position": (trainer.position.epoch, trainer.position.position),
            "hash": trainer.version.content_hash, "generation": node.generation,
            "members": node.members, "reforms": trainer.reforms, "lost": trainer.lost_steps,
            "start": start, "hashes": hashes, "step_times": step_times, "views": views,
            "joined_seen": joined_seen, "first_view": first_view, "membership": membership,
            "log": recorder.lines,
            "dropped": node.state()["dropped"]}


# --- helpers in the test process -------------------------------------------------------------

def _cluster(tmp_path: Path, size: int = N, job: str = "elastic", **plan) -> LocalCluster:
    plan = {"out": str(tmp_path), "steps": STEPS, **plan}
    options = plan.pop("node_options", {})
    return LocalCluster(train, size, args=(plan,), timeout=TIMEOUT, job=job, settings=SETTINGS,
                        node_options=options)


def _progress(tmp_path: Path, index: int) -> dict:
    try:
        return json.loads((tmp_path / f"{node_id(index)}.json").read_text())
    except (OSError, ValueError):
        return {"step": 0, "generation": 0, "members": []}


def _wait(condition, timeout: float, what: str, cluster: LocalCluster) -> None:
    """Poll ``condition`` until true; on timeout fail with every node's state and stacks."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            cluster.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def _assert_same_everywhere(results: list[dict]) -> None:
    """Bit-identical at the end, and at every step one model: every node that held step s
    held the same content hash for it (a step applied twice or on a stale state would not)."""
    first = results[0]
    for other in results[1:]:
        assert (other["step"], other["position"], other["hash"]) == \
            (first["step"], first["position"], first["hash"]), (first["node"], other["node"])
        np.testing.assert_array_equal(other["params"], first["params"])
    by_step: dict[int, set[str]] = {}
    for result in results:
        for step, digest in result["hashes"].items():
            by_step.setdefault(step, set()).add(digest)
    diverged = {step: digests for step, digests in by_step.items() if len(digests) > 1}
    assert not diverged, f"two models under one step: {diverged}"


def _assert_equals_reference(results: list[dict], reference: dict) -> float:
    _assert_same_everywhere(results)
    for result in results:
        assert result["step"] == reference["step"]
        assert result["position"] == reference["position"]
    difference = float(np.max(np.abs(results[0]["params"] - reference["params"])))
    assert difference <= TOLERANCE, f"max |param difference| {difference:.3g}"
    return difference


def _assert_equals_oracle(results: list[dict]) -> float:
    """Identical everywhere, and equal to one process that trained as many steps alone."""
    _assert_same_everywhere(results)
    oracle, position = _oracle(results[0]["step"])
    assert results[0]["position"] == (position.epoch, position.position)
    difference = float(np.max(np.abs(results[0]["params"] - oracle)))
    assert difference <= TOLERANCE, f"max |param difference| {difference:.3g}"
    return difference


def _logged(tmp_path: Path, index: int, text: str) -> bool:
    try:
        return text in (tmp_path / f"{node_id(index)}.log").read_text()
    except OSError:
        return False


def _failed_steps(result: dict) -> list[str]:
    return [line for line in result["log"] if "failed" in line and "re-forming" in line]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The failure-free run: 4 nodes, STEPS steps, checked against the one-process oracle."""
    results = _cluster(tmp_path_factory.mktemp("reference"), job="reference").start().results()
    _assert_same_everywhere(results)
    oracle, position = _oracle(STEPS)
    assert results[0]["position"] == (position.epoch, position.position)
    np.testing.assert_allclose(results[0]["params"], oracle, rtol=0, atol=TOLERANCE)
    return results[0]


# --- the tests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("victim,fraction,phase", [
    (0, 0.25, "reduce-scatter"), (0, 0.75, "all-gather"),
    (2, 0.25, "reduce-scatter"), (2, 0.75, "all-gather")],
    ids=["lowest-reduce-scatter", "lowest-all-gather", "middle-reduce-scatter",
         "middle-all-gather"])
def test_sigkill_mid_all_reduce_survivors_redo_the_step(victim, fraction, phase, reference,
                                                        tmp_path):
    cluster = _cluster(tmp_path, job=f"kill-{victim}-{int(fraction * 100)}",
                       kill={"node": node_id(victim), "step": KILL_STEP, "fraction": fraction})
    results = cluster.start().results(allow_failed=[victim])
    assert results[victim] is None, "the victim was not killed"
    stamp = json.loads((tmp_path / "killed").read_text())
    assert stamp["phase"] == phase, stamp
    survivors = [r for i, r in enumerate(results) if i != victim]
    difference = _assert_equals_reference(survivors, reference)
    # a survivor may have finished step 10 before the others abandoned it: they then adopt
    # its state and go on with step 11 (nothing applied twice); each survivor's first step
    # completed after the kill is its recovery
    recovery = max(min(t for t in r["step_times"].values() if t > stamp["time"]) - stamp["time"]
                   for r in survivors)
    adopted = [r["node"] for r in survivors if KILL_STEP not in r["step_times"]]
    print(f"\nSIGKILL of {node_id(victim)} in {phase} ({stamp['received']}/{stamp['of']} "
          f"receives) at step {KILL_STEP}: every survivor completed a step {recovery:.2f} s "
          f"later at most; max |param diff| vs failure-free {difference:.2g}; adopted step "
          f"{KILL_STEP} from a member that had finished it: {adopted or 'none'}")
    assert recovery < RECOVERY_BOUND
    for result in survivors:
        assert result["members"] == tuple(node_id(i) for i in range(N) if i != victim)
        assert result["generation"] > reference["generation"]


def test_sigkill_in_a_bucket_sent_during_backward_survivors_redo_the_step(reference,
                                                                         tmp_path):
    """Also: the victim's last heartbeat arrives after the survivors' last data, so each
    survivor's progress deadline passes before the victim has been silent long enough to be
    suspected, and each first blames the member it waits for (alive and waiting in turn).
    The member silent the longest, the victim, must be the one left out: blaming the one
    waited for left a healthy node out (once in CI; here in one run of four or five)."""
    victim = 1
    cluster = _cluster(tmp_path, job="kill-bucket", bucket_bytes=64,
                       kill={"node": node_id(victim), "step": KILL_STEP, "fraction": 0.5,
                             "last_beat": True})
    results = cluster.start().results(allow_failed=[victim])
    assert results[victim] is None, "the victim was not killed"
    stamp = json.loads((tmp_path / "killed").read_text())
    assert stamp["elements"] == 16 * 10 + 10, stamp  # the last layer's bucket, not the rest
    survivors = [r for i, r in enumerate(results) if i != victim]
    _assert_equals_reference(survivors, reference)
    for result in survivors:
        assert result["members"] == tuple(node_id(i) for i in range(N) if i != victim)


def test_sigstop_past_the_deadline_then_sigcont_drops_the_node_then_it_rejoins(tmp_path):
    stopped = 3
    cluster = _cluster(tmp_path, job="stop", steps=10_000, pace=0.02).start()
    try:
        _wait(lambda: _progress(tmp_path, 0)["step"] >= 10, 40, "step 10", cluster)
        process = cluster.process(stopped)
        os.kill(process.pid, signal.SIGSTOP)
        stopped_at = time.time()
        survivors = tuple(node_id(i) for i in range(N) if i != stopped)
        _wait(lambda: tuple(_progress(tmp_path, 0)["members"]) == survivors, 20,
              "the others to re-form without the stopped node", cluster)
        dropped_after = time.time() - stopped_at
        dropped_in = _progress(tmp_path, 0)["generation"]
        before = _progress(tmp_path, 0)["step"]
        _wait(lambda: _progress(tmp_path, 0)["step"] >= before + 10, 20,
              "10 steps without it", cluster)
        os.kill(process.pid, signal.SIGCONT)
        resumed_at = time.time()
        everyone = tuple(node_id(i) for i in range(N))
        # a step of a generation after the one that dropped it (on SIGCONT it may first
        # record the step it was stopped in, with the old generation's members)
        _wait(lambda: tuple(_progress(tmp_path, stopped)["members"]) == everyone
              and _progress(tmp_path, stopped)["generation"] > dropped_in, 20,
              "the stopped node to rejoin and train", cluster)
        rejoined_after = _progress(tmp_path, stopped)["time"] - resumed_at
        (tmp_path / "target").write_text(str(_progress(tmp_path, 0)["step"] + 20))
    except BaseException:
        cluster.stop()
        raise
    results = cluster.results()
    print(f"\nSIGSTOP of {node_id(stopped)}: the others re-formed without it "
          f"{dropped_after:.2f} s later; after SIGCONT it trained again as a new member "
          f"{rejoined_after:.2f} s later; reforms per node {[r['reforms'] for r in results]}")
    _assert_same_everywhere(results)
    mine = results[stopped]
    assert mine["joined_seen"], "the stopped node did not rejoin as a new member"
    # generation g+1 dropped it, a later one admitted it
    assert mine["generation"] >= mine["start"]["generation"] + 2, mine["views"]
    assert mine["members"] == everyone


def test_a_node_joining_mid_training_gets_everyones_state_before_contributing(tmp_path):
    cluster = _cluster(tmp_path, size=3, job="join", steps=10_000, pace=0.02).start()
    try:
        _wait(lambda: _progress(tmp_path, 0)["step"] >= 10, 40, "step 10", cluster)
        cluster.start_extra(3)
        everyone = tuple(node_id(i) for i in range(4))
        _wait(lambda: tuple(_progress(tmp_path, 3)["members"]) == everyone, 30,
              "the new node to join and train", cluster)
        (tmp_path / "target").write_text(str(_progress(tmp_path, 0)["step"] + 20))
    except BaseException:
        cluster.stop()
        raise
    results = cluster.results()
    _assert_same_everywhere(results)
    joiner = results[3]
    start = joiner["start"]
    # admitted into the running ring (not a fresh start): its state came from the members
    assert joiner["first_view"]["joined"] and start["step"] > 0, (joiner["first_view"], start)
    for member in results[:3]:
        assert member["hashes"][start["step"]] == start["hash"], member["node"]
    print(f"\njoiner {joiner['node']} started with the members' state of step {start['step']} "
          f"(hash {start['hash']}), generation {start['generation']}")


def test_graceful_leave_reforms_without_a_failed_step(reference, tmp_path):
    leaver = 2
    cluster = _cluster(tmp_path, job="leave", leave={"node": node_id(leaver), "step": 10})
    results = cluster.start().results()
    survivors = [r for i, r in enumerate(results) if i != leaver]
    assert results[leaver]["step"] == 11  # it contributed to the step that announced it
    difference = _assert_equals_reference(survivors, reference)
    for result in results:
        assert not _failed_steps(result), result["log"]
    for result in survivors:
        assert result["reforms"] == 1
        assert node_id(leaver) not in result["members"]
    print(f"\n{node_id(leaver)} left after step 11: {[r['reforms'] for r in survivors]} "
          f"reforms, no failed step; max |param diff| vs failure-free {difference:.2g}")


def test_below_min_size_the_job_waits_with_a_clear_message_then_resumes(tmp_path):
    victim = 2
    cluster = _cluster(tmp_path, size=3, job="minsize", steps=10_000, pace=0.02,
                       node_options={"min_size": 3}).start()
    try:
        _wait(lambda: _progress(tmp_path, 0)["step"] >= 10, 40, "step 10", cluster)
        cluster.process(victim).kill()
        message = "the job needs at least 3"
        _wait(lambda: _logged(tmp_path, 0, message), 20, "the waiting message", cluster)
        stuck_at = _progress(tmp_path, 0)["step"]
        cluster.start_extra(victim)
        _wait(lambda: _progress(tmp_path, 0)["step"] > stuck_at + 5, 30,
              "training to resume", cluster)
        (tmp_path / "target").write_text(str(_progress(tmp_path, 0)["step"] + 20))
    except BaseException:
        cluster.stop()
        raise
    results = cluster.results(allow_failed=[victim])
    assert results[victim] is None and results[3] is not None  # killed; its new incarnation
    current = [results[0], results[1], results[3]]
    difference = _assert_equals_oracle(current)
    waiting = [line for line in results[0]["log"] if message in line]
    print(f"\nbelow min_size: {waiting[0]!r}; resumed at step {stuck_at + 1} when "
          f"{node_id(victim)} came back; max |param diff| vs one process {difference:.2g}")
    assert results[3]["first_view"]["joined"] and results[3]["start"]["step"] > 0


def test_a_restarted_node_is_a_new_member_and_its_old_incarnation_is_fenced_off(tmp_path):
    """The old incarnation is stopped, not killed, while its successor joins under the same
    id; woken up, everything it sends is dropped (its CURVE key is no longer the admitted
    one) and it never displaces the new member. The stopped process keeps its device key
    locked, so the successor runs from a copy of the device (a restored disk image: the same
    key, the next boot)."""
    old = 3
    cluster = _cluster(tmp_path, job="fence", steps=10_000, pace=0.02).start()
    try:
        _wait(lambda: _progress(tmp_path, 0)["step"] >= 10, 40, "step 10", cluster)
        zombie = cluster.process(old)
        os.kill(zombie.pid, signal.SIGSTOP)
        old_generation = _progress(tmp_path, old)["generation"]
        (tmp_path / f"{node_id(old)}.json").unlink()
        device_copy = tmp_path / "device-copy"
        shutil.copytree(cluster.device_dir, device_copy)
        cluster.start_extra(old, listen=f"127.0.0.1:{free_ports(1)[0]}",
                            device_dir=str(device_copy))
        everyone = tuple(node_id(i) for i in range(N))
        _wait(lambda: tuple(_progress(tmp_path, old)["members"]) == everyone, 30,
              "the new incarnation to join and train", cluster)
        os.kill(zombie.pid, signal.SIGCONT)
        woken = _progress(tmp_path, 0)["step"]
        _wait(lambda: _progress(tmp_path, 0)["step"] >= woken + 25, 30,
              "25 more steps with the old incarnation awake", cluster)
        (tmp_path / "target").write_text(str(_progress(tmp_path, 0)["step"] + 20))
        zombie.kill()  # it waits for a majority it cannot have; it never finishes
    except BaseException:
        cluster.stop()
        raise
    results = cluster.results(allow_failed=[old])
    new = results[N]
    assert new is not None, "the new incarnation failed"
    current = [*results[:old], new]
    _assert_same_everywhere(current)
    # a new member: admitted into the running ring in a later generation, with its state
    assert new["first_view"]["joined"] and new["first_view"]["generation"] > old_generation \
        and new["start"]["step"] > 0, (new["first_view"], new["start"], old_generation)
    assert all(r["hashes"][new["start"]["step"]] == new["start"]["hash"] for r in current[:old])
    fenced = ("unauthenticated", "hello.incarnation", "evicted")
    dropped = {r["node"]: sum(r["dropped"].get(reason, 0) for reason in fenced)
               for r in current}
    print(f"\nrestart of {node_id(old)} under its id: admitted as a new member in generation "
          f"{new['start']['generation']} (old incarnation in {old_generation}); messages of "
          f"the woken old incarnation dropped: {dropped}")
    # what reaches the members of the woken old incarnation is dropped (counted above); with
    # the same device key it presents the new one's routing id, and the members' ROUTER
    # hands that id to the newest connection, so it may reach nobody at all
    assert all(r["members"] == everyone for r in current)


def test_a_node_that_keeps_failing_is_backed_off_longer_each_time(tmp_path):
    """node-03 crashes twice (SIGKILL, restarted at once): each crash counts, and the ring
    re-admits it only once its back-off has passed, which doubles (1 s, then 2 s)."""
    flaky = 3
    everyone = tuple(node_id(i) for i in range(N))
    cluster = _cluster(tmp_path, job="churn", steps=10_000, pace=0.02).start()
    killed_at = []
    try:
        for crash in range(2):
            _wait(lambda: tuple(_progress(tmp_path, flaky)["members"]) == everyone, 30,
                  f"{node_id(flaky)} to train (before crash {crash + 1})", cluster)
            cluster.process(flaky).kill()
            killed_at.append(time.time())
            (tmp_path / f"{node_id(flaky)}.json").unlink()
            cluster.start_extra(flaky)
        _wait(lambda: tuple(_progress(tmp_path, flaky)["members"]) == everyone, 30,
              f"{node_id(flaky)} to train again", cluster)
        (tmp_path / "target").write_text(str(_progress(tmp_path, 0)["step"] + 20))
    except BaseException:
        cluster.stop()
        raise
    results = cluster.results(allow_failed=[flaky])
    current = [*results[:flaky], results[-1]]
    assert None not in current, "the last incarnation failed"
    difference = _assert_equals_oracle(current)
    record = results[0]["membership"]["peers"][node_id(flaky)]
    # node-00 installs a view with everyone again after each crash: never before the
    # crash's back-off (counted from the kill at the earliest) has passed
    admitted = [next(t for t, _, members in results[0]["views"]
                     if t > killed and members == everyone) for killed in killed_at]
    waits = [a - k for a, k in zip(admitted, killed_at, strict=True)]
    print(f"\n{node_id(flaky)} crashed twice: re-admitted {waits[0]:.2f} s and {waits[1]:.2f} s "
          f"after each kill; node-00's record of it: {record}; max |param diff| vs one "
          f"process {difference:.2g}")
    assert record["removals"] == 2, record
    assert waits[0] >= 1.0 and waits[1] >= 2.0, waits


def test_after_total_failure_a_restart_resumes_from_the_last_checkpoint(reference, tmp_path):
    every = 10
    checkpoints = {node_id(i): str(tmp_path / f"checkpoints-{i}") for i in range(3)}
    first = tmp_path / "first"
    first.mkdir()
    cluster = _cluster(first, size=3, job="total", pace=0.1, checkpoints=checkpoints,
                       checkpoint_every=every).start()
    try:
        _wait(lambda: _progress(first, 0)["step"] >= every + 3, 40, f"step {every + 3}",
              cluster)
        for index in range(3):
            cluster.process(index).kill()
    finally:
        cluster.stop()
    # rank 0 records every finished step (progress.json) beside its checkpoints
    done = json.loads((Path(checkpoints[node_id(0)]) / "progress.json").read_text())["step"]
    assert every < done < 2 * every, f"killed after step {done}: no work to lose"
    second = tmp_path / "second"
    second.mkdir()
    results = _cluster(second, size=3, job="total", checkpoints=checkpoints,
                       checkpoint_every=every).start().results()
    difference = _assert_equals_reference(results, reference)
    for result in results:
        assert result["start"]["step"] == every, result["start"]
        assert result["lost"] == done - every <= every, (result["lost"], done)
    print(f"\nall 3 nodes killed after step {done}: the restart resumed from the checkpoint of "
          f"step {every}, reported {results[0]['lost']} steps lost (checkpoint interval "
          f"{every}); final max |param diff| vs failure-free {difference:.2g}")
