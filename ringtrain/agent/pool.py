"""The pool loop: idle agents and submitters in one ring, one all-gather of rows a round.

Every member runs rounds: build its row (:mod:`.protocol`), all-gather the rows, act on
them, sleep ``ROUND_SECONDS``. A member whose node wants the ring re-formed (a newcomer
waits to be admitted, a member is suspected) says so in its row; every member then re-forms
after the same round, as the Trainer does after a step. A failed round re-forms too.

An agent that :func:`~.protocol.assign` picks for a request starts the job as a child
process of its own: ``ringtrain node`` with the job name, the picked agents' addresses as
peers, its own job key file, and either no script (the built-in digits job) or a script
from the directory its owner named. Nothing that came over the network is run: a request
names a job; the code is what is already on the device. When the job ends the agent posts a
report (exit code and the job's last line) in its row, and the submitter, still in the pool,
prints it.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import Settings
from ..errors import CollectiveError, ConfigError, MembershipError, MismatchError, RingtrainError
from ..node.node import Node
from .protocol import JobReport, JobRequest, PoolRow, assign, decode, encode

__all__ = ["ROUND_SECONDS", "AgentPool", "JobOutcome", "pool_settings", "submit"]

log = logging.getLogger(__name__)

ROUND_SECONDS = 0.25
ROUND_TIMEOUT = 20.0  # seconds for one round's all-gather
SUMMARY_CHARS = 300
LINGER_ROUNDS = 240  # an agent told to stop after its jobs posts its report this long at most
Say = Callable[[str], None]


def pool_settings() -> Settings:
    """A pool ring's node settings: patient. Nothing in the pool is urgent, and an agent
    running a job on all its cores may answer late; a healthy member must not be dropped
    for that."""
    return dataclasses.replace(Settings.from_env(), heartbeat_timeout=10.0,
                               progress_floor=10.0, progress_timeout=30.0,
                               reform_timeout=60.0)


def pool_round(node: Node, row: PoolRow, reform: bool = True) -> list[PoolRow] | None:
    """One round: the members' rows (a member's bad row is left out, on every member
    alike), or None if the round failed (then, with ``reform``, the ring re-forms)."""
    try:
        work = node.all_gather_async(encode(row), timeout=ROUND_TIMEOUT)
        gathered = work.wait()
    except MismatchError:
        raise
    except CollectiveError as exc:
        log.warning("node %s: pool round failed (%s)%s", node.node_id, exc,
                    "; re-forming" if reform else "")
        if reform:
            _reform(node)
        return None
    rows = []
    # the members of the view the rows were gathered in: the node may already hold the next
    # one (a joiner admitted meanwhile), whose members would not match the rows
    for member, raw in zip(work.members or node.members, gathered, strict=True):
        try:
            rows.append(decode(raw, member))
        except ConfigError as exc:
            log.warning("%s; its row is ignored", exc)
    if reform and any(r.reform for r in rows):
        _reform(node)
    return rows


def _reform(node: Node) -> None:
    """Re-form the pool ring; if that fails, the next round tries again."""
    try:
        node.reform()
    except MembershipError as exc:
        log.warning("node %s: the pool could not re-form yet (%s)", node.node_id, exc)


@dataclass
class _Job:
    request: JobRequest
    process: subprocess.Popen | None
    log_path: Path
    early: JobReport | None = None  # refused before it started


class AgentPool:
    """This device's agent: waits in the pool, runs the jobs it is handed.

    Args:
        node: its node in the pool ring.
        address: ``host:port`` its job nodes listen on (reachable by the other agents).
        key_file: the job key file the job nodes use.
        workdir: where job logs and checkpoints go (``<workdir>/<job>/``).
        scripts: the directory of scripts a request may name (None: the built-in job only).
        say: where one line per event goes.
    """

    def __init__(self, node: Node, address: str, key_file: str, workdir: Path,
                 scripts: Path | None = None, say: Say = print):
        self.node, self.address, self.key_file = node, address, key_file
        self.workdir, self.scripts, self.say = Path(workdir), scripts, say
        self.jobs_done = 0
        self._job: _Job | None = None
        self._report: JobReport | None = None
        self._submitter = ""  # who asked for the last job

    def run(self, stop: threading.Event | None = None, jobs: int | None = None) -> None:
        """Take part in rounds until ``stop`` is set, or ``jobs`` jobs have been reported."""
        self.say(f"agent {self.node.node_id}: idle in pool {self.node.job}, job port "
                 f"{self.address}")
        while not (stop is not None and stop.is_set()):
            self._check_job()
            if jobs is not None and self.jobs_done >= jobs:
                self._linger()
                return
            self._round()
            time.sleep(ROUND_SECONDS)

    def _linger(self) -> None:
        """Before leaving: keep posting the last report until its submitter has left the
        pool (it leaves once it has every report), or a round fails, or LINGER_ROUNDS."""
        submitter = self._submitter
        for _ in range(LINGER_ROUNDS):
            rows = pool_round(self.node, self._row(), reform=False)
            if rows is None or submitter not in {r.node for r in rows}:
                return
            time.sleep(ROUND_SECONDS)

    def _row(self) -> PoolRow:
        busy = self._job.request.request if self._job is not None else ""
        return PoolRow(self.node.node_id, "agent", self.address, busy, None, self._report,
                       self.node.reform_due)

    def _round(self) -> None:
        rows = pool_round(self.node, self._row())
        if rows is None or self._job is not None:
            return
        requests = {r.request.request: r.request for r in rows if r.request is not None}
        for request_id, agents in assign(rows).items():
            if self.node.node_id in agents:
                peers = [r.address for r in rows if r.node in agents]
                self._start(requests[request_id], peers, rows)

    def _start(self, request: JobRequest, peers: list[str], rows: list[PoolRow]) -> None:
        submitter = self._submitter = next((r.node for r in rows if r.request is not None
                                            and r.request.request == request.request), "?")
        job_dir = self.workdir / request.job
        job_dir.mkdir(parents=True, exist_ok=True)
        log_path = job_dir / f"{self.node.node_id}.log"
        host, _, port = self.address.rpartition(":")
        argv = [sys.executable, "-m", "ringtrain", "node", "--job", request.job,
                "--min-nodes", str(request.nodes), "--max-nodes", str(request.nodes),
                "--no-discovery", "--interface", host, "--port", port,
                # its own name: the agent's node holds the agent's device key (locked)
                "--node-id", f"{self.node.node_id}-job", "--key-file", self.key_file,
                *(a for peer in peers for a in ("--peer", peer))]
        if request.kind == "builtin":
            argv += ["--epochs", str(request.epochs), "--checkpoint-dir", str(job_dir)]
        else:
            script = None if self.scripts is None else self.scripts / request.script
            if script is None or not script.is_file():
                why = ("this agent runs no scripts (start it with --scripts DIR)"
                       if self.scripts is None else f"no script {request.script} in "
                                                    f"{self.scripts}")
                self.say(f"agent {self.node.node_id}: refused job {request.job} from "
                         f"{submitter}: {why}")
                self._job = _Job(request, None, log_path, JobReport(request.request, 2, why))
                return
            argv += [str(script), *request.args]
        self.say(f"agent {self.node.node_id}: running job {request.job} ({request.kind}) for "
                 f"{submitter} with {', '.join(peers)}; log {log_path}")
        with open(log_path, "w") as output:
            # in the job's folder: whatever the job writes (run files, checkpoints) goes there
            process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, cwd=job_dir)
        self._job = _Job(request, process, log_path)

    def _check_job(self) -> None:
        job = self._job
        if job is None:
            return
        if job.early is not None:
            report = job.early
        elif job.process is not None and job.process.poll() is not None:
            lines = [line for line in job.log_path.read_text(errors="replace").splitlines()
                     if line.strip()]
            report = JobReport(job.request.request, job.process.returncode,
                               (lines[-1] if lines else "(no output)")[:SUMMARY_CHARS])
        else:
            return
        self.say(f"agent {self.node.node_id}: job {job.request.job} ended, exit code "
                 f"{report.exit_code}: {report.summary}")
        self._report, self._job = report, None
        self.jobs_done += 1


@dataclass(frozen=True)
class JobOutcome:
    """What a submit got back: the agents that ran the job and each one's report."""

    agents: tuple[str, ...]
    reports: dict[str, JobReport]

    @property
    def ok(self) -> bool:
        """Whether every agent's job exited 0."""
        return all(r.exit_code == 0 for r in self.reports.values())


