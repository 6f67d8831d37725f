"""Elastic recovery and checkpoints of the :class:`~ringtrain.train.trainer.Trainer`.

Re-forming. When a step fails (a member died) or the members agreed to re-form (a joiner, a
suspect, a leave), every member calls :meth:`Recovery.reform`: the ring re-forms, then every
member adopts the state of the member furthest ahead (most steps, or with rounds most rounds
completed; the lowest rank among equals). A member that finished a step the others abandoned
thus passes on that step's result, so no step is lost or applied twice; a joiner receives
everything it needs. With rounds (:mod:`ringtrain.train.rounds`) a member keeps the inner
steps it made that are not in the adopted anchor, so nothing a survivor computed is lost.

Checkpoints (``checkpoint_dir``). Rank 0 saves an atomic checkpoint (the shared parameters,
optimizer state, step, epoch, data position, generation; with rounds also the outer state and
the round count) every ``checkpoint_every`` steps; members are identical then, so one copy is
the state of all. Rank 0 also records the last finished step in ``progress.json`` (best
effort, no fsync). At start, every member looks for the newest checkpoint in its own
``checkpoint_dir``; the member with the highest step (lowest rank on ties) loads it and
broadcasts it, so every member resumes from the same state, and the log reports the steps done
after that checkpoint and lost.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from ..errors import ConfigError, MembershipError, PeerFailedError, RingtrainError
from ..models import architecture
from . import checkpoint
from .sharding import DataPosition

if TYPE_CHECKING:
    from .rounds import Rounds
    from .trainer import Trainer

__all__ = ["LeftRing", "PROGRESS_FILE", "REFORM_ROUND", "Recovery"]

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
REFORM_ROUND = 2.0  # seconds per attempt to re-form; attempts repeat until rejoin_timeout
OUTER_PREFIX = "outer."  # checkpoint keys of the round state beside the inner optimizer's
R = TypeVar("R")


class LeftRing(RingtrainError):
    """This node left the ring on request (:meth:`Trainer.request_leave`) before it could
    finish a step; :meth:`Trainer.fit` catches it and returns."""


class Recovery:
    """Re-forming, state transfer and checkpoints for one trainer.

    Args:
        trainer: the trainer whose state this moves.
        rejoin_timeout: how long :meth:`reform` waits for a ring before giving up.
    """

    def __init__(self, trainer: Trainer, rejoin_timeout: float):
        self.trainer = trainer
        self.rejoin_timeout = rejoin_timeout
        self.reforms = 0
        """How many times the ring re-formed under this trainer (failures, joins, leaves)."""
        self.lost_steps = 0
        """Steps that had been done after the checkpoint this run resumed from, and were lost."""
        self.parent_version = ""
        """The content hash of the last checkpoint saved or resumed from: the parent of the
        next one (``ringtrain models``)."""
        self.generation = trainer.node.generation
        """The generation of the last state sync (or of the start)."""

    def start(self, joining: bool) -> None:
        """The state training starts from (collectives): a joiner adopts the ring's; a new
        ring runs the start-up agreement and takes rank 0's state, then resumes from the
        newest checkpoint any member holds, if it keeps checkpoints. A member failing
        meanwhile re-forms the ring and syncs state, as after a failed step."""
        trainer = self.trainer
        if joining:
            try:
                self.sync_state()
            except PeerFailedError as exc:  # the ring changed again while admitting us
                log.warning("state sync after joining failed (%s); re-forming", exc)
                self.reform()
            return
        try:
            trainer.optimizer.start()
            if trainer.rounds is not None:
                trainer.rounds.begin()
        except PeerFailedError as exc:  # a member failed (or was starved) at the start
            log.warning("rank %d: the start failed (%s); re-forming the ring",
                        trainer.node.rank, exc)
            self.reform()
        if trainer.checkpoint_dir is not None:
            self.resume(trainer.checkpoint_dir)

    def reform(self) -> None:
        """Re-form the ring, then make every member's state that of the most advanced one.

        Raises:
            MembershipError: no ring re-formed within ``rejoin_timeout``.
            LeftRing: this node was asked to leave while no ring could form.
        """
        trainer = self.trainer
        deadline = time.monotonic() + self.rejoin_timeout
        waited = False
        while True:
            try:
                # short rounds, so a request to leave is noticed while no ring can form
                view = trainer.node.reform(timeout=max(1.0, min(REFORM_ROUND,
                                                                deadline - time.monotonic())))
                self.reforms += 1
                log.info("rank %d: ring re-formed as generation %d with %d members",
                         view.rank, view.generation, view.world_size)
                trainer.optimizer.clear_feedback()
                self.sync_state()
                return
            except PeerFailedError as exc:
                log.warning("another failure while re-forming (%s); trying again", exc)
            except MembershipError as exc:
                if time.monotonic() >= deadline:
                    raise
                if not waited:
                    log.warning("waiting for the ring to re-form (up to %.0f s): %s",
                                self.rejoin_timeout, exc)
                    waited = True
            if trainer.leaving:  # asked to leave while no ring could form: just go
                raise LeftRing(f"left the ring on request at step {trainer.step_count}, "
                               f"while it was re-forming")

    def step_until_done(self, run_step: Callable[[], R]) -> R:
        """Run a synchronous step until it is done. If a member fails during it, the ring
        re-forms without it and the survivors do the step again (nothing partial was
        applied); if members asked for a change (a joiner, a leave), the ring re-forms after
        the step, at the same point on every member. Returns what ``run_step`` returned."""
        trainer = self.trainer
        while True:
            try:
                report = run_step()
            except PeerFailedError as exc:
                log.warning("rank %d: step %d failed (%s); re-forming the ring and redoing it",
                            trainer.node.rank, trainer.step_count + 1, exc)
                self.reform()
                self._event("step-redone", f"step {trainer.step_count + 1} redone on "
                            f"generation {trainer.node.generation} ({trainer.node.world_size} "
                            f"members) after: {exc}", step=trainer.step_count + 1,
                            cause=str(exc), suspect=exc.peer)
                continue
            if trainer.optimizer.reform_agreed and not trainer.optimizer.leave_announced:
                self.reform()
            return report

    def advance_round(self, rounds: Rounds) -> None:
        """After an inner step: the round's all-reduce and outer step when it is due. If a
        member fails, the ring re-forms and the all-reduce is redone over the survivors,
        keeping this member's inner steps; an agreed change re-forms after the round."""
        trainer = self.trainer
        while True:
            try:
                if trainer.node.generation != self.generation:
                    # the others re-formed while this member stepped alone (overlapped
                    # rounds): join them before the next collective
                    raise PeerFailedError(f"the ring re-formed as generation "
                                          f"{trainer.node.generation} meanwhile")
                if rounds.advance() and rounds.reform_agreed and not rounds.leave_announced:
                    self.reform()
                return
            except PeerFailedError as exc:
                log.warning("rank %d: round %d failed (%s); re-forming the ring, keeping this "
                            "member's steps (%d samples not in an applied round)",
                            trainer.node.rank, rounds.rounds_done + 1, exc, rounds.unapplied)
                self.reform()

    def share_speeds(self) -> None:
        """Exchange the members' throughputs (the speed policy); if a member fails, the step
        itself is done: just re-form."""
        trainer = self.trainer
        try:
            trainer.speed.share(trainer.node, trainer.optimizer.timeout)
        except PeerFailedError as exc:
            log.warning("rank %d: sharing speeds failed (%s); re-forming", trainer.node.rank,
                        exc)
            self.reform()

    def sync_state(self) -> None:
        """After a membership change: every member adopts the state of the member furthest
        ahead (a collective; module docstring)."""
        trainer = self.trainer
        rounds = trainer.rounds
        ahead = trainer.step_count if rounds is None else rounds.rounds_done
        joined = trainer.node.joined_running_ring and trainer.fresh
        mine = np.array([-1 if joined else ahead, trainer.step_count, trainer.position.epoch,
                         trainer.position.position,
                         0 if rounds is None else rounds.inner_steps], dtype=np.int64)
        gathered = trainer.node.all_gather(mine, timeout=trainer.optimizer.timeout)
        root = int(np.argmax(gathered[:, 0]))
        if rounds is None:
            trainer.optimizer.broadcast_state(root)
            trainer.step_count = int(gathered[root, 1])
            trainer.position = DataPosition(int(gathered[root, 2]), int(gathered[root, 3]))
        else:
            rounds.adopt(root, joined=joined)
            if joined and not rounds.settings.asynchronous:
                trainer.step_count = int(gathered[root, 1])
                trainer.position = DataPosition(int(gathered[root, 2]), int(gathered[root, 3]))
                rounds.inner_steps = int(gathered[root, 4])
        trainer.fresh = False
        self.generation = trainer.node.generation
        trainer.optimizer.steps = trainer.step_count
        trainer.speed.forget()  # the members changed: measure again

    # checkpoints ------------------------------------------------------------------------------

    def shared_state(self) -> dict[str, np.ndarray | int | float]:
        """The optimizer state a checkpoint keeps: the optimizer's, and with rounds also
        the outer optimizer's and the round count (keys prefixed ``outer.``)."""
        trainer = self.trainer
        state = trainer.optimizer.optimizer.state_dict()
        if trainer.rounds is not None:
            state.update({OUTER_PREFIX + k: v for k, v in trainer.rounds.outer_state().items()})
        return state

    def load_shared(self, params: np.ndarray, state: Mapping[str, np.ndarray | int | float]
                    ) -> None:
        """Load what ``Trainer.shared_params`` and :meth:`shared_state` were (a checkpoint)."""
        trainer = self.trainer
        inner = {k: v for k, v in state.items() if not k.startswith(OUTER_PREFIX)}
        trainer.model.load_params(params)
        trainer.optimizer.optimizer.load_state_dict(inner)
        if trainer.rounds is not None:
            trainer.rounds.load_outer(params, {k[len(OUTER_PREFIX):]: v for k, v in
                                               state.items() if k.startswith(OUTER_PREFIX)})

    def save_checkpoint(self) -> Path:
        """Write this node's shared state to ``checkpoint_dir`` atomically; returns the file.

        Raises:
            ConfigError: the trainer has no ``checkpoint_dir``.
            CheckpointError: the file could not be written.
        """
        trainer = self.trainer
        if trainer.checkpoint_dir is None:
            raise ConfigError("save_checkpoint needs a Trainer with a checkpoint_dir")
        state = checkpoint.TrainingState(
            params=trainer.shared_params.copy(), optimizer_state=self.shared_state(),
            step=trainer.step_count, epoch=trainer.position.epoch,
            position=trainer.position.position, generation=trainer.node.generation,
            metadata={"model": trainer.model.schema_hash(),
                      "world_size": trainer.node.world_size, "job": trainer.node.job,
                      "parent": self.parent_version, **architecture.describe(trainer.model)})
        path = checkpoint.save(trainer.checkpoint_dir, state)
        self.parent_version = checkpoint.content_hash(state.params, state.optimizer_state)
        self._event("checkpoint", f"checkpoint written: step {trainer.step_count} to {path}",
                    step=trainer.step_count, path=str(path))
        return path

    def checkpoint_if_due(self) -> None:
        """After a step, at a point every member reaches alike: rank 0 saves a checkpoint
        every ``checkpoint_every`` steps (the others note its hash, the parent of the next)
        and records its progress."""
        trainer = self.trainer
        if trainer.checkpoint_dir is None:
            return
        due = trainer.step_count % trainer.checkpoint_every == 0
        if trainer.node.rank != 0:
            if due:
                self.parent_version = trainer.version.content_hash  # what rank 0 saves now
            return
        if due:
            self.save_checkpoint()
        self.write_progress(trainer.checkpoint_dir)

    def resume(self, directory: Path) -> None:
        """Every member resumes from the newest checkpoint any member holds (a collective).

        Raises:
            ConfigError: that checkpoint does not fit the model.
            CheckpointError: this node's newest checkpoint cannot be read.
        """
        trainer = self.trainer
        path = checkpoint.latest(directory)
        state = None if path is None else checkpoint.load(path)
        offered = np.array([-1 if state is None else state.step], dtype=np.int64)
        steps = trainer.node.all_gather(offered, timeout=trainer.optimizer.timeout)[:, 0]
        if int(steps.max()) < 0:
            return
        root = int(np.argmax(steps))
        meta = np.zeros(4, dtype=np.int64)
        if trainer.node.rank == root and state is not None:
            if state.params.shape != trainer.model.params.shape:
                raise ConfigError(f"checkpoint {path} holds {state.params.size} parameters, "
                                  f"the model has {trainer.model.num_params}")
            self.load_shared(state.params, state.optimizer_state)
            done = self._read_progress(directory)
            meta[:] = (state.step, state.epoch, state.position, max(0, done - state.step))
        if trainer.rounds is None:
            trainer.optimizer.broadcast_state(root)
        else:
            trainer.rounds.adopt(root, joined=True)
        meta = trainer.node.broadcast(meta, root, timeout=trainer.optimizer.timeout)
        trainer.step_count, epoch, position, self.lost_steps = (int(v) for v in meta)
        trainer.position = DataPosition(epoch, position)
        trainer.optimizer.steps = trainer.step_count
        self.parent_version = trainer.version.content_hash
        log.info("rank %d resumed from the checkpoint of rank %d at step %d (epoch %d, "
                 "position %d), now %s; lost work: %d steps done after that checkpoint",
                 trainer.node.rank, root, trainer.step_count, epoch, position, trainer.version,
                 self.lost_steps)

    def write_progress(self, directory: Path) -> None:
        """Record the last finished step (best effort, no fsync: it only tells a resumed run
        how much work was lost)."""
        temporary = directory / f".{PROGRESS_FILE}.tmp"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps({"step": self.trainer.step_count}))
            os.replace(temporary, directory / PROGRESS_FILE)
        except OSError as exc:
            log.warning("could not record progress in %s: %s", directory, exc)

    def _event(self, kind: str, message: str, **fields: object) -> None:
        """One line for people (the node's flight recorder logs it as an event; observe)."""
        recorder = getattr(self.trainer.node, "recorder", None)
        if recorder is not None:
            recorder.event(kind, message, **fields)

    @staticmethod
    def _read_progress(directory: Path) -> int:
        try:
            return int(json.loads((directory / PROGRESS_FILE).read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0
