"""The ``ringtrain`` torch.distributed backend: a ``ProcessGroup`` whose collectives run on a
:class:`~ringtrain.node.node.Node`'s ring.

One group is one generation of the ring: its rank and size are the node's when the group was
made, and they never change. When the ring changes (a member died, a device joined), every
collective of the group fails with :class:`RingChangedError`; the script re-initialises the
process group on the new ring (:mod:`ringtrain.integrations.torch.elastic` does it).

Collectives are asynchronous: each returns a ``Work`` at once, whose future completes on a
completion thread when the node's engine has finished it, so DDP's bucket all-reduces overlap
the rest of backward. The engine runs collectives in the order they were started, which is the
order torch.distributed requires of every rank anyway.

Tensors: CPU only (a CUDA tensor is refused with the device named). float16/32/64, bfloat16
(reduced in float32), complex (as pairs of floats: sum and average), signed and unsigned
integers, bool (sum/max is "or", min/product is "and"). Reduce ops: SUM, AVG (floats), MIN,
MAX on the ring; PRODUCT, BAND, BOR, BXOR by an all-gather reduced locally in rank order (the
same bits on every member; N times the bytes, meant for small tensors).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.futures import Future

from ...errors import ConfigError, MembershipError, RingtrainError
from ...node.node import Node
from ...node.node import Work as RingWork

log = logging.getLogger(__name__)

BACKEND_NAME = "ringtrain"
CALLBACK_THREADS = 8  # futures completing at once whose callbacks wait for later collectives
RedOp = dist.ReduceOp.RedOpType
RING_OPS = {RedOp.SUM: "sum", RedOp.AVG: "mean", RedOp.MIN: "min", RedOp.MAX: "max"}
GATHERED_OPS: dict[Any, Callable[[np.ndarray], np.ndarray]] = {
    RedOp.PRODUCT: lambda stacked: np.multiply.reduce(stacked, axis=0),
    RedOp.BAND: lambda stacked: np.bitwise_and.reduce(stacked, axis=0),
    RedOp.BOR: lambda stacked: np.bitwise_or.reduce(stacked, axis=0),
    RedOp.BXOR: lambda stacked: np.bitwise_xor.reduce(stacked, axis=0),
}
BOOL_OPS = {RedOp.SUM: "max", RedOp.MAX: "max", RedOp.BOR: "max", RedOp.MIN: "min",
            RedOp.PRODUCT: "min", RedOp.BAND: "min"}
WIRE_VIEWS = {torch.bfloat16: torch.int16, torch.bool: torch.uint8}  # bits carried as these


class RingChangedError(MembershipError):
    """The ring this process group was made for has changed: re-initialise the group."""


class RingtrainWork(dist._Work):
    """A collective in flight; its future holds the collective's output tensors.

    A collective that fails completes its future anyway, with its tensors' floats set to NaN
    (torch 2.13's DDP crashes the process on a future that holds an exception), records the
    error on the group, and :meth:`wait` raises it. So ``dist.all_reduce`` raises; in DDP,
    ``backward`` returns with NaN gradients, and the group's next collective raises
    :class:`RingChangedError` (:mod:`.elastic` checks the group before every commit).
    """

    def __init__(self, future: Future):
        super().__init__()
        self._future = future
        self.error: BaseException | None = None

    def wait(self, timeout: timedelta | None = None) -> bool:  # noqa: ARG002 - node bounds it
        self._future.wait()
        if self.error is not None:
            raise self.error
        return True

    def get_future(self) -> Future:
        return self._future

    def is_completed(self) -> bool:
        return self._future.done()


class _Completer:
    """One thread that waits for the node's works in the order they started and finishes each
    (copies results into the caller's tensors); its torch future is completed on a pool
    thread, because completing runs the future's callbacks, and a callback may wait for a
    later collective (torch's PowerSGD hook does): on this thread that would wait forever."""

    def __init__(self, name: str, on_error: Callable[[RingtrainError], None]):
        self._queue: queue.SimpleQueue[tuple[RingWork, Callable[[Any], Any], RingtrainWork,
                                             Any] | None] = queue.SimpleQueue()
        self._on_error = on_error
        self._callbacks = ThreadPoolExecutor(CALLBACK_THREADS, thread_name_prefix=name)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def add(self, work: RingWork, finish: Callable[[Any], Any], torch_work: RingtrainWork,
            fallback: Any) -> None:
        self._queue.put((work, finish, torch_work, fallback))

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            work, finish, torch_work, fallback = item
            try:
                value = finish(work.wait())
            except Exception as exc:  # noqa: BLE001 - the caller sees it through wait()
                if isinstance(exc, RingtrainError):
                    self._on_error(exc)
                torch_work.error = exc
                _poison(fallback)
                self._callbacks.submit(torch_work.get_future().set_result, fallback)
            else:
                self._callbacks.submit(torch_work.get_future().set_result, value)
        self._callbacks.shutdown(wait=False)


class RingtrainProcessGroup(dist.ProcessGroup):
    """A torch.distributed process group over one generation of a ringtrain ring.

    Args:
        node: the formed node whose ring carries the collectives.
        timeout: seconds for each collective (default: the node's ``collective_timeout``).
    """

    def __init__(self, node: Node, timeout: float | None = None):
        super().__init__(node.rank, node.world_size)
        self.node = node
        self.generation = node.generation
        self.timeout = node.settings.collective_timeout if timeout is None else timeout
        self.failure: RingtrainError | None = None  # why this group's collectives fail
        self._completer = _Completer(f"ringtrain-torch-{node.node_id}-g{self.generation}",
                                     self._failed)
        self._name = ""

    # what torch asks of a group -----------------------------------------------------------

    def _set_group_name(self, name: str) -> None:
        # torch's C++ group answers ``group_name`` from its registered backends, which a
        # Python group has none of ("ProcessGroup name not set": DeviceMesh, so FSDP2 and
        # DTensor, read it); this group keeps the name torch gives it
        super()._set_group_name(name)
        self._name = name

    @property
    def group_name(self) -> str:
        return self._name

    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return BACKEND_NAME

    def __repr__(self) -> str:
        return (f"RingtrainProcessGroup(node={self.node.node_id}, generation={self.generation},"
                f" rank={self.rank()}, size={self.size()})")

    def new_group(self, ranks: Sequence[int], timeout: timedelta | None = None,
                  pg_options: Any = None, group_name: str | None = None,  # noqa: ARG002
                  group_desc: str | None = None) -> RingtrainProcessGroup:
        """torch 2.13's ``dist.new_group`` hook, called on every rank: :func:`whole_ring_group`."""
        group = whole_ring_group(self, list(ranks), timeout)
        if group_name:
            group._set_group_name(group_name)
        if group_desc:
            group._set_group_desc(group_desc)
        return group

    def shutdown(self) -> None:
        """Stop the completion thread (torch calls this on ``destroy_process_group``)."""
        self._completer.stop()

    def abort(self) -> None:
        self._completer.stop()

    # collectives --------------------------------------------------------------------------

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> RingtrainWork:
        op = _op(opts)
        if len(tensors) == 1:
            return self._reduce_one(tensors[0], op)
        return self._coalesced(tensors, op)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None
                            ) -> RingtrainWork:
        return self._coalesced(tensors, _op(opts))

    def reduce(self, tensors: list[torch.Tensor], opts: Any = None) -> RingtrainWork:
        """Every member gets the result (torch promises it only to the root)."""
        return self.allreduce(tensors, opts)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> RingtrainWork:
        root = 0 if opts is None else opts.rootRank
        tensor = _one(tensors)
        wire = _wire(tensor)
        return self._start(lambda: self.node.broadcast_async(wire.numpy(), root, self.timeout),
                           lambda result: (_put(tensor, wire, result), tensors)[1], tensors)

    def allgather(self, output_tensors: list[list[torch.Tensor]],
                  input_tensors: list[torch.Tensor], opts: Any = None) -> RingtrainWork:
        outputs, tensor = output_tensors[0], _one(input_tensors)
        self._check_count(outputs, "all_gather output tensors")
        wire = _wire(tensor)

        def finish(stacked: np.ndarray) -> list[list[torch.Tensor]]:
            for out, part in zip(outputs, stacked, strict=True):
                _put(out, _wire(out), part)
            return output_tensors

        return self._start(lambda: self.node.all_gather_async(wire.numpy(), self.timeout),
                           finish, output_tensors)

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor,  # noqa: A002
                          opts: Any = None) -> RingtrainWork:
        if output.numel() != input.numel() * self.size():
            raise ConfigError(f"all_gather_into_tensor: output has {output.numel()} elements, "
                              f"needs {self.size()} x {input.numel()}")
        wire = _wire(input)
        return self._start(lambda: self.node.all_gather_async(wire.numpy(), self.timeout),
                           lambda stacked: (_put(output, _wire(output), stacked), [output])[1],
                           [output])

    _allgather_base = all_gather_single  # the name older torch code calls

    def allgather_coalesced(self, output_lists: list[list[torch.Tensor]],
                            inputs: list[torch.Tensor], opts: Any = None) -> RingtrainWork:
        works = [self.allgather([outs], [tensor]) for outs, tensor in
                 zip(output_lists, inputs, strict=True)]
        return works[-1] if works else self._done(output_lists)

    def reduce_scatter(self, output_tensors: list[torch.Tensor],
                       input_tensors: list[list[torch.Tensor]], opts: Any = None
                       ) -> RingtrainWork:
        output, inputs = _one(output_tensors), input_tensors[0]
        self._check_count(inputs, "reduce_scatter input tensors")
        flat = torch.cat([t.reshape(-1) for t in inputs])
        return self._reduce_scatter(output, flat, _op(opts), output_tensors)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor,  # noqa: A002
                              opts: Any = None) -> RingtrainWork:
        if input.numel() != output.numel() * self.size():
            raise ConfigError(f"reduce_scatter_tensor: input has {input.numel()} elements, "
                              f"needs {self.size()} x {output.numel()}")
        return self._reduce_scatter(output, input, _op(opts), [output])

    _reduce_scatter_base = reduce_scatter_single

    def barrier(self, opts: Any = None) -> RingtrainWork:
        return self._start(lambda: self.node.all_reduce_async(
            np.zeros(1, dtype=np.int8), timeout=self.timeout), lambda _: [], [])

    def alltoall(self, output_tensors: list[torch.Tensor], input_tensors: list[torch.Tensor],
                 opts: Any = None) -> RingtrainWork:
        """By an all-gather (N times the bytes of a true all-to-all): equal shapes only."""
        self._check_count(output_tensors, "all_to_all output tensors")
        self._check_count(input_tensors, "all_to_all input tensors")
        stacked = torch.stack([_wire(t) for t in input_tensors])
        rank = self.rank()

        def finish(gathered: np.ndarray) -> list[torch.Tensor]:
            for source, out in enumerate(output_tensors):
                _put(out, _wire(out), gathered[source][rank])
            return output_tensors

        return self._start(lambda: self.node.all_gather_async(stacked.numpy(), self.timeout),
                           finish, output_tensors)

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,  # noqa: A002
                          output_split_sizes: list[int], input_split_sizes: list[int],
                          opts: Any = None) -> RingtrainWork:
        if output_split_sizes or input_split_sizes:
            if len(set(output_split_sizes) | set(input_split_sizes)) > 1:
                raise ConfigError("the ringtrain backend's all_to_all_single needs equal splits")
        size = self.size()
        outs = list(output.reshape(size, -1).unbind(0))
        work = self.alltoall(outs, list(input.reshape(size, -1).unbind(0)), opts)
        return self._chain(work, [output])

    def gather(self, output_tensors: list[list[torch.Tensor]],
               input_tensors: list[torch.Tensor], opts: Any = None) -> RingtrainWork:
        """By an all-gather: the root's outputs are filled, the others pass none."""
        if output_tensors and output_tensors[0]:
            return self.allgather(output_tensors, input_tensors)
        scratch = [[torch.empty_like(input_tensors[0]) for _ in range(self.size())]]
        return self._chain(self.allgather(scratch, input_tensors), [])

    def scatter(self, output_tensors: list[torch.Tensor],
                input_tensors: list[list[torch.Tensor]], opts: Any = None) -> RingtrainWork:
        """By a broadcast of the root's stacked inputs (N times the bytes of a scatter)."""
        output, rank = _one(output_tensors), self.rank()
        if input_tensors and input_tensors[0]:
            stacked = torch.stack([_wire(t) for t in input_tensors[0]])
        else:
            stacked = torch.empty((self.size(), *output.shape), dtype=_wire(output).dtype)
        return self._start(
            lambda: self.node.broadcast_async(stacked.numpy(), opts.rootRank, self.timeout),
            lambda result: (_put(output, _wire(output), result[rank]), output_tensors)[1],
            output_tensors)

    def send(self, *_args: Any) -> RingtrainWork:
        raise ConfigError("the ringtrain backend has no point-to-point send/recv; it runs "
                          "collectives only")

    recv = recv_anysource = send

    def start_compressed_mean(self, tensor: torch.Tensor, array: np.ndarray, codec: Any
                              ) -> Future:
        """Average ``array`` (a view of the float ``tensor``) in place with a ring codec; the
        future holds ``tensor`` (what a DDP communication hook returns)."""
        _check_cpu(tensor)
        return self._start(lambda: self.node.all_reduce_async(
            array, "mean", timeout=self.timeout, compression=codec, out=array),
            lambda _: tensor, tensor).get_future()

    # machinery ----------------------------------------------------------------------------

    def _reduce_one(self, tensor: torch.Tensor, op: Any) -> RingtrainWork:
        _check_cpu(tensor)
        if op in GATHERED_OPS and tensor.dtype != torch.bool:
            return self._reduce_gathered([tensor], op)
        ring_op, work_tensor = _ring_form(tensor, op)
        array = work_tensor.numpy()
        in_place = work_tensor.data_ptr() == tensor.data_ptr()
        return self._start(
            lambda: self.node.all_reduce_async(array, ring_op, timeout=self.timeout, out=array),
            lambda _: ([tensor] if in_place else (_copy_back(tensor, work_tensor), [tensor])[1]),
            [tensor])

    def _coalesced(self, tensors: list[torch.Tensor], op: Any) -> RingtrainWork:
        if not tensors:
            return self._done([])
        if op in GATHERED_OPS or len({t.dtype for t in tensors}) > 1:
            return self._chain([self._reduce_one(t, op) for t in tensors][-1], tensors)
        for tensor in tensors:
            _check_cpu(tensor)
        forms = [_ring_form(t, op) for t in tensors]
        ring_op = forms[0][0]

        def finish(results: list[np.ndarray]) -> list[torch.Tensor]:
            for tensor, result in zip(tensors, results, strict=True):
                _put(tensor, tensor if tensor.dtype not in (torch.bfloat16, torch.bool)
                     else None, result)
            return tensors

        return self._start(lambda: self.node.all_reduce_many_async(
            [form.numpy() for _, form in forms], ring_op, timeout=self.timeout), finish, tensors)

    def _reduce_gathered(self, tensors: list[torch.Tensor], op: Any) -> RingtrainWork:
        tensor = _one(tensors)
        if op != RedOp.PRODUCT and (tensor.is_floating_point() or tensor.is_complex()):
            raise ConfigError(f"{op.name} needs an integer or bool tensor, got {tensor.dtype}")
        source = tensor.float() if tensor.dtype == torch.bfloat16 else tensor.contiguous()
        return self._start(
            lambda: self.node.all_gather_async(source.numpy(), self.timeout),
            lambda stacked: (_copy_back(tensor, torch.from_numpy(
                np.ascontiguousarray(GATHERED_OPS[op](stacked)))), tensors)[1], tensors)

    def _reduce_scatter(self, output: torch.Tensor, flat: torch.Tensor, op: Any,
                        result: list[torch.Tensor]) -> RingtrainWork:
        _check_cpu(output)
        if op not in RING_OPS:
            raise ConfigError(f"reduce_scatter supports SUM, AVG, MIN and MAX, not {op.name}")
        ring_op, work = _ring_form(flat.reshape(-1), op)
        return self._start(
            lambda: self.node.reduce_scatter_async(work.numpy(), ring_op, self.timeout),
            lambda mine: (_copy_back(output, torch.from_numpy(np.ascontiguousarray(mine))
                                     .reshape(output.shape)), result)[1], result)

    def _start(self, start: Callable[[], RingWork], finish: Callable[[Any], Any],
               fallback: Any = None) -> RingtrainWork:
        """Start a node collective now (so the order is the caller's) and complete its torch
        future on the completion thread (with ``fallback``, poisoned, if it fails). A group
        whose ring changed raises here, at once (safe inside DDP, unlike a failed future)."""
        self._check_ring()
        try:
            work = start()
        except RingtrainError as exc:
            if not isinstance(exc, ConfigError):
                self._failed(exc)
            raise
        torch_work = RingtrainWork(Future())
        self._completer.add(work, finish, torch_work, fallback)
        return torch_work

    def _chain(self, work: RingtrainWork, value: Any) -> RingtrainWork:
        chained = RingtrainWork(Future())

        def done(_: Future) -> None:
            chained.error = work.error
            chained.get_future().set_result(value)

        work.get_future().add_done_callback(done)
        return chained

    def _done(self, value: Any) -> RingtrainWork:
        future: Future = Future()
        future.set_result(value)
        return RingtrainWork(future)

    def _check_ring(self) -> None:
        if self.failure is not None:
            raise RingChangedError(f"the ring of generation {self.generation} failed earlier "
                                   f"({self.failure}); re-initialise the process group")
        if self.node.generation != self.generation:
            raise RingChangedError(f"the ring changed from generation {self.generation} to "
                                   f"{self.node.generation}; re-initialise the process group "
                                   f"(ringtrain.integrations.torch.elastic does it)")

    def _failed(self, exc: RingtrainError) -> None:
        if self.failure is None:
            self.failure = exc
            log.warning("ringtrain process group of generation %d: %s", self.generation, exc)

    def _check_count(self, tensors: Sequence[torch.Tensor], what: str) -> None:
        if len(tensors) != self.size():
            raise ConfigError(f"{what}: {len(tensors)} tensors for a ring of {self.size()}")


