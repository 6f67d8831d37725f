"""Start N real node processes on this machine, for tests, examples and benchmarks.

    from ringtrain.testing import run_local

    def work(node, scale):            # runs in every process, with that process's Node
        return node.all_reduce(np.ones(3) * scale * (node.rank + 1))

    results = run_local(work, 4, args=(2.0,))   # one result per rank, in rank order

Each run makes its own job key, so the nodes talk over authenticated, encrypted links exactly
as they would across a LAN. The function must be importable (defined at module level):
processes start from a fork server that has imported ringtrain already (a spawned process
spends about half a second of CPU importing it; four of them a second of wall time on two
cores), or are spawned where there is none (Windows). Either way a process sees the
environment the parent had when it started it, and nothing else of the parent's.
Each process gets node id ``node-00``, ``node-01``, ... so rank i is process i. Every wait is
bounded: a process that has not finished by the deadline prints its node's state and every
thread's stack, and :class:`ClusterFailed` carries that report for each stuck node.

Elastic tests start more processes into a running cluster with :meth:`LocalCluster.start_extra`:
a node that joins late, or a killed node restarted under its old id (a new incarnation).
"""

from __future__ import annotations

import faulthandler
import functools
import multiprocessing as mp
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .comm.security import JobKey
from .config import Settings
from .errors import RingtrainError
from .node.node import Node

WATCHDOG_MARGIN = 3.0  # seconds before the parent's deadline at which a child reports itself


