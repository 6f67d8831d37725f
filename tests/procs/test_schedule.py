"""Learning-rate schedules (ringtrain.train.schedule) in the Trainer across real node
processes: every member steps with the same learning rate, the one the schedule gives for the
run's progress before the step, and members that disagree on the schedule are refused."""

from __future__ import annotations

import numpy as np

from ringtrain.errors import ConfigError
from ringtrain.node.node import Node
from ringtrain.testing import run_local
from ringtrain.train.datasets import load_digits
from ringtrain.train.nn import Dense, Sequential, Tanh
from ringtrain.train.optim import SGD
from ringtrain.train.schedule import Cosine
from ringtrain.train.trainer import StepReport, Trainer

SAMPLES = 200
BATCH = 8
EPOCHS = 2
LR = 0.1
SCHEDULE = Cosine(floor=0.1)


def _data() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    return digits.x[:SAMPLES], digits.y[:SAMPLES]


def _model() -> Sequential:
    return Sequential(Dense(64, 16), Tanh(), Dense(16, 10), seed=1, dtype=np.float64)


def _train(node: Node, schedule: Cosine | None) -> dict:
    x, y = _data()
    model = _model()
    trainer = Trainer(node, model, SGD(model.params, lr=LR), x, y, batch_size=BATCH,
                      adaptive=False, lr_schedule=schedule)
    steps: list[tuple[float, float]] = []  # (learning rate, epochs done after the step)

    def record(report: StepReport) -> None:
        done = trainer.position.epoch + trainer.position.position / SAMPLES
        steps.append((trainer.optimizer.optimizer.lr, done))

    trainer.fit(EPOCHS, on_step=record)
    return {"steps": steps, "params": trainer.shared_params.copy(),
            "hash": trainer.version.content_hash}


def test_every_member_steps_with_the_learning_rate_of_the_runs_progress():
    results = run_local(_train, 3, args=(SCHEDULE,), timeout=60)
    steps = results[0]["steps"]
    done, expected = 0.0, []
    for _, done_after in steps:
        expected.append(LR * SCHEDULE.factor(done / EPOCHS))
        done = done_after
    assert done == EPOCHS  # the run covered exactly its epochs
    np.testing.assert_allclose([lr for lr, _ in steps], expected, rtol=1e-15)
    assert steps[0][0] == LR and LR * SCHEDULE.floor < steps[-1][0] < 0.02
    for other in results[1:]:
        assert other["steps"] == steps
        np.testing.assert_array_equal(other["params"], results[0]["params"])
        assert other["hash"] == results[0]["hash"]
    constant = run_local(_train, 3, args=(None,), timeout=60)
    assert {lr for lr, _ in constant[0]["steps"]} == {LR}
    assert not np.array_equal(constant[0]["params"], results[0]["params"])


def _one_member_decays(node: Node) -> str:
    x, y = _data()
    model = _model()
    try:
        Trainer(node, model, SGD(model.params, lr=LR), x, y, batch_size=BATCH,
                lr_schedule=SCHEDULE if node.rank == 1 else None)
    except ConfigError as exc:
        return str(exc)
    return "no error"


def test_members_with_different_schedules_are_refused_with_both_named():
    messages = run_local(_one_member_decays, 2, timeout=60)
    assert messages[0] == messages[1]
    assert "members disagree on lr_schedule: rank 0 (node-00) has 'None'" in messages[0]
    assert "Cosine(floor=0.1) 0.1" in messages[0]
