"""Training in rounds (ringtrain.train.rounds) across real node processes: DiLoCo against the
synchronous step, a SIGKILL in the middle of a round, asynchronous rounds with a stalled member.

The invariant the SIGKILL tests check, "no survivor's step is lost": every sample a survivor
stepped on lands in exactly one applied round. The rounds' total weight (``samples_total``,
the sum of every applied round's sample weights, identical on every member) is therefore, at
the end, the survivors' own stepped samples plus the victim's samples in the rounds applied
before it died, and nothing else; and the survivors hold one model (the same anchor, bit for
bit, and the same version hash). A survivor that dropped the steps it made in the round the
failure hit (as local SGD did before rounds) would fall short by them.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from ringtrain.config import Settings
from ringtrain.node.node import Node
from ringtrain.ring import runner
from ringtrain.testing import LocalCluster, node_id, run_local
from ringtrain.train.datasets import load_digits
from ringtrain.train.nn import Dense, Sequential, Tanh
from ringtrain.train.optim import SGD, Adam
from ringtrain.train.rounds import DiLoCo, Rounds
from ringtrain.train.trainer import Trainer

SAMPLES = 200
BATCH = 8
INNER = 4  # steps per round in the SIGKILL tests
SETTINGS = Settings(heartbeat_interval=0.25, heartbeat_timeout=2.0, reform_timeout=20.0,
                    form_timeout=30.0, collective_timeout=30.0, direct_bytes=0)
STALL = 0.2  # seconds one member stalls in every step in the asynchronous test


def _data() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    return digits.x[:SAMPLES], digits.y[:SAMPLES]


def _model(seed: int = 1) -> Sequential:
    return Sequential(Dense(64, 16), Tanh(), Dense(16, 10), seed=seed, dtype=np.float64)


# --- DiLoCo with H = 1 is synchronous training ------------------------------------------------

def _one_inner_step(node: Node, rounds: bool) -> dict:
    x, y = _data()
    # every member initialises its own model, as a script without a fixed seed does: the
    # ring starts from rank 0's (rounds once kept each member's own as its anchor)
    model = _model(seed=1 + node.rank)
    trainer = Trainer(node, model, SGD(model.params, lr=0.1), x, y, batch_size=BATCH,
                      adaptive=False, bucket_bytes=0,
                      rounds=DiLoCo(inner_steps=1, outer_lr=1.0, momentum=0.0, nesterov=False)
                      if rounds else None)
    trainer.fit(10, max_steps=30)
    return {"params": trainer.shared_params.copy(), "step": trainer.step_count,
            "position": (trainer.position.epoch, trainer.position.position),
            "hash": trainer.version.content_hash}


def test_diloco_with_one_inner_step_and_plain_outer_sgd_equals_synchronous_training():
    sync = run_local(_one_inner_step, 3, args=(False,), timeout=60)
    diloco = run_local(_one_inner_step, 3, args=(True,), timeout=60)
    for results in (sync, diloco):
        for other in results[1:]:
            np.testing.assert_array_equal(other["params"], results[0]["params"])
            assert other["hash"] == results[0]["hash"]
    assert diloco[0]["step"] == sync[0]["step"] == 30
    assert diloco[0]["position"] == sync[0]["position"]
    # the same update, computed as a mean of parameter changes instead of a mean of
    # gradients: equal up to float64 rounding (each change carries its update's rounding)
    difference = np.abs(diloco[0]["params"] - sync[0]["params"]).max()
    print(f"\nmax |DiLoCo(H=1) - synchronous| after 30 steps: {difference:.2g}")
    assert difference < 1e-12


# --- Streaming DiLoCo: the parameters synced in fragments, in turn ----------------------------

FRAGMENTS, STREAM_STEPS = 2, 12


def _streaming(node: Node) -> dict:
    x, y = _data()
    model = _model()
    trainer = Trainer(node, model, SGD(model.params, lr=0.1), x, y, batch_size=BATCH,
                      adaptive=False, rounds=DiLoCo(inner_steps=INNER, fragments=FRAGMENTS))
    batches = [trainer.step().indices.tolist() for _ in range(STREAM_STEPS)]
    trainer.rounds.finish()
    return {"batches": batches, "rank": node.rank, "anchor": trainer.shared_params.copy(),
            "rounds": trainer.rounds.rounds_done, "total": trainer.rounds.samples_total}


def _streaming_replay(batches: list[list[list[int]]]) -> np.ndarray:
    """Streaming DiLoCo computed in one process from each member's batches: every INNER /
    FRAGMENTS steps the next fragment's sample-weighted mean change takes a Nesterov step
    (lr 0.7, momentum 0.9) on that part of the anchor, and every member restarts that part
    from it; at the end each fragment syncs what it has left."""
    from ringtrain.train.nn import softmax_cross_entropy
    x, y = _data()
    members = [_model() for _ in batches]
    inner = [SGD(m.params, lr=0.1) for m in members]
    anchor, velocity = members[0].params.copy(), np.zeros_like(members[0].params)
    parts = [slice(a[0], a[-1] + 1) for a in np.array_split(np.arange(anchor.size), FRAGMENTS)]
    since = np.zeros((len(members), FRAGMENTS))  # samples since each fragment's last sync
    synced = 0

    def sync() -> None:
        nonlocal synced
        part, weights = parts[synced % FRAGMENTS], since[:, synced % FRAGMENTS].copy()
        synced += 1
        since[:, (synced - 1) % FRAGMENTS] = 0
        if weights.sum() == 0:
            return
        delta = sum(w * (anchor[part] - m.params[part])
                    for w, m in zip(weights, members, strict=True))
        delta /= weights.sum()
        velocity[part] = 0.9 * velocity[part] + delta
        anchor[part] -= 0.7 * (delta + 0.9 * velocity[part])
        for m in members:
            m.params[part] = anchor[part]

    for step in range(STREAM_STEPS):
        for m, optimizer, cut in zip(members, inner, (b[step] for b in batches), strict=True):
            _, grad_out = softmax_cross_entropy(m.forward(x[cut]), y[cut])
            m.backward(grad_out, input_grad=False)
            optimizer.step(m.grads)
            since[members.index(m)] += len(cut)
        if (step + 1) % (INNER // FRAGMENTS) == 0:
            sync()
    for _ in range(FRAGMENTS):
        sync()
    return anchor


def test_streaming_fragments_equal_the_rounds_computed_in_one_process():
    results = sorted(run_local(_streaming, 3, timeout=60), key=lambda r: r["rank"])
    for other in results[1:]:
        np.testing.assert_array_equal(other["anchor"], results[0]["anchor"])
    expected = _streaming_replay([r["batches"] for r in results])
    difference = np.abs(results[0]["anchor"] - expected).max()
    print(f"\nmax |streaming DiLoCo - its replay| after {STREAM_STEPS} steps: {difference:.2g}")
    assert difference < 1e-12
    # every sample in the first fragment's rounds once; one round per INNER / FRAGMENTS steps
    assert results[0]["total"] == sum(len(b) for r in results for b in r["batches"])
    assert results[0]["rounds"] == STREAM_STEPS // (INNER // FRAGMENTS) + FRAGMENTS


# --- a SIGKILL in the middle of a round ----------------------------------------------------

def _arm_suicide_in_next_all_reduce() -> dict:
    """SIGKILL this process half way through the receives of its next all_reduce."""
    original = runner.RingRunner.take_segment
    armed = {"on": False, "count": 0}

    def accept(self, collective, view, sequence, message, expected, *rest):
        original(self, collective, view, sequence, message, expected, *rest)
        if armed["on"] and collective.name == "all_reduce":
            armed["count"] += 1
            if armed["count"] >= max(1, len(collective.plan.receives) // 2):
                os.kill(os.getpid(), signal.SIGKILL)

    runner.RingRunner.take_segment = accept
    return armed


def _round_with_a_kill(node: Node, victim: str, kill_step: int, where: str,
                       fragments: int) -> dict:
    x, y = _data()
    model = _model()
    trainer = Trainer(node, model, Adam(model.params, lr=0.01), x, y, batch_size=BATCH,
                      adaptive=False, timeout=SETTINGS.collective_timeout, rejoin_timeout=40.0,
                      rounds=DiLoCo(inner_steps=INNER, fragments=fragments))
    armed = _arm_suicide_in_next_all_reduce() if node.node_id == victim else None
    stepped = 0
    while trainer.step_count < 4 * INNER:
        if armed is not None and trainer.step_count == kill_step - 1:
            if where == "inner steps":
                os.kill(os.getpid(), signal.SIGKILL)
            armed["on"] = True  # dies in the all-reduce that closes this round
        stepped += len(trainer.step().indices)
    trainer.rounds.finish()
    return {"node": node.node_id, "stepped": stepped, "anchor": trainer.shared_params.copy(),
            "hash": trainer.version.content_hash, "total": trainer.rounds.samples_total,
            "rounds": trainer.rounds.rounds_done, "members": node.members,
            "reforms": trainer.reforms}


@pytest.mark.parametrize("where,kill_step,fragments", [("inner steps", INNER + 2, 1),
                                                       ("all-reduce", 2 * INNER, 1),
                                                       ("inner steps", INNER + 2, 2)])
def test_sigkill_mid_round_loses_no_survivors_step(where, kill_step, fragments):
    victim = 1
    cluster = LocalCluster(_round_with_a_kill, 3,
                           args=(node_id(victim), kill_step, where, fragments), timeout=90.0,
                           job=f"rounds-kill-{kill_step}-{fragments}", settings=SETTINGS)
    results = cluster.start().results(allow_failed=[victim])
    assert results[victim] is None, "the victim was not killed"
    survivors = [r for r in results if r is not None]
    for other in survivors[1:]:
        np.testing.assert_array_equal(other["anchor"], survivors[0]["anchor"])
        assert (other["hash"], other["total"], other["rounds"]) == \
            (survivors[0]["hash"], survivors[0]["total"], survivors[0]["rounds"])
    assert all(r["reforms"] >= 1 and len(r["members"]) == 2 for r in survivors)
    # the victim's steps that landed: its rounds applied before it died (one round of
    # INNER steps; in the all-reduce case maybe the round it died in, if a survivor
    # completed that round before the failure reached it; with two fragments, the first
    # fragment's rounds, which hold every step once: the one after step INNER / 2)
    landed = survivors[0]["total"] - sum(r["stepped"] for r in survivors)
    allowed = {INNER * BATCH // fragments} if where == "inner steps" else \
        {INNER * BATCH, 2 * INNER * BATCH}
    print(f"\nSIGKILL in the {where} at step {kill_step}: survivors stepped "
          f"{[r['stepped'] for r in survivors]} samples, rounds hold {survivors[0]['total']}; "
          f"the victim's samples in them: {landed}")
    assert landed in allowed, f"survivors' samples lost or counted twice: {landed}"


# --- asynchronous rounds with a stalled member ---------------------------------------------

class _Stalling(Trainer):
    """Rank 2 stalls STALL seconds in every step (below the ring's progress deadline, so it
    stays a member): a device far slower than the others."""

    def compute_gradients(self, x, y):
        if self.node.rank == 2:
            time.sleep(STALL)
        return super().compute_gradients(x, y)


def _asynchronous(node: Node, rounds: DiLoCo) -> dict:
    x, y = _data()
    model = _model()
    trainer = _Stalling(node, model, Adam(model.params, lr=0.01), x, y, batch_size=BATCH,
                        adaptive=False, rounds=rounds)
    stepped = [0]

    def on_step(report) -> None:
        stepped[0] += len(report.indices)

    # lockstep: 18 steps each; asynchronous: 18 global batches of samples in all
    trainer.fit(10, on_step=on_step, max_steps=6 * 3)
    return {"steps": trainer.step_count, "stepped": stepped[0],
            "anchor": trainer.shared_params.copy(), "total": trainer.rounds.samples_total,
            "rounds": trainer.rounds.rounds_done}


def test_asynchronous_rounds_keep_the_others_stepping_while_one_member_stalls():
    lockstep = run_local(_asynchronous, 3, args=(DiLoCo(inner_steps=3, overlap=True),),
                         timeout=90)
    results = run_local(_asynchronous, 3, args=(DiLoCo(round_seconds=3 * STALL,
                                                       compression="int4"),), timeout=90)
    steps = [r["steps"] for r in results]
    print(f"\nrank 2 stalls {STALL} s per step; steps per member: lockstep rounds "
          f"{[r['steps'] for r in lockstep]}, asynchronous {steps} in {results[0]['rounds']} "
          f"rounds")
    # lockstep (overlapped: one round in flight): the others wait for rank 2 every round
    assert [r["steps"] for r in lockstep] == [18, 18, 18]
    # asynchronous: the others step on while rank 2 stalls (about 3 steps per round)
    assert min(steps[:2]) >= 4 * steps[2]
    for run in (lockstep, results):
        for other in run[1:]:
            np.testing.assert_array_equal(other["anchor"], run[0]["anchor"])
            assert other["total"] == run[0]["total"]
        # every member's steps, the stalled one's included, landed in the rounds
        assert run[0]["total"] == sum(r["stepped"] for r in run)


# --- compressed rounds of very different weights ------------------------------------------

def _rounds_of_unequal_weight(node: Node) -> dict:
    params = np.zeros(1000, np.float32)
    rounds = Rounds(node, params, SGD(params, lr=1.0),
                    DiLoCo(inner_steps=1, outer_lr=1.0, momentum=0.0, compression="int4"))
    moves = np.random.default_rng(node.rank).standard_normal(params.size).astype(np.float32)
    rounds.inner_step(moves, 1000, 0.0, 1, 3)  # a long round: 1000 samples each
    rounds.advance()
    first = rounds.anchor.copy()
    rounds.inner_step(np.zeros_like(params), 1, 0.0, 2, 3)  # a short one that moves nothing
    rounds.advance()
    return {"first": first, "second": rounds.anchor.copy(), "moves": moves}


def test_a_short_compressed_round_after_a_long_one_does_not_amplify_the_left_out_error():
    """Error feedback owes the next round what int4 left out of this one, as a share of the
    mean. A round of 3 samples after one of 3,000 must move the model by about that error
    (half an int4 level at each of the ring's three encodings, ~0.4 here), not by it times
    3,000 / 3 (carried as a part of the weighted sum, the residual was divided by the short
    round's weight)."""
    results = run_local(_rounds_of_unequal_weight, 3, timeout=60)
    exact = -np.mean([r["moves"] for r in results], axis=0)
    bound = 3 * np.abs(exact).max() / 7 / 2  # half an int4 level, three encodings
    for r in results:
        assert np.abs(r["first"] - exact).max() <= bound  # round 1: int4 of the mean
        moved = np.abs(r["second"] - r["first"]).max()
        assert moved <= bound, f"a round of 3 samples moved the model by {moved:.3g}"
        np.testing.assert_array_equal(r["second"], results[0]["second"])
