"""Elastic training with the ``ringtrain`` backend: when a device dies or joins, the script
carries on with the new ring, from the last step, with no person restarting anything.

A torch process group's world is fixed, so a change of the ring ends the group: its
collectives fail (in DDP, ``loss.backward()`` raises). :func:`run` catches that, agrees on the
new ring with the survivors (and any device waiting to join), makes a new default process
group over it, puts the model back to its last committed step, copies the most advanced
member's committed state to everyone, and calls the training function again::

    state = elastic.State(model, optimizer, epoch=0, step=0, position=0)

    def train(state):
        ddp = DDP(state.model)                     # the current ring
        sampler = elastic.ElasticSampler(len(dataset))
        while state.epoch < epochs:
            sampler.set_epoch(state.epoch, state.position)
            for x, y in DataLoader(dataset, batch_size=32, sampler=sampler):
                ...forward, backward, optimizer.step()...
                state.position += 32 * dist.get_world_size()
                state.step += 1
                state.commit()                     # a step no change of the ring can undo
            state.epoch, state.position = state.epoch + 1, 0
            state.commit()

    elastic.run(train, state)

Steps lost: none. :meth:`State.commit` after every optimizer step keeps that step (a copy in
memory); a failure rolls every survivor back only to its last commit, then all take the state
of the member that committed most, so a step any survivor completed is kept, and the step in
flight is redone on the new ring over the same place in the data (:class:`ElasticSampler`
re-cuts the epoch's remaining samples among the new members: none skipped, none repeated).
Commit less often (a big model) and up to that many steps are redone.

Joins: ``commit`` (every ``check_every`` commits) agrees with the members, by one small
all-reduce, whether a device waits to join; if one does, every member re-forms the ring at
that same step and the newcomer receives the state. WORLD_SIZE, RANK and GROUP_RANK in
``os.environ`` follow the ring (torchrun restarts every worker instead).

DiLoCo (``State(model, optimizer, outer=DiLoCo(model, ..., broadcast=False))``): members
differ within a round by design, so only the outer state is the ring's: the anchor, the outer
optimizer and the round count come from the member that applied the most rounds (then
committed most). The model, the inner optimizer and the counters stay each member's own, as
committed: a failure mid-round costs only the failed member's steps of that round, and the
survivors redo the round's all-reduce among themselves. A member behind by the round that a
survivor completed as the failure hit, and a joiner, start the next round from the new
anchor (the behind member's steps are in it). Joins are checked at round ends only.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from ...errors import ConfigError, MembershipError, RingtrainError
from ...node.launch import torchrun_environment
from .backend import BACKEND, process_node
from .diloco import DiLoCo
from .process_group import RingtrainProcessGroup, _put, _wire

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_SKELETON_BYTES = 64 << 20  # the JSON outline of a state: bounded, as any peer input


class RingChanged(RingtrainError):
    """A device waits to join: every member re-forms the ring at this commit."""


class State:
    """The training state that survives a change of the ring: a model, an optimizer (either
    may be None), a torch :class:`~.diloco.DiLoCo` (``outer``, optional) and named counters
    (``State(model, opt, step=0)``; ``state.step += 1``).

    Counters hold JSON values (numbers, strings, lists, dicts). ``commit`` keeps a copy in
    memory; ``restore`` goes back to it; ``sync`` gives every member the state of the one
    that committed most (with ``outer``: only the outer state, module docstring).

    Raises:
        ConfigError: ``outer`` was made with ``broadcast=True`` (a joiner would broadcast
            alone while the members train).
    """

    def __init__(self, model: torch.nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None, *, outer: DiLoCo | None = None,
                 check_every: int = 1, **counters: Any):
        if outer is not None and outer.broadcast:
            raise ConfigError("elastic.State needs DiLoCo(..., broadcast=False): the state "
                              "aligns the members itself, and a device that joins later "
                              "would otherwise broadcast alone")
        object.__setattr__(self, "_fields", {"model": model, "optimizer": optimizer,
                                             "outer": outer, "counters": dict(counters),
                                             "commits": 0, "check_every": check_every,
                                             "saved": None})
        self.commit(check=False)

    def __getattr__(self, name: str) -> Any:
        fields = object.__getattribute__(self, "_fields")
        if name in ("model", "optimizer", "outer", "commits"):
            return fields[name]
        try:
            return fields["counters"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("model", "optimizer", "outer", "commits"):
            raise AttributeError(f"State.{name} is fixed")
        self._fields["counters"][name] = value

    def commit(self, check: bool = True) -> None:
        """Keep the current state as the one a failure goes back to; then (every
        ``check_every`` commits) raise :class:`RingChanged` on every member if a device waits
        to join (all members agree, by a small all-reduce)."""
        fields = self._fields
        if dist.is_initialized():
            group = dist.distributed_c10d._get_default_group()
            if isinstance(group, RingtrainProcessGroup):
                group._check_ring()  # a step whose all-reduce failed is never committed
        fields["commits"] += 1
        fields["saved"] = copy.deepcopy(self._snapshot())
        mid_round = fields["outer"] is not None and fields["outer"].steps > 0
        if check and not mid_round and fields["commits"] % fields["check_every"] == 0:
            node = process_node()
            waiting = node.all_reduce(np.array([int(node.reform_due)], dtype=np.int8), "max")
            if waiting[0]:
                raise RingChanged("a device waits to join the ring")

    def restore(self) -> None:
        """Back to the last commit."""
        self._load(copy.deepcopy(self._fields["saved"]))

    def sync(self) -> int:
        """Every member takes the committed state of the member that committed most (lowest
        rank among equals); with ``outer``, the outer state of the member that applied the
        most rounds. Returns that member's rank. A collective of the current ring."""
        node = process_node()
        fields = self._fields
        outer: DiLoCo | None = fields["outer"]
        rounds = outer.rounds_done if outer is not None else 0
        progress = node.all_gather(np.array([rounds, fields["commits"]], dtype=np.int64))
        donor = max(range(len(progress)), key=lambda r: (*progress[r], -r))
        if outer is None:
            state = _broadcast_value(node, donor, fields["saved"])
            self._load(state)
        else:
            shared = _broadcast_value(node, donor, fields["saved"]["outer"])
            behind = outer.rounds_done < shared["rounds"] or outer.steps == 0
            outer.load_state_dict({**shared, "steps": outer.steps})
            if behind:  # a joiner, or behind by a round that holds its steps
                outer.restart_round()
        fields["saved"] = copy.deepcopy(self._snapshot())
        fields["commits"] = int(progress[:, 1].max())
        return donor

    def _snapshot(self) -> dict[str, Any]:
        fields = self._fields
        return {"model": None if fields["model"] is None else fields["model"].state_dict(),
                "optimizer": None if fields["optimizer"] is None else
                fields["optimizer"].state_dict(), "counters": fields["counters"],
                "outer": None if fields["outer"] is None else fields["outer"].state_dict()}

    def _load(self, state: dict[str, Any]) -> None:
        fields = self._fields
        if fields["model"] is not None:
            fields["model"].load_state_dict(state["model"])
        if fields["optimizer"] is not None:
            fields["optimizer"].load_state_dict(state["optimizer"])
        if fields["outer"] is not None:
            fields["outer"].load_state_dict(state["outer"])
        fields["counters"] = dict(state["counters"])


