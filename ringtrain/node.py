"""The node: one process's membership in a ring, and the collectives it offers.

A :class:`Node` owns one engine thread, and that thread alone touches the sockets. The caller's
thread builds a collective, queues it and (for the blocking forms) waits for its result; the
engine runs queued collectives in order and, between them, answers control traffic (late
HELLOs, proposals). Collectives therefore overlap the caller's computation when started with
:meth:`Node.all_reduce_async`.

Every member must call the same collectives in the same order, as with MPI or
torch.distributed: the n-th collective of a generation on one node meets the n-th on every
other node.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from . import collectives
from .collectives import Collective, RingRunner
from .config import Settings
from .errors import (CollectiveTimeout, ConfigError, MembershipError, ProtocolError,
                     RingtrainError)
from .mailbox import Mailbox
from .membership import Formation, View
from .security import JobKey, key_from_environment
from .transport import Transport, is_loopback, normalize_endpoint
from .wire import job_id

log = logging.getLogger(__name__)

Builder = Callable[[int, int], Collective]  # (rank, world_size) -> collective


class Work:
    """A collective started with an ``*_async`` method. :meth:`wait` returns its result."""

    def __init__(self, build: Builder, timeout: float, step: int):
        self.build = build
        self.timeout = timeout
        self.step = step
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        """Whether the collective has finished (successfully or not)."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> Any:
        """The collective's result, waiting at most ``timeout`` seconds (default: the
        collective's own timeout plus a second).

        Raises:
            CollectiveTimeout: the result did not come in time.
            CollectiveError: the collective failed on this node.
        """
        limit = self.timeout + 1.0 if timeout is None else timeout
        if not self._done.wait(limit):
            raise CollectiveTimeout(f"collective still running after {limit:.1f} s")
        if self._error is not None:
            raise self._error
        return self._result

    def _finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._done.set()