class ClusterFailed(RingtrainError):
    """A local node process failed or did not finish; the message holds every node's report."""


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that were free a moment ago, in TCP and in UDP (a keyed node
    listens on both: its key door is UDP on the same port)."""
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind((host, 0))
            sockets.append(s)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sockets.append(udp)
            try:
                udp.bind((host, s.getsockname()[1]))
            except OSError:
                continue  # taken in UDP: keep the TCP one bound so that it is not picked again
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


@functools.cache
def _start_context() -> Any:
    """The fork server (ringtrain imported once, in it) where there is one, else spawn."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _child_main(fn: Callable, index: int, endpoints: list[str], listen: str, args: tuple,
                kwargs: dict, job: str, settings: Settings | None, node_options: dict,
                key_hex: str, deadline: float, report_path: str, device_dir: str,
                environ: dict[str, str], conn: Any) -> None:
    node_ref: list[Node] = []
    os.environ.clear()  # the parent's environment now, not the fork server's at its start
    os.environ.update(environ)
    os.environ["RINGTRAIN_DEVICE_DIR"] = device_dir  # this cluster's devices, not the user's

    def watchdog() -> None:
        # until the deadline, or until the parent asks for a report now (LocalCluster.fail)
        while time.time() < deadline and not os.path.exists(report_path + ".now"):
            time.sleep(min(0.1, max(0.0, deadline - time.time())))
        with open(report_path, "w") as report:
            state = node_ref[0].state() if node_ref else "node not constructed"
            report.write(f"node {node_id(index)} did not finish in time; state: {state}\n")
            report.flush()
            faulthandler.dump_traceback(report, all_threads=True)
        os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        with Node(endpoints, listen=listen, job=job, node_id=node_id(index),
                  settings=settings, key=JobKey.from_hex(key_hex), **node_options) as node:
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
    """N node processes on 127.0.0.1 running one function. See :func:`run_local`.

    ``node_options`` are passed to every :class:`Node` (e.g. ``min_size``);
    ``settings_of`` gives some nodes (by index) settings of their own. After
    :meth:`start`, ``endpoints`` lists the nodes' addresses and ``key`` is the job key.
    """

    fn: Callable
    size: int
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    timeout: float = 60.0
    job: str = "local"
    settings: Settings | None = None
    node_options: dict = field(default_factory=dict)
    settings_of: dict[int, Settings] = field(default_factory=dict)
    endpoints: list[str] = field(default_factory=list)
    key: JobKey | None = None
    device_dir: str = ""  # the nodes' device keys and ledgers (a restarted node keeps its own)
    _children: list[_Child] = field(default_factory=list)
    _pipes: list[Any] = field(default_factory=list)
    _deadline: float = 0.0

    def start(self) -> LocalCluster:
        """Start the processes; returns at once."""
        self.endpoints = [f"127.0.0.1:{p}" for p in free_ports(self.size)]
        self.key = JobKey.generate()  # a local run makes its own key: secure without asking
        self.device_dir = self.device_dir or tempfile.mkdtemp(prefix="ringtrain-devices-")
        self._deadline = time.time() + self.timeout
        for index in range(self.size):
            self._spawn(index, self.endpoints, self.endpoints[index], self.fn, self.args,
                        self.kwargs, self.node_options)
        return self

    def start_extra(self, index: int, *, listen: str | None = None, fn: Callable | None = None,
                    args: tuple | None = None, kwargs: dict | None = None,
                    node_options: dict | None = None, device_dir: str | None = None) -> Any:
        """Start one more node process into the running cluster; returns its process.

        It gets node id ``node_id(index)``: ``index`` below ``size`` restarts that node (a new
        incarnation, by default on its old address), a higher one is a new node (by default
        on a fresh port). It dials the cluster's endpoints. Its result follows the others in
        :meth:`results`, in the order started. The defaults are the cluster's ``fn``,
        ``args``, ``kwargs`` and ``node_options``; ``device_dir``: where its device key is
        (default: the cluster's, where a restarted node finds its own key).
        """
        if not self.endpoints:
            raise RingtrainError("start the cluster before starting extra nodes")
        if listen is None:
            listen = self.endpoints[index] if index < self.size \
                else f"127.0.0.1:{free_ports(1)[0]}"
        return self._spawn(index, [*self.endpoints, listen], listen, fn or self.fn,
                           self.args if args is None else args,
                           self.kwargs if kwargs is None else kwargs,
                           self.node_options if node_options is None else node_options,
                           device_dir or self.device_dir)

    def _spawn(self, index: int, endpoints: list[str], listen: str, fn: Callable, args: tuple,
               kwargs: dict, node_options: dict, device_dir: str = "") -> Any:
        context = _start_context()
        parent, child = context.Pipe(duplex=False)
        report = tempfile.NamedTemporaryFile(prefix=f"ringtrain-{index}-", suffix=".txt",
                                             delete=False)
        report.close()
        process = context.Process(
            target=_child_main, name=node_id(index), daemon=True,
            args=(fn, index, endpoints, listen, args, kwargs, self.job,
                  self.settings_of.get(index, self.settings),
                  node_options, self.key.hex(), self._deadline - WATCHDOG_MARGIN, report.name,
                  device_dir or self.device_dir, dict(os.environ), child))
        process.start()
        child.close()
        self._children.append(_Child(index, process, report.name))
        self._pipes.append(parent)
        return process

    def process(self, index: int) -> Any:
        """The ``multiprocessing.Process`` of node ``index`` (to kill or stop it); for a
        restarted node, its newest incarnation."""
        return [c for c in self._children if c.index == index][-1].process

    def results(self, allow_failed: Sequence[int] = ()) -> list[Any]:
        """Each node's return value, in index order; waits until the deadline at most.

        Args:
            allow_failed: node indexes whose death or error is expected (their result is
                None); for a restarted node this covers every incarnation.

        Raises:
            ClusterFailed: a node raised, died or hung; the message has every report.
        """
        try:
            for child, pipe in zip(self._children, self._pipes, strict=True):
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

    def fail(self, why: str) -> None:
        """Stop now and raise :class:`ClusterFailed` with ``why`` and every running node's
        state and stacks (e.g. when a test's own wait for an event runs out).

        Raises:
            ClusterFailed: always.
        """
        for child in self._children:
            if child.process.is_alive():
                open(child.report_path + ".now", "w").close()
                try:
                    os.kill(child.process.pid, signal.SIGCONT)  # a stopped node cannot report
                except OSError:
                    pass
        reports = []
        for child, pipe in zip(self._children, self._pipes, strict=False):
            child.process.join(WATCHDOG_MARGIN)
            if child.outcome is None and pipe.poll(0):
                try:
                    child.outcome = pipe.recv()
                except EOFError:
                    pass
            if child.outcome is not None and child.outcome[0] == "ok":
                reports.append(f"{node_id(child.index)}: finished")
            else:
                reports.append(self._report(child))
        self.stop()
        raise ClusterFailed(why + "\n\n" + "\n\n".join(reports))

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
            for path in (child.report_path, child.report_path + ".now"):
                try:
                    os.unlink(path)
                except OSError:
                    pass
        if self.device_dir.startswith(tempfile.gettempdir()):
            shutil.rmtree(self.device_dir, ignore_errors=True)


def run_local(fn: Callable, size: int, *, args: tuple = (), kwargs: dict | None = None,
              timeout: float = 60.0, job: str = "local", settings: Settings | None = None
              ) -> list[Any]:
    """Run ``fn(node, *args, **kwargs)`` in ``size`` node processes; results in rank order."""
    cluster = LocalCluster(fn, size, args, kwargs or {}, timeout, job, settings)
    return cluster.start().results()


__all__ = ["ClusterFailed", "LocalCluster", "free_ports", "node_id", "run_local"]