def run(train: Callable[[State], T], state: State) -> T:
    """Run ``train(state)`` on the ring, and again on the new ring whenever the ring changes
    (a member died, or a device joins), from the last committed state. Other errors pass."""
    group, reason, first, mine = _group(), "", True, 0
    while True:
        try:
            if reason:
                group = _reinitialise(reason, group.generation)
                state.restore()
            if first or reason:
                donor = state.sync()  # a joiner's state, too, comes from the ring here
            if reason:
                node = process_node()
                print(f"ringtrain elastic: ring changed ({reason}); now rank {node.rank} of "
                      f"{node.world_size}, generation {node.generation}; "
                      f"{_resumed(state, donor, mine)}", flush=True)
            first, reason = False, ""
            return train(state)
        except Exception as exc:  # noqa: BLE001 - only ring changes are handled, see below
            if not _ring_changed(exc, group):
                raise
            reason = str(exc).strip().splitlines()[-1][:200] or type(exc).__name__
            mine = max(mine, state.commits) if not first else state.commits
            first = False


class ElasticSampler(torch.utils.data.Sampler):
    """Indices for this rank: the epoch's shuffled samples from ``position`` on, in global
    batches of ``batch_size`` x world size, each cut in rank order (rank r gets the r-th
    ``batch_size``); an incomplete last global batch is dropped. After a change of the ring
    the remaining samples are re-cut among the new members: none skipped, none repeated.

    Args:
        length: the dataset's length.
        batch_size: samples per rank per step (the DataLoader's ``batch_size``).
        seed: the shuffle's seed (the same on every member).
    """

    def __init__(self, length: int, batch_size: int, seed: int = 0, shuffle: bool = True):
        self.length, self.batch_size, self.seed, self.shuffle = length, batch_size, seed, shuffle
        self.epoch, self.position = 0, 0

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        """Start ``epoch`` at ``position`` samples already trained on."""
        self.epoch, self.position = epoch, position

    def _mine(self) -> list[int]:
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(
            self.seed + self.epoch)) if self.shuffle else torch.arange(self.length)
        rank, size = dist.get_rank(), dist.get_world_size()
        step = self.batch_size * size
        remaining = order[self.position:]
        whole = len(remaining) // step * step
        return remaining[:whole].reshape(-1, size, self.batch_size)[:, rank].reshape(-1).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self._mine())

    def __len__(self) -> int:
        return len(self._mine())