def submit(node: Node, request: JobRequest, timeout: float, say: Say = print) -> JobOutcome:
    """Hand ``request`` to the pool ``node`` is in and wait for every agent's report.

    Raises:
        RingtrainError: not enough idle agents, or no reports, within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    posted: JobRequest | None = request
    agents: list[str] = []
    reports: dict[str, JobReport] = {}
    waiting_said = False
    while time.monotonic() < deadline:
        rows = pool_round(node, PoolRow(node.node_id, "submitter", request=posted,
                                        reform=node.reform_due))
        if rows is not None and not agents:
            agents = assign(rows).get(request.request, [])
            if agents:
                posted = None
                say(f"submit {node.node_id}: job {request.job} handed to {', '.join(agents)}")
            elif not waiting_said:
                idle = sum(1 for r in rows if r.role == "agent" and not r.busy)
                say(f"submit {node.node_id}: waiting for {request.nodes} idle agents "
                    f"({idle} idle in the pool now)")
                waiting_said = True
        elif rows is not None:
            present = {r.node for r in rows}
            for row in rows:
                if row.node in agents and row.report is not None \
                        and row.report.request == request.request:
                    reports[row.node] = row.report
            for agent in agents:
                if agent not in present and agent not in reports:
                    reports[agent] = JobReport(request.request, -1, "left the pool before "
                                                                    "reporting")
            if len(reports) == len(agents):
                return JobOutcome(tuple(agents), reports)
        time.sleep(ROUND_SECONDS)
    what = "reports" if agents else f"{request.nodes} idle agents"
    raise RingtrainError(f"submit of job {request.job}: no {what} within {timeout:.0f} s "
                         f"(reports from {sorted(reports)} of {agents})")