def whole_ring_group(parent: RingtrainProcessGroup, ranks: list[int],
                     timeout: timedelta | None) -> RingtrainProcessGroup:
    """A new group over ``parent``'s node and generation, for ``dist.new_group(ranks)``: every
    rank in rank order only (its own completion thread; the node runs the collectives of all
    groups in the one order they start).

    Raises:
        ConfigError: ``ranks`` is a subset of the ring, or every rank in another order.
        RingChangedError: the ring changed since ``parent`` was made.
    """
    if ranks != list(range(parent.size())):
        raise ConfigError(subset_refusal(f"new_group(ranks={ranks})", parent.size()))
    parent._check_ring()
    seconds = parent.timeout if timeout is None else timeout.total_seconds()
    return RingtrainProcessGroup(parent.node, min(seconds, parent.timeout))


def subset_refusal(asked: str, world_size: int) -> str:
    """Why a process group over part of the ring is refused, and what to use instead."""
    return (f"the ringtrain backend makes process groups of the whole ring only (ranks "
            f"0..{world_size - 1}, in order); {asked} is a subset or another order, and "
            f"subsets are not supported: a node runs every collective on one ring of all its "
            f"members. Use the default group, or new_group() with no ranks; to combine values "
            f"from some ranks only, let the others all_reduce zeros; to train some devices "
            f"apart, start them as a job of their own (ringtrain node --job NAME)")