def _resumed(state: State, donor: int, mine: int) -> str:
    """What a member took from the ring and kept of its own, for the line after a re-form."""
    if state.outer is None:
        return (f"resumed at commit {state.commits} from rank {donor} (this member had "
                f"{mine}: 0 steps lost)")
    outer = state.outer
    return (f"resumed round {outer.rounds_done + 1} after this member's inner step "
            f"{outer.steps} of {outer.inner_steps}, with rank {donor}'s outer state (0 of this "
            f"member's steps lost)")


def _broadcast_value(node: Any, donor: int, value: Any) -> Any:
    """``value`` (tensors inside JSON-like containers) as member ``donor`` holds it, on every
    member: its outline as JSON, then each tensor. A collective of the current ring."""
    tensors: list[torch.Tensor] = []
    outline = json.dumps(_outline(value, tensors)).encode() if node.rank == donor else b""
    size = int(node.broadcast(np.array([len(outline)], dtype=np.int64), donor)[0])
    if not 0 < size <= MAX_SKELETON_BYTES:
        raise MembershipError(f"member {donor} sent a state outline of {size} bytes")
    text = node.broadcast(np.frombuffer(outline, dtype=np.uint8) if outline else
                          np.zeros(size, dtype=np.uint8), donor).tobytes()
    shapes: list[tuple[list[int], str]] = []
    skeleton = json.loads(text)
    _collect_tensors(skeleton, shapes)
    if node.rank != donor:
        tensors = [torch.empty(shape, dtype=getattr(torch, dtype)) for shape, dtype in shapes]
    for tensor in tensors:
        wire = _wire(tensor)
        _put(tensor, wire, node.broadcast(wire.numpy(), donor))
    return _inflate(skeleton, tensors)


def _group() -> RingtrainProcessGroup:
    if not dist.is_initialized():
        raise RingtrainError("elastic.run needs init_process_group('ringtrain') first")
    group = dist.distributed_c10d._get_default_group()
    if not isinstance(group, RingtrainProcessGroup):
        raise RingtrainError(f"elastic.run needs the ringtrain backend, not "
                             f"{dist.get_backend()}")
    return group


def _ring_changed(exc: BaseException, group: RingtrainProcessGroup) -> bool:
    return isinstance(exc, RingtrainError) or group.failure is not None \
        or group.node.generation != group.generation


def _reinitialise(reason: str, failed: int) -> RingtrainProcessGroup:
    """Re-form the ring (drop the failed, admit the waiting), then a new default process
    group over it; torchrun's variables follow."""
    node = process_node()
    log.warning("ringtrain elastic: %s; re-forming the ring", reason)
    init_method = dist.distributed_c10d._default_pg_init_method
    dist.destroy_process_group()
    gc.collect()  # the old DDP's reducer and its autograd hooks go with it
    node.reform(since=failed)  # a ring the others re-formed already is taken as it is
    os.environ.update(torchrun_environment(node))
    dist.init_process_group(BACKEND, init_method=init_method)
    return _group()


def _outline(value: Any, tensors: list[torch.Tensor]) -> Any:
    """``value`` as JSON, each tensor replaced by its index in ``tensors``, shape and dtype."""
    if isinstance(value, torch.Tensor):
        tensors.append(value.detach().cpu())
        return {"tensor": len(tensors) - 1, "shape": list(value.shape),
                "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, dict):
        return {"dict": [[_outline(k, tensors), _outline(v, tensors)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return {"list" if isinstance(value, list) else "tuple":
                [_outline(v, tensors) for v in value]}
    if value is None or isinstance(value, bool | int | float | str):
        return {"value": value}
    raise RingtrainError(f"elastic.State cannot carry a {type(value).__name__}")


def _collect_tensors(outline: Any, shapes: list[tuple[list[int], str]]) -> None:
    if "tensor" in outline:
        if outline["tensor"] != len(shapes) or not hasattr(torch, outline["dtype"]):
            raise MembershipError(f"bad tensor in a state outline: {outline}")
        shapes.append((outline["shape"], outline["dtype"]))
    for key in ("dict", "list", "tuple"):
        for item in outline.get(key, []):
            for part in item if key == "dict" else [item]:
                _collect_tensors(part, shapes)


def _inflate(outline: Any, tensors: list[torch.Tensor]) -> Any:
    if "tensor" in outline:
        return tensors[outline["tensor"]]
    if "dict" in outline:
        return {_inflate(k, tensors): _inflate(v, tensors) for k, v in outline["dict"]}
    if "list" in outline:
        return [_inflate(v, tensors) for v in outline["list"]]
    if "tuple" in outline:
        return tuple(_inflate(v, tensors) for v in outline["tuple"])
    return outline["value"]