class Node:
    """This process's node in a ring. Use as a context manager.

    Args:
        peers: addresses (``host:port``) of the other members. Listing this node's own address
            too is fine, so every node can be given the same list.
        listen: address to listen on; port 0 picks a free port.
        job: the job name; nodes of other jobs are never admitted.
        world_size: how many members the ring must have (default: the distinct peers plus
            this node).
        node_id: this node's unique id (default: random). Ring order sorts by id.
        settings: timeouts and limits (default: :meth:`Settings.from_env`).
        key: the job key (default: from ``RINGTRAIN_KEY_FILE`` or ``RINGTRAIN_KEY``). Every
            link is then authenticated and encrypted with CURVE.
        insecure: allow running with no key, unauthenticated and in clear text. Refused
            unless every address is loopback.

    Raises:
        ConfigError: no key and not ``insecure``, or ``insecure`` off loopback.
        MembershipError: the ring did not form within ``settings.form_timeout``.
    """

    def __init__(self, peers: Iterable[str] = (), *, listen: str = "127.0.0.1:0",
                 job: str = "default", world_size: int | None = None,
                 node_id: str | None = None, settings: Settings | None = None,
                 key: JobKey | None = None, insecure: bool = False):
        self.settings = settings or Settings.from_env()
        self.node_id = node_id or secrets.token_hex(4)
        self.job = job
        self._job_id = job_id(job)
        peers = list(peers)
        key = key or key_from_environment()
        if key is None:
            _check_insecure_allowed(insecure, [listen, *peers])
        self._transport = Transport(self.node_id, listen, self.settings, key)
        self.endpoint = self._transport.endpoint
        peer_endpoints = {normalize_endpoint(p) for p in peers} - {self.endpoint}
        size = world_size if world_size is not None else len(peer_endpoints) + 1
        if size < 1:
            raise ConfigError(f"world_size must be >= 1, got {size}")
        self._mailbox = Mailbox(self._transport, self._job_id, self.settings.max_stash_bytes)
        self._formation = Formation(self.node_id, job, self._job_id, self._transport,
                                    self._mailbox, size)
        self._formation.add_candidates(peer_endpoints)
        self._runner = RingRunner(self._transport, self._mailbox, self.node_id, self._job_id,
                                  self.settings.progress_timeout)
        self._view: View | None = View(1, (self.node_id,), 0) if size == 1 else None
        self._sequence = 0
        self._queue: queue.SimpleQueue[Work | None] = queue.SimpleQueue()
        self._closing = False
        self._formed = threading.Event()
        self._fatal: BaseException | None = None
        self._thread = threading.Thread(target=self._engine, name=f"ringtrain-{self.node_id}",
                                        daemon=True)
        self._thread.start()
        if not self._formed.wait(self.settings.form_timeout) or self._fatal is not None:
            state = self.state()
            self.close()
            if self._fatal is not None:
                raise MembershipError(f"node {self.node_id} failed while forming: "
                                      f"{self._fatal}") from self._fatal
            raise MembershipError(f"ring of {size} did not form within "
                                  f"{self.settings.form_timeout:.0f} s; node state: {state}")

    # properties -----------------------------------------------------------------------------

    @property
    def view(self) -> View:
        """The installed membership."""
        if self._view is None:
            raise MembershipError("the ring has not formed")
        return self._view

    @property
    def rank(self) -> int:
        """This node's position in the ring, 0 .. world_size-1."""
        return self.view.rank

    @property
    def world_size(self) -> int:
        """Number of members in the ring."""
        return self.view.world_size

    @property
    def generation(self) -> int:
        """The membership generation collectives currently run in."""
        return self.view.generation

    @property
    def members(self) -> tuple[str, ...]:
        """Member node ids in ring order."""
        return self.view.members

    @property
    def bytes_sent(self) -> int:
        """Payload bytes this node has sent in collectives."""
        return self._runner.bytes_sent

    def state(self) -> dict[str, Any]:
        """What this node is doing, for hang diagnostics and ``ringtrain peers``."""
        return {"node": self.node_id, "endpoint": self.endpoint, "job": self.job,
                "view": None if self._view is None else
                {"generation": self._view.generation, "members": list(self._view.members),
                 "rank": self._view.rank},
                "sequence": self._sequence, "stage": self._runner.stage,
                "formation": self._formation.state() if self._view is None else "formed",
                "dropped": dict(self._mailbox.dropped),
                "fatal": None if self._fatal is None else repr(self._fatal)}

    # collectives ----------------------------------------------------------------------------

    def all_reduce(self, array: Any, op: str = "sum", weight: float | None = None,
                   timeout: float | None = None) -> np.ndarray:
        """Reduce ``array`` over all members; every member gets the same result.

        Args:
            array: any shape; float16/32/64 or integer (integers: op sum, max or min).
            op: "sum", "mean", "max" or "min".
            weight: with op="mean", this node's weight (e.g. its sample count): the result
                is sum(w_i * x_i) / sum(w_i).
            timeout: seconds (default ``settings.collective_timeout``).
        """
        return self.all_reduce_async(array, op, weight, timeout).wait()

    def all_reduce_async(self, array: Any, op: str = "sum", weight: float | None = None,
                         timeout: float | None = None) -> Work:
        """Start :meth:`all_reduce`; ``wait()`` on the returned handle gives the result."""
        array = np.array(array, copy=True)
        return self._submit(lambda rank, size: _single(
            collectives.all_reduce([array], op, weight, rank, size,
                                   self._runner.segment_elements)), timeout)

    def all_reduce_many(self, arrays: Sequence[Any], op: str = "sum",
                        weight: float | None = None, timeout: float | None = None
                        ) -> list[np.ndarray]:
        """Reduce many arrays of one dtype in a single pass around the ring (fused)."""
        return self.all_reduce_many_async(arrays, op, weight, timeout).wait()

    def all_reduce_many_async(self, arrays: Sequence[Any], op: str = "sum",
                              weight: float | None = None, timeout: float | None = None
                              ) -> Work:
        """Start :meth:`all_reduce_many`."""
        copies = [np.array(a, copy=True) for a in arrays]
        return self._submit(lambda rank, size: collectives.all_reduce(
            copies, op, weight, rank, size, self._runner.segment_elements), timeout)

    def reduce_scatter(self, array: Any, op: str = "sum", timeout: float | None = None
                       ) -> np.ndarray:
        """Reduce the flattened ``array``; rank r gets chunk r (sizes differ by at most 1)."""
        array = np.array(array, copy=True)
        return self._submit(lambda rank, size: collectives.reduce_scatter(
            array, op, rank, size, self._runner.segment_elements), timeout).wait()

    def all_gather(self, array: Any, timeout: float | None = None) -> np.ndarray:
        """Every member's ``array`` stacked in rank order: shape (world_size, *array.shape)."""
        array = np.array(array, copy=True)
        return self._submit(lambda rank, size: collectives.all_gather(
            array, rank, size, self._runner.segment_elements), timeout).wait()

    def broadcast(self, array: Any, root: int = 0, timeout: float | None = None) -> np.ndarray:
        """The ``root`` member's ``array`` on every member (others pass same shape/dtype)."""
        array = np.array(array, copy=True)
        return self._submit(lambda rank, size: collectives.broadcast(
            array, root, rank, size, self._runner.segment_elements), timeout).wait()

    def barrier(self, timeout: float | None = None) -> None:
        """Return once every member has reached this barrier."""
        self.all_reduce(np.zeros(1, dtype=np.int8), timeout=timeout)

    def _submit(self, build: Builder, timeout: float | None, step: int = 0) -> Work:
        if self._closing:
            raise RingtrainError(f"node {self.node_id} is closed")
        if self._fatal is not None:
            raise RingtrainError(f"node {self.node_id} stopped: {self._fatal}") from self._fatal
        work = Work(build, self.settings.collective_timeout if timeout is None else timeout, step)
        self._queue.put(work)
        self._transport.wake()
        return work

    # engine thread --------------------------------------------------------------------------

    def _engine(self) -> None:
        try:
            while not self._closing:
                if self._view is None:
                    self._formation.tick()
                    self._mailbox.pump(0.05)
                    self._handle_control()
                    if self._formation.view is not None:
                        self._view = self._formation.view
                        self._formed.set()
                    continue
                self._formed.set()
                try:
                    work = self._queue.get_nowait()
                except queue.Empty:
                    self._mailbox.pump(0.5)
                    self._handle_control()
                    continue
                if work is None:
                    break
                self._execute(work)
        except BaseException as exc:  # noqa: BLE001 - reported to every waiter, then re-raised
            log.exception("node %s engine stopped", self.node_id)
            self._fatal = exc
            self._formed.set()
        finally:
            self._fail_queued(RingtrainError(f"node {self.node_id} closed"))
            self._transport.close(linger=0 if self._fatal else self.settings.linger)

    def _execute(self, work: Work) -> None:
        view = self.view
        sequence = self._sequence
        self._sequence += 1
        try:
            collective = work.build(view.rank, view.world_size)
            deadline = time.monotonic() + work.timeout
            result = self._runner.run(collective, view, sequence, deadline, work.step)
        except RingtrainError as exc:
            work._finish(error=exc)
        else:
            work._finish(result)

    def _handle_control(self) -> None:
        while self._mailbox.control:
            message = self._mailbox.control.popleft()
            try:
                self._formation.handle(message)
            except ProtocolError as exc:
                self._mailbox.dropped[exc.field] += 1
                log.warning("dropped control message: %s", exc)

    def _fail_queued(self, error: BaseException) -> None:
        while True:
            try:
                work = self._queue.get_nowait()
            except queue.Empty:
                return
            if work is not None:
                work._finish(error=error)

    # lifecycle ------------------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Stop the engine and close the sockets (bounded by ``timeout`` seconds)."""
        if self._closing:
            return
        self._queue.put(None)
        self._closing = True
        self._transport.wake()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("node %s engine did not stop within %.1f s", self.node_id, timeout)

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_insecure_allowed(insecure: bool, addresses: list[str]) -> None:
    """Running without a key is allowed on loopback only, and only when asked for."""
    if not insecure:
        raise ConfigError("no job key: create one with `ringtrain keygen --out job.key` and pass "
                          "it (key=read_key_file(...), or RINGTRAIN_KEY_FILE=job.key); "
                          "on one machine only, insecure=True runs without one")
    off_loopback = [a for a in addresses if not is_loopback(a)]
    if off_loopback:
        raise ConfigError(f"insecure mode is only allowed on loopback, but {off_loopback} "
                          f"is not a loopback address; use a job key")
    log.warning("INSECURE: this ring runs without authentication or encryption "
                "(allowed because every address is loopback)")


def _single(collective: Collective) -> Collective:
    """Make an all_reduce of one array return that array instead of a one-element list."""
    finish = collective.finish
    collective.finish = lambda result: finish(result)[0]
    return collective
