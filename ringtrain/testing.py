"""Start N real node processes on this machine, for tests, examples and benchmarks.

    from ringtrain.testing import run_local

    def work(node, scale):            # runs in every process, with that process's Node
        return node.all_reduce(np.ones(3) * scale * (node.rank + 1))

    results = run_local(work, 4, args=(2.0,))   # one result per rank, in rank order

Each run makes its own job key, so the nodes talk over authenticated, encrypted links exactly
as they would across a LAN. The function must be importable (defined at module level): processes are started with
``spawn`` so the same code runs on Linux, macOS and Windows. Each process gets node id
``node-00``, ``node-01``, ... so rank i is process i. Every wait is bounded: a process that
has not finished by the deadline prints its node's state and every thread's stack, and
:class:`ClusterFailed` carries that report for each stuck node.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import Settings
from .errors import RingtrainError
from .node import Node
from .security import JobKey

WATCHDOG_MARGIN = 3.0  # seconds before the parent's deadline at which a child reports itself


class ClusterFailed(RingtrainError):
    """A local node process failed or did not finish; the message holds every node's report."""


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports that were free a moment ago."""
    sockets, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def node_id(index: int) -> str:
    """The node id of local process ``index``; sorting the ids sorts the indexes."""
    return f"node-{index:02d}"


@dataclass
class _Child:
    index: int
    process: Any
    report_path: str
    outcome: tuple | None = None


def _child_main(fn: Callable, index: int, endpoints: list[str], args: tuple, kwargs: dict,
                job: str, settings: Settings | None, key_hex: str, deadline: float,
                report_path: str, conn: Any) -> None:
    node_ref: list[Node] = []

    def watchdog() -> None:
        time.sleep(max(0.0, deadline - time.time()))
        with open(report_path, "w") as report:
            state = node_ref[0].state() if node_ref else "node not constructed"
            report.write(f"node {node_id(index)} did not finish in time; state: {state}\n")
            report.flush()
            faulthandler.dump_traceback(report, all_threads=True)
        os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        with Node(endpoints, listen=endpoints[index], job=job, node_id=node_id(index),
                  settings=settings, key=JobKey.from_hex(key_hex)) as node:
            node_ref.append(node)
            result = fn(node, *args, **kwargs)
        conn.send(("ok", result))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        state = node_ref[0].state() if node_ref else None
        conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc(), state))
    finally:
        conn.close()


@dataclass
class LocalCluster:
    """N node processes on 127.0.0.1 running one function. See :func:`run_local`."""

    fn: Callable
    size: int
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    timeout: float = 60.0
    job: str = "local"
    settings: Settings | None = None
    _children: list[_Child] = field(default_factory=list)
    _pipes: list[Any] = field(default_factory=list)
    _deadline: float = 0.0

    def start(self) -> LocalCluster:
        """Start the processes; returns at once."""
        context = mp.get_context("spawn")
        endpoints = [f"127.0.0.1:{p}" for p in free_ports(self.size)]
        key = JobKey.generate()  # a local run makes its own key: secure without asking
        self._deadline = time.time() + self.timeout
        for index in range(self.size):
            parent, child = context.Pipe(duplex=False)
            report = tempfile.NamedTemporaryFile(prefix=f"ringtrain-{index}-", suffix=".txt",
                                                 delete=False)
            report.close()
            process = context.Process(
                target=_child_main, name=node_id(index), daemon=True,
                args=(self.fn, index, endpoints, self.args, self.kwargs, self.job,
                      self.settings, key.hex(), self._deadline - WATCHDOG_MARGIN, report.name,
                      child))
            process.start()
            child.close()
            self._children.append(_Child(index, process, report.name))
            self._pipes.append(parent)
        return self

    def process(self, index: int) -> Any:
        """The ``multiprocessing.Process`` of node ``index`` (to kill or stop it)."""
        return self._children[index].process

    def results(self, allow_failed: Sequence[int] = ()) -> list[Any]:
        """Each node's return value, in index order; waits until the deadline at most.

        Args:
            allow_failed: indexes whose death or error is expected (their result is None).

        Raises:
            ClusterFailed: a node raised, died or hung; the message has every report.
        """
        try:
            for child, pipe in zip(self._children, self._pipes):
                remaining = max(0.0, self._deadline - time.time())
                if pipe.poll(remaining):
                    try:
                        child.outcome = pipe.recv()
                    except EOFError:
                        child.outcome = None
            problems = []
            for child in self._children:
                if child.outcome is not None and child.outcome[0] == "ok":
                    continue
                if child.index in allow_failed:
                    continue
                problems.append(self._report(child))
            if problems:
                raise ClusterFailed("\n\n".join(problems))
            return [c.outcome[1] if c.outcome and c.outcome[0] == "ok" else None
                    for c in self._children]
        finally:
            self.stop()

    def _report(self, child: _Child) -> str:
        child.process.join(max(0.0, min(WATCHDOG_MARGIN + 1, self._deadline + 1 - time.time())))
        with open(child.report_path) as report:
            hang = report.read()
        if child.outcome is None:
            return (f"{node_id(child.index)}: no result (exit code {child.process.exitcode})\n"
                    f"{hang}")
        _, error, trace, state = child.outcome
        return f"{node_id(child.index)}: {error}\nstate: {state}\n{trace}"

    def stop(self) -> None:
        """Kill whatever still runs and remove the report files."""
        for child in self._children:
            if child.process.is_alive():
                child.process.kill()
            child.process.join(5)
            try:
                os.unlink(child.report_path)
            except OSError:
                pass


def run_local(fn: Callable, size: int, *, args: tuple = (), kwargs: dict | None = None,
              timeout: float = 60.0, job: str = "local", settings: Settings | None = None
              ) -> list[Any]:
    """Run ``fn(node, *args, **kwargs)`` in ``size`` node processes; results in rank order."""
    cluster = LocalCluster(fn, size, args, kwargs or {}, timeout, job, settings)
    return cluster.start().results()


__all__ = ["ClusterFailed", "LocalCluster", "free_ports", "node_id", "run_local"]