def _poison(value: Any) -> None:
    """Set every floating tensor in ``value`` (a tensor or nested lists of them) to NaN: what
    a failed collective leaves, so no partial result passes for a reduced one."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            with torch.no_grad():
                value.fill_(float("nan"))
    elif isinstance(value, list | tuple):
        for item in value:
            _poison(item)


def _op(opts: Any) -> Any:
    op = dist.ReduceOp.SUM if opts is None else opts.reduceOp
    return op.op if hasattr(op, "op") else op


def _one(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(tensors) != 1:
        raise ConfigError(f"one tensor per call on the CPU, got {len(tensors)}")
    _check_cpu(tensors[0])
    return tensors[0]


def _check_cpu(tensor: torch.Tensor) -> None:
    if tensor.device.type != "cpu":
        raise ConfigError(f"the ringtrain backend carries CPU tensors only, got one on "
                          f"{tensor.device}: move it with .cpu(), or use "
                          f"init_process_group(backend='cpu:ringtrain,cuda:nccl')")


def _ring_form(tensor: torch.Tensor, op: Any) -> tuple[str, torch.Tensor]:
    """(ring op, a contiguous tensor of a dtype the ring reduces) for ``tensor``: the tensor
    itself when it can be reduced in place."""
    if tensor.dtype == torch.bool:
        if op not in BOOL_OPS:
            raise ConfigError(f"{op.name} is not defined for bool tensors")
        return BOOL_OPS[op], tensor.detach().to(torch.uint8)
    if op not in RING_OPS:
        raise ConfigError(f"the ringtrain backend does not support {op.name}")
    if op == RedOp.AVG and not (tensor.is_floating_point() or tensor.is_complex()):
        raise ConfigError(f"AVG needs a floating tensor, got {tensor.dtype}; use SUM")
    work = tensor.detach()
    if tensor.is_complex():
        if op not in (RedOp.SUM, RedOp.AVG):
            raise ConfigError(f"{op.name} is not defined for complex tensors")
        work = torch.view_as_real(work.contiguous())
    elif tensor.dtype == torch.bfloat16:
        work = work.float()
    return RING_OPS[op], work if work.is_contiguous() else work.contiguous()


def _wire(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s bits as a contiguous tensor numpy can view (for transfers, not sums)."""
    work = tensor.detach()
    if work.is_complex():
        work = torch.view_as_real(work.contiguous())
    work = work.contiguous()
    view = WIRE_VIEWS.get(work.dtype)
    return work.view(view) if view is not None else work


def _put(tensor: torch.Tensor, wire: torch.Tensor | None, values: np.ndarray) -> None:
    """Write ``values`` (the wire form of ``tensor``'s dtype, or a reduced float form) into
    ``tensor``."""
    source = torch.from_numpy(np.ascontiguousarray(values))
    if wire is not None and source.dtype == wire.dtype:
        if wire.data_ptr() == tensor.data_ptr() and tensor.is_contiguous():
            wire.copy_(source.reshape(wire.shape))
            return
        source = source.reshape(wire.shape)
        if tensor.is_complex():
            source = torch.view_as_complex(source.contiguous())
        elif tensor.dtype in WIRE_VIEWS:
            source = source.view(tensor.dtype)
    _copy_back(tensor, source)


def _copy_back(tensor: torch.Tensor, values: torch.Tensor) -> None:
    with torch.no_grad():
        if tensor.is_complex() and not values.is_complex():
            values = torch.view_as_complex(values.reshape(*tensor.shape, 2).contiguous())
        tensor.copy_(values.reshape(tensor.shape))
