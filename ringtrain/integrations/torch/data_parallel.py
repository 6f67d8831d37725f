"""PyTorch models trained through ringtrain (``pip install 'ringtrain[torch]'``).

:class:`DataParallel` averages a model's gradients over the members while ``backward`` runs::

    ddp = DataParallel(node, model)        # collective: checks, then rank 0's parameters everywhere
    for x, y in batches:                   # each member its own shard
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        if ddp.backward(loss, samples=len(x)):   # backward, gradients averaged as they are ready
            optimizer.step()

How: every parameter has a post-accumulate-grad hook. Parameters are grouped, in reverse order
of registration (the order backward usually produces their gradients), into buckets of about
``bucket_bytes``; when every gradient of a bucket is ready the bucket starts an asynchronous
fused all-reduce (:meth:`ringtrain.node.node.Node.all_reduce_many_async`), so communication
overlaps the rest of backward. Buckets start strictly in bucket order on every member (the
order of collectives must match), and :meth:`DataParallel.backward` waits for all of them
before writing the averaged gradients back into ``param.grad``.

The average is weighted by ``samples``: with losses that are means over the local batch, the
result is the gradient of the union of the members' batches. A NaN or Inf in any member's
gradient survives the weighted sum, and every member receives the same reduced bytes, so all
members see it and all skip the step (``backward`` returns False).

Only CPU tensors: gradients travel as numpy views of them.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import ConfigError
from ...node.node import Node, Work
from ...train.trainer import NonFiniteGradientError, check_agreement

if TYPE_CHECKING:
    import torch

__all__ = ["DataParallel"]

DEFAULT_BUCKET_BYTES = 1 << 20  # the node's segment size: one bucket fills about one segment


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ConfigError("ringtrain.integrations.torch needs PyTorch: "
                          "pip install 'ringtrain[torch]'") from exc
    return torch


class DataParallel:
    """Averages the gradients of a torch model over every member during ``backward``.

    Constructing it is a collective: the members check they hold the same parameter names,
    shapes and dtypes, then rank 0's parameters and buffers are copied to every member.

    Args:
        node: this process's node.
        model: a ``torch.nn.Module`` on the CPU.
        bucket_bytes: gradient bytes per all-reduce.
        max_nonfinite: skipped steps in a row before :class:`NonFiniteGradientError`.
        timeout: seconds for each collective (default: the node's setting).

    Raises:
        ConfigError: PyTorch is missing, a tensor is not on the CPU, or the members' models
            differ.
    """

    def __init__(self, node: Node, model: torch.nn.Module, *,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, max_nonfinite: int = 10,
                 timeout: float | None = None):
        self._torch = _import_torch()
        if bucket_bytes < 1:
            raise ConfigError(f"bucket_bytes must be positive, got {bucket_bytes!r}")
        self.node = node
        self.model = model
        self.timeout = timeout
        self.max_nonfinite = max_nonfinite
        self.nonfinite_in_a_row = 0
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        for name, tensor in [*named, *model.named_buffers()]:
            if tensor.device.type != "cpu":
                raise ConfigError(f"{name} is on {tensor.device}; ringtrain averages CPU "
                                  f"tensors only")
        layout = [[name, list(p.shape), str(p.dtype)] for name, p in named]
        check_agreement(node, {"torch model": hashlib.sha256(
            json.dumps(layout).encode()).hexdigest()}, timeout)
        self._broadcast_state()
        self._buckets = self._make_buckets([p for _, p in reversed(named)], bucket_bytes)
        self._bucket_of = {id(p): index for index, bucket in enumerate(self._buckets)
                           for p in bucket}
        self._ready = [0] * len(self._buckets)
        self._works: list[Work] = []
        self._samples: float | None = None
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for _, p in named]

    def backward(self, loss: torch.Tensor, samples: int) -> bool:
        """Run ``loss.backward()`` with the gradients averaged over the members.

        Args:
            loss: this member's loss, a mean over its local batch.
            samples: this member's batch size: the weight of its gradient.

        Returns:
            False when some member's gradient was not finite: every member then skips the
            step (the gradients are left as reduced; do not step the optimizer).

        Raises:
            NonFiniteGradientError: the ``max_nonfinite``-th skipped step in a row.
        """
        self._samples = float(samples)
        self._ready = [0] * len(self._buckets)
        self._works = []
        try:
            loss.backward()
            # parameters the graph did not reach get no hook call: start what is left, in order
            self._launch(len(self._buckets))
            finite = True
            for bucket, work in zip(self._buckets, self._works, strict=True):
                for param, averaged in zip(bucket, work.wait(), strict=True):
                    finite = finite and bool(np.isfinite(averaged).all())
                    if param.grad is None:
                        param.grad = self._torch.from_numpy(averaged).reshape(param.shape)
                    else:
                        param.grad.copy_(self._torch.from_numpy(averaged).reshape(param.shape))
        finally:
            self._samples = None
        if finite:
            self.nonfinite_in_a_row = 0
            return True
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row >= self.max_nonfinite:
            raise NonFiniteGradientError(
                f"gradients were not finite on some member for {self.nonfinite_in_a_row} "
                f"steps in a row (generation {self.node.generation})", step=0,
                generation=self.node.generation)
        return False

    def close(self) -> None:
        """Remove the hooks: the model's backward no longer talks to the members."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _on_grad(self, param: torch.Tensor) -> None:
        if self._samples is None:
            raise ConfigError("a gradient was computed outside DataParallel.backward; call "
                              "ddp.backward(loss, samples) instead of loss.backward()")
        index = self._bucket_of[id(param)]
        self._ready[index] += 1
        self._launch(next((i for i, bucket in enumerate(self._buckets)
                           if self._ready[i] < len(bucket)), len(self._buckets)))

    def _launch(self, upto: int) -> None:
        """Start the all-reduce of every bucket before ``upto`` not started yet."""
        for index in range(len(self._works), upto):
            grads = [np.zeros(tuple(p.shape), dtype=_numpy_dtype(p)) if p.grad is None
                     else p.grad.detach().numpy() for p in self._buckets[index]]
            self._works.append(self.node.all_reduce_many_async(
                grads, op="mean", weight=self._samples, timeout=self.timeout))

    def _broadcast_state(self) -> None:
        """Rank 0's parameters and buffers on every member: one broadcast per dtype."""
        groups: dict[Any, list[torch.Tensor]] = {}
        for tensor in [*self.model.parameters(), *self.model.buffers()]:
            if tensor.numel():
                groups.setdefault(tensor.dtype, []).append(tensor)
        with self._torch.no_grad():
            for tensors in groups.values():
                flat = np.concatenate([t.detach().numpy().ravel() for t in tensors])
                received = self.node.broadcast(flat, 0, timeout=self.timeout)
                offset = 0
                for tensor in tensors:
                    part = received[offset:offset + tensor.numel()].reshape(tuple(tensor.shape))
                    tensor.copy_(self._torch.from_numpy(part))
                    offset += tensor.numel()

    @staticmethod
    def _make_buckets(params: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
        buckets: list[list[torch.Tensor]] = []
        size = 0
        for param in params:
            nbytes = param.numel() * param.element_size()
            if not buckets or size + nbytes > bucket_bytes or \
                    buckets[-1][0].dtype != param.dtype:
                buckets.append([])
                size = 0
            buckets[-1].append(param)
            size += nbytes
        return buckets


def _numpy_dtype(tensor: torch.Tensor) -> np.dtype:
    return np.dtype(str(tensor.dtype).removeprefix("torch."))
