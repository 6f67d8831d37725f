"""The collectives a node offers (:class:`CollectiveCalls`, which :class:`~ringtrain.Node`
inherits): each builds its collective on the caller's thread, from a copy of the caller's
arrays, and hands it to the engine thread."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..config import Settings
from ..errors import ConfigError
from ..ring import collectives
from ..ring.collectives import Collective
from ..ring.compression import Codec
from ..ring.runner import RingRunner
from .work import Builder, Work


class CollectiveCalls:
    """all_reduce, reduce_scatter, all_gather, broadcast and barrier, blocking and async.
    The node provides ``settings``, its ``_runner`` and ``_submit`` (queue a collective)."""

    settings: Settings
    _runner: RingRunner
    _submit: Callable[[Builder, float | None], Work]  # queue for the engine thread

    def all_reduce(self, array: Any, op: str = "sum", weight: float | None = None,
                   timeout: float | None = None, compression: str | Codec | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
        """Reduce ``array`` over all members; every member gets the same result.

        Args:
            array: any shape; float16/32/64 or integer (integers: op sum, max or min).
            op: "sum", "mean", "max" or "min".
            weight: with op="mean", this node's weight (e.g. its sample count): the result
                is sum(w_i * x_i) / sum(w_i).
            timeout: seconds (default ``settings.collective_timeout``).
            compression: None, or a codec name (``fp16``, ``int8``, ``topk[:RATIO]``, see
                ``ringtrain.ring.compression``) or a Codec, for float sums and means. Every member
                must pass the same; error-feedback state is kept per codec name and shapes.
            out: where to put the result: a writeable, C-contiguous numpy array of the
                same shape and dtype (``array`` itself reduces in place). Saves allocating
                (and the kernel zeroing) a new result array on every call. ``out`` is the
                collective's working buffer: when the call raises, it holds neither the
                input nor a result but partial sums (keep a copy, or recompute, before a
                retry). Compression state (the error-feedback residual) is restored on
                failure, so a retry counts nothing twice.
        """
        return self.all_reduce_async(array, op, weight, timeout, compression, out).wait()

    def all_reduce_async(self, array: Any, op: str = "sum", weight: float | None = None,
                         timeout: float | None = None, compression: str | Codec | None = None,
                         out: np.ndarray | None = None) -> Work:
        """Start :meth:`all_reduce`; ``wait()`` on the returned handle gives the result.
        With ``out``, leave that array alone until then: after
        ``wait`` raised :class:`CollectiveTimeout` the collective may still be writing to it,
        until :meth:`Work.done`; after any other error it holds partial sums."""
        array = np.array(array, copy=True) if out is None else _into(array, out)
        codec = self._runner.codec(compression)
        return self._submit(lambda rank, size: _single(
            collectives.all_reduce([array], op, weight, rank, size,
                                   self._runner.segment_elements, codec, owned=True,
                                   direct_bytes=self.settings.direct_bytes), out), timeout)

    def all_reduce_many(self, arrays: Sequence[Any], op: str = "sum",
                        weight: float | None = None, timeout: float | None = None,
                        compression: str | Codec | None = None) -> list[np.ndarray]:
        """Reduce many arrays of one dtype in a single pass around the ring (fused)."""
        return self.all_reduce_many_async(arrays, op, weight, timeout, compression).wait()

    def all_reduce_many_async(self, arrays: Sequence[Any], op: str = "sum",
                              weight: float | None = None, timeout: float | None = None,
                              compression: str | Codec | None = None) -> Work:
        """Start :meth:`all_reduce_many`."""
        copies = [np.array(a, copy=True) for a in arrays]
        codec = self._runner.codec(compression)
        return self._submit(lambda rank, size: collectives.all_reduce(
            copies, op, weight, rank, size, self._runner.segment_elements, codec,
            direct_bytes=self.settings.direct_bytes), timeout)

    def reduce_scatter(self, array: Any, op: str = "sum", timeout: float | None = None
                       ) -> np.ndarray:
        """Reduce the flattened ``array``; rank r gets chunk r (sizes differ by at most 1)."""
        return self.reduce_scatter_async(array, op, timeout).wait()

    def reduce_scatter_async(self, array: Any, op: str = "sum", timeout: float | None = None
                             ) -> Work:
        """Start :meth:`reduce_scatter`."""
        array = np.array(array, copy=True)
        return self._submit(lambda rank, size: collectives.reduce_scatter(
            array, op, rank, size, self._runner.segment_elements), timeout)

    def all_gather(self, array: Any, timeout: float | None = None) -> np.ndarray:
        """Every member's ``array`` stacked in rank order: shape (world_size, *array.shape)."""
        return self.all_gather_async(array, timeout).wait()

    def all_gather_async(self, array: Any, timeout: float | None = None) -> Work:
        """Start :meth:`all_gather`."""
        array = np.array(array, copy=True)
        return self._submit(lambda rank, size: collectives.all_gather(
            array, rank, size, self._runner.segment_elements), timeout)

    def broadcast(self, array: Any, root: int = 0, timeout: float | None = None) -> np.ndarray:
        """The ``root`` member's ``array`` on every member (others pass same shape/dtype)."""
        return self.broadcast_async(array, root, timeout).wait()

    def broadcast_async(self, array: Any, root: int = 0, timeout: float | None = None) -> Work:
        """Start :meth:`broadcast`."""
        array = np.array(array, copy=True)
        return self._submit(lambda rank, size: collectives.broadcast(
            array, root, rank, size, self._runner.segment_elements), timeout)

    def barrier(self, timeout: float | None = None) -> None:
        """Return once every member has reached this barrier."""
        self.all_reduce(np.zeros(1, dtype=np.int8), timeout=timeout)


def _single(collective: Collective, out: np.ndarray | None = None) -> Collective:
    """Make an all_reduce of one array return that array (in ``out``, when given) instead
    of a one-element list."""
    finish = collective.finish

    def single(result: np.ndarray) -> np.ndarray:
        reduced = finish(result)[0]
        if out is None or reduced is out:
            return reduced
        if not np.may_share_memory(reduced, out):  # a weighted mean works in a bigger buffer
            np.copyto(out, reduced)
        return out

    collective.finish = single
    return collective


def _into(array: Any, out: np.ndarray) -> np.ndarray:
    """``array`` copied into ``out`` (unless it is ``out``), to be reduced there in place."""
    if not isinstance(out, np.ndarray) or not (out.flags.c_contiguous and out.flags.writeable
                                               and out.dtype.isnative):
        raise ConfigError("out must be a writeable, C-contiguous numpy array in native byte "
                          "order")
    array = np.asarray(array)
    if array.shape != out.shape or array.dtype != out.dtype:
        raise ConfigError(f"out has shape {out.shape} and dtype {out.dtype}; the array has "
                          f"{array.shape} and {array.dtype}")
    if array is not out:
        np.copyto(out, array)
    return out
