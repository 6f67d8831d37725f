"""DiLoCo for torch scripts: train a plain (not DDP-wrapped) model with any optimizer on every
member, and every ``inner_steps`` steps average how far the members moved and take one outer
step on the shared model::

    dist.init_process_group("ringtrain")         # or any backend: gloo works too
    outer = DiLoCo(model, inner_steps=10, outer_lr=1.0, momentum=0.0, compression="int4")
    for x, y in loader:                           # this member's own batches
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        outer.step()                              # a round's end: one all-reduce, outer step

The round is the numpy Trainer's (:mod:`ringtrain.train.rounds`): the pseudo-gradient
``anchor - params`` is averaged over the group (each member counts alike, as DDP's equal
batches do), the outer SGD (Nesterov momentum by default, as in Douillard et al. 2023) steps
the anchor, and every member continues from the new anchor. With ``inner_steps=1``, inner
SGD and ``outer_lr=1.0`` without momentum, this is DDP's gradient average applied as a
parameter average. ``compression`` sends the pseudo-gradient through a ring codec (``int4``:
an eighth of the bytes, with error feedback); it needs the ``ringtrain`` backend.

Elastic: ``elastic.State(model, optimizer, outer=outer)`` carries it across a change of the
ring (make it with ``broadcast=False``: the state aligns the members, a joiner included). The
anchor, the outer optimizer and the round count are the ring's; the model, the inner optimizer
and the steps of the round so far are each member's own, so a member that fails mid-round
costs only its own steps (:mod:`.elastic`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ...errors import ConfigError
from ...ring.compression import Codec, get_codec
from .process_group import RingtrainProcessGroup


class DiLoCo:
    """The outer loop of DiLoCo around a model's own optimizer (module docstring).

    Args:
        model: the model every member trains; its parameters become rank 0's here.
        inner_steps: inner optimizer steps per round (H), a positive integer.
        outer_lr: the outer SGD's learning rate.
        momentum: the outer SGD's momentum (0: none).
        nesterov: Nesterov momentum (ignored without momentum).
        compression: a ring codec name for the pseudo-gradient (``int4``, ``int8``, ...) or
            None; a codec needs the ``ringtrain`` backend.
        group: the process group (default: the default group at each round, so a new one
            after an elastic re-form).
        broadcast: start every member from rank 0's parameters now (a collective). False
            under ``elastic.State``, which aligns the members when ``elastic.run`` starts.

    Raises:
        ConfigError: a bad argument, or a codec without the ``ringtrain`` backend.
    """

    def __init__(self, model: torch.nn.Module, inner_steps: int = 10, outer_lr: float = 0.7,
                 momentum: float = 0.9, nesterov: bool = True, compression: str | None = None,
                 group: Any = None, broadcast: bool = True):
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ConfigError(f"inner_steps must be a positive integer, got {inner_steps!r}")
        self._group = group
        self.codec: Codec | None = get_codec(compression)
        if self.codec is not None and not isinstance(self.group, RingtrainProcessGroup):
            raise ConfigError(f"compression={compression!r} needs "
                              f"init_process_group('ringtrain'); other backends send the "
                              f"pseudo-gradient uncompressed (compression=None)")
        self.inner_steps = inner_steps
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("the model has no trainable parameters")
        self.broadcast = broadcast
        if broadcast:
            flat = torch.nn.utils.parameters_to_vector(self.params).detach()
            options = dist.BroadcastOptions()
            options.rootRank = 0
            self.group.broadcast([flat], options).wait()
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(flat, self.params)
        self.anchor = [p.detach().clone() for p in self.params]
        """The shared model: where every member's round starts."""
        self.outer = torch.optim.SGD(self.anchor, lr=outer_lr, momentum=momentum,
                                     nesterov=nesterov and momentum > 0)
        self.steps = 0
        """Inner steps of the round so far."""
        self.rounds_done = 0
        """Completed rounds: equal on every member."""

    @property
    def group(self) -> Any:
        """The process group the rounds run on."""
        return self._group or dist.distributed_c10d._get_default_group()

    def step(self) -> bool:
        """Count one inner step (call it after the inner optimizer's); at the round's end,
        average the members' changes and step the anchor. Returns whether a round ended."""
        self.steps += 1
        if self.steps < self.inner_steps:
            return False
        self.sync()
        return True

    @torch.no_grad()
    def sync(self) -> None:
        """End the round now: the mean pseudo-gradient, the outer step, every member's
        parameters set to the new anchor (a collective: every member calls it alike)."""
        delta = torch.cat([(a - p).reshape(-1) for a, p in zip(self.anchor, self.params,
                                                                 strict=True)])
        if self.codec is not None:
            self.group.start_compressed_mean(delta, delta.numpy(), self.codec).wait()
        else:
            self.group.allreduce([delta], dist.AllreduceOptions()).wait()  # a sum
            delta /= self.group.size()
        offset = 0
        for anchor in self.anchor:
            anchor.grad = delta[offset:offset + anchor.numel()].view_as(anchor)
            offset += anchor.numel()
        self.outer.step()
        for anchor in self.anchor:
            anchor.grad = None
        self.rounds_done += 1
        self.restart_round()

    @torch.no_grad()
    def restart_round(self) -> None:
        """Start a round from the anchor: the parameters become the shared model's."""
        for anchor, param in zip(self.anchor, self.params, strict=True):
            param.copy_(anchor)
        self.steps = 0

    def state_dict(self) -> dict[str, Any]:
        """The outer state: anchor, outer optimizer, rounds done and steps of this round
        (live tensors: copy them to keep them)."""
        return {"anchor": list(self.anchor), "outer": self.outer.state_dict(),
                "rounds": self.rounds_done, "steps": self.steps}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take an outer state from :meth:`state_dict` (the parameters are left alone)."""
        for anchor, value in zip(self.anchor, state["anchor"], strict=True):
            anchor.copy_(value)
        self.outer.load_state_dict(state["outer"])
        self.rounds_done, self.steps = int(state["rounds"]), int(state["steps"])
