"""A CPU budget per emulated device: a cgroup that caps a process tree at a fraction of a core.

tc shapes an emulated device's link; this shapes its processor. A CFS bandwidth quota lets the
processes of one cgroup run ``cores`` x ``PERIOD_US`` of CPU time per period, then holds them
until the next period. The group also gets ``WEIGHT`` times the default scheduling weight, so
other work on the machine cannot take the budget away: it is a cap and a guarantee. A budget
may be pinned to one core (``taskset``), so the scheduler never stacks two devices on one core
while the other idles. Four devices of 0.45 core thus fit in two cores, two per core, and each
computes as fast as it would alone. Everything in the group counts: the training thread,
BLAS, ZeroMQ's I/O thread and its encryption.

    budget = CpuBudget("rtab12cd-0", 0.45, core=0)
    subprocess.run(budget.command(["python", "train.py"]))   # runs inside the budget
    budget.close()                                             # kills what is left, removes it

cgroup v2 (``cpu.max``) where the unified hierarchy has the cpu controller, else cgroup v1
(``cpu.cfs_quota_us``). Linux and root only; pinning needs ``taskset`` (util-linux).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

from ..errors import ConfigError

PERIOD_US = 10_000
"""The quota period: 10 ms, so a device that used its share waits at most ~6 ms to run again
(at 0.45 core) instead of ~55 ms with the kernel's default 100 ms; members of a ring then
finish a computation within a few ms of one another, as unthrottled devices would."""
WEIGHT = 100
"""Scheduling weight over the default (v1 ``cpu.shares`` 1024, v2 ``cpu.weight`` 100): a
budgeted device wins the CPU over unbudgeted processes until its quota runs out."""
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MOUNTS = Path("/proc/mounts")
_EMPTY_WAIT_S = 5.0


def hierarchy() -> tuple[int, Path]:
    """The cgroup version and mount point that offer the cpu controller.

    Raises:
        ConfigError: not root, or no cpu controller is mounted; the message says which.
    """
    if os.geteuid() != 0:
        raise ConfigError("a device CPU budget (a cgroup CPU quota) needs root")
    v1 = None
    try:
        mounts = _MOUNTS.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read {_MOUNTS} to find the cgroup cpu controller: {exc}") \
            from exc
    for line in mounts:
        fields = line.split()
        if len(fields) < 4:
            continue
        mount, kind, options = Path(fields[1]), fields[2], fields[3].split(",")
        if kind == "cgroup2" and "cpu" in _read(mount / "cgroup.controllers").split():
            return 2, mount
        if kind == "cgroup" and "cpu" in options and v1 is None:
            v1 = mount
    if v1 is not None:
        return 1, v1
    raise ConfigError("no cgroup cpu controller is mounted (neither cgroup v2 with 'cpu' in "
                      "cgroup.controllers nor a cgroup v1 'cpu' hierarchy): cannot give "
                      "emulated devices a CPU budget")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as exc:
        raise ConfigError(f"cannot write {text!r} to {path}: {exc}") from exc


def groups() -> list[str]:
    """Names of the top-level groups in the cpu hierarchy (empty if there is none)."""
    try:
        _, mount = hierarchy()
    except ConfigError:
        return []
    return sorted(path.name for path in mount.iterdir() if path.is_dir())


def remove(name: str) -> None:
    """SIGKILL every process left in group ``name``, then delete the group; no-op if absent.

    Raises:
        ConfigError: a bad name, or the group still holds processes after 5 s.
    """
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(f"cgroup name must match {_NAME_RE.pattern!r}, got {name!r}")
    _, mount = hierarchy()
    path = mount / name
    deadline = time.monotonic() + _EMPTY_WAIT_S
    while path.is_dir():
        for pid in _read(path / "cgroup.procs").split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            path.rmdir()  # fails with EBUSY until the killed processes are gone
        except FileNotFoundError:
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise ConfigError(f"cannot remove cgroup {path}: {exc}") from exc
            time.sleep(0.02)


class CpuBudget:
    """A cgroup named ``name`` whose processes share ``cores`` of CPU time.

    Args:
        name: the group's directory name, new (letters, digits, ``_.-``; up to 64).
        cores: the budget in cores, in (0, os.cpu_count()].
        core: run the processes on this core only (a budget of at most 1); None lets them
            run on any.

    Raises:
        ConfigError: bad arguments, no support (:func:`hierarchy`), no ``taskset`` for
            ``core``, the group exists, or the kernel refused the quota.
    """

    def __init__(self, name: str, cores: float, core: int | None = None) -> None:
        if not _NAME_RE.fullmatch(name):
            raise ConfigError(f"cgroup name must match {_NAME_RE.pattern!r}, got {name!r}")
        limit = os.cpu_count() or 1
        if isinstance(cores, bool) or not isinstance(cores, (int, float)) \
                or not 0 < cores <= limit:
            raise ConfigError(f"a CPU budget must be in (0, {limit}] cores, got {cores!r}")
        if core is not None:
            if core not in os.sched_getaffinity(0) or cores > 1:
                raise ConfigError(f"core must be one of {sorted(os.sched_getaffinity(0))} "
                                  f"with a budget of at most 1 core, got core {core!r} for "
                                  f"{cores!r} cores")
            if shutil.which("taskset") is None:
                raise ConfigError("'taskset' not found: install the Debian package util-linux")
        self.name = name
        self.cores = float(cores)
        self.core = core
        version, mount = hierarchy()
        self.path = mount / name
        quota = max(1000, round(self.cores * PERIOD_US))  # the kernel's minimum is 1 ms
        if version == 2 and "cpu" not in _read(mount / "cgroup.subtree_control").split():
            _write(mount / "cgroup.subtree_control", "+cpu")
        try:
            self.path.mkdir()
        except FileExistsError as exc:
            raise ConfigError(f"cgroup {self.path} already exists; remove it or pick another "
                              f"name") from exc
        except OSError as exc:
            raise ConfigError(f"cannot create cgroup {self.path}: {exc}") from exc
        try:
            if version == 2:
                _write(self.path / "cpu.max", f"{quota} {PERIOD_US}")
                _write(self.path / "cpu.weight", str(100 * WEIGHT))
            else:
                _write(self.path / "cpu.cfs_period_us", str(PERIOD_US))
                _write(self.path / "cpu.cfs_quota_us", str(quota))
                _write(self.path / "cpu.shares", str(1024 * WEIGHT))
        except BaseException:
            self.close()
            raise

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` wrapped so that it runs inside this budget from its first instruction."""
        procs = str(self.path / "cgroup.procs")
        if self.core is not None:
            argv = ["taskset", "-c", str(self.core), *argv]
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *argv]

    def close(self) -> None:
        """Kill whatever still runs in the group and delete it."""
        remove(self.name)
