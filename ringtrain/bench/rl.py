"""Distributed PPO on emulated devices: ``ringtrain bench-rl``.

    sudo ringtrain bench-rl                                   # every scenario, 3 runs each
    sudo ringtrain bench-rl --scenarios scaling --repeats 5

Linux and root only. Every run builds a fresh emulated LAN (:mod:`ringtrain.lab.netns`) of
N devices as ``bench-scaling`` does: one network namespace per device, its link shaped to
``--rate``, and a CPU budget of ``--cpu`` cores (a cgroup quota; device i pinned to core i
mod cores), so 4 devices really have 4x the compute of one. Each device runs one process:
a :class:`~ringtrain.node.node.Node` with a job key (encrypted links) and a
:class:`~ringtrain.rl.DistributedPPO` on its own CartPole-v1 environments, until the ring's
last 100 episodes average at least 475 (solved) or the step budget runs out.

Scenarios, each run ``--repeats`` times, interleaved:

* ``scaling``: 1 device, synchronous, beside ``--nodes`` devices in ``--scaling-mode``
  (synchronous by default): wall-clock time (from the end of the start-up collectives to
  the round that solves) and the ring's environment steps.
* ``slow``: 4 devices in asynchronous mode, once as they are and once with device 3 stopped
  (SIGSTOP) for ``--stop-seconds`` at ``--stop-at`` seconds into training; the same with
  synchronous mode for contrast. Reported: the other devices' environment steps per second
  (their own steps over their own wall time), the ratio slowed / unslowed, whether the ring
  solved, the largest staleness.
* ``kill``: 4 devices, synchronous; device 3 is killed (SIGKILL) once the ring has combined
  ``--kill-round`` rounds. Reported: whether the survivors solved, and whether they ended
  with bit-identical parameters (hash of the policy and value parameters).
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..comm.security import JobKey, read_key_file, write_key_file
from ..config import Settings
from ..errors import ConfigError, RingtrainError
from ..lab.netns import EmulatedLan
from ..node.node import Node

PORT = 7077
SCENARIOS = ("scaling", "slow", "kill")
_RESULT, _ROUND = "RESULT ", "ROUND "
_THREADS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
METHOD = (__doc__ or "").partition("\n\n")[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``ringtrain bench-rl``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = METHOD
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, of {', '.join(SCENARIOS)} (default all)")
    parser.add_argument("--nodes", type=int, default=4, help="devices of the ring (default 4)")
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="link rate of every device, Mbit/s (default 1000)")
    parser.add_argument("--cpu", type=float, default=0.45,
                        help="CPU budget of every device, in cores (default 0.45)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of every configuration, interleaved (default 3)")
    parser.add_argument("--scaling-mode", choices=("sync", "async"), default="sync",
                        help="scaling: the mode of the N-device runs (default sync)")
    parser.add_argument("--stop-at", type=float, default=2.0,
                        help="slow: seconds into training when device 3 is stopped (default 2)")
    parser.add_argument("--stop-seconds", type=float, default=3.0,
                        help="slow: how long device 3 stays stopped (default 3)")
    parser.add_argument("--kill-round", type=int, default=10,
                        help="kill: the round after which device 3 is killed (default 10)")
    parser.add_argument("--direct-bytes", type=int, default=64 * 1024,
                        help="all-reduces up to this size take one round instead of a ring "
                             "(Settings.direct_bytes; default 65536: the gradient, 37 KB)")
    parser.add_argument("--spin-seconds", type=float, default=0.0,
                        help="Settings.spin_seconds of the devices (default 0: a device's "
                             "budget goes to acting and training, not to spinning waits)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds one run may take, start-up included (default 300)")


# one device -----------------------------------------------------------------------------

def _params_hash(learner: Any) -> str:
    digest = hashlib.sha256(learner.model.policy.params.tobytes())
    digest.update(learner.model.value.params.tobytes())
    return digest.hexdigest()[:16]


def _device(config: dict[str, Any]) -> dict[str, Any]:
    """Train on this device; the report the parent tabulates."""
    from ..rl import DistributedPPO, RLConfig, make_vector_env  # noqa: PLC0415

    rl = RLConfig(mode=config["mode"], seed=config["seed"])
    env, spec = make_vector_env(rl.env_id, rl.envs_per_node)
    addresses, rank = config["addresses"], config["rank"]
    settings = Settings.from_env(direct_bytes=config["direct_bytes"],
                                 spin_seconds=config["spin_seconds"])
    with Node(addresses, listen=addresses[rank], job="bench-rl", node_id=f"device-{rank}",
              key=read_key_file(config["key_file"]), min_size=1, settings=settings) as node:
        learner = DistributedPPO(node, env, spec.obs_size, spec.actions, rl)
        started, cpu = time.perf_counter(), time.process_time()
        steps_before = learner.actor.env_steps

        def show(report: Any) -> None:
            print(f"{_ROUND}{report.round} {time.perf_counter() - started:.2f} "
                  f"{report.env_steps} {report.mean_return:.1f}", flush=True)

        last = learner.run(show)
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu
        return {"cpu": cpu, "solved": bool(last is not None and last.solved), "wall": wall,
                "rounds": learner.counters.rounds, "env_steps": learner.counters.env_steps,
                "local_steps": learner.actor.env_steps - steps_before,
                "mean_return": learner.window.mean_return, "hash": _params_hash(learner),
                "world_size": node.world_size, "reforms": learner.reforms,
                "dropped_rounds": learner.dropped_rounds,
                "max_staleness": learner.max_staleness, "seconds": learner.seconds}


def worker_main(argv: list[str]) -> int:
    """``python -m ringtrain.bench.rl worker CONFIG_JSON``: one device."""
    config = json.loads(argv[0])

    def watchdog() -> None:
        time.sleep(max(0.0, config["deadline"] - time.time()))
        print("device did not finish in time", flush=True)
        faulthandler.dump_traceback(sys.stdout, all_threads=True)
        os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    print(_RESULT + json.dumps(_device(config)), flush=True)
    return 0


# the parent -----------------------------------------------------------------------------

@dataclass
class _Device:
    rank: int
    popen: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    rounds: int = 0
    pump: threading.Thread | None = None

    def result(self) -> dict[str, Any] | None:
        found = [line for line in self.lines if line.startswith(_RESULT)]
        return json.loads(found[-1][len(_RESULT):]) if found else None


def _pump(device: _Device) -> None:
    for line in device.popen.stdout:  # type: ignore[union-attr]
        line = line.rstrip("\n")
        device.lines.append(line)
        if line.startswith(_ROUND):
            device.rounds = int(line.split()[1])


@dataclass(frozen=True)
class Run:
    """One run's outcome: every device's report (None: killed or failed)."""

    scenario: str
    nodes: int
    mode: str
    event: str  # "", "stop", "kill"
    reports: list[dict[str, Any] | None]


def measure(scenario: str, nodes: int, mode: str, event: str, seed: int,
            args: argparse.Namespace, key_file: Path) -> Run:
    """One run on a fresh emulated LAN."""
    deadline = time.time() + args.timeout
    with EmulatedLan(nodes, rate_mbit=args.rate, cpu_cores=args.cpu) as lan:
        addresses = [f"{lan.address(i)}:{PORT}" for i in range(nodes)]
        env = {**os.environ, **_THREADS, "PYTHONUNBUFFERED": "1"}
        devices = []
        for rank in range(nodes):
            config = {"addresses": addresses, "rank": rank, "key_file": str(key_file),
                      "mode": mode, "deadline": deadline - 5,
                      "direct_bytes": args.direct_bytes, "seed": seed,
                      "spin_seconds": args.spin_seconds}
            argv = [sys.executable, "-m", "ringtrain.bench.rl", "worker", json.dumps(config)]
            popen = lan.popen(rank, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env)
            device = _Device(rank, popen)  # type: ignore[arg-type]
            device.pump = threading.Thread(target=_pump, args=(device,), daemon=True)
            device.pump.start()
            devices.append(device)
        victim = devices[-1]
        if event == "stop":
            _wait_for(lambda: victim.rounds >= 1, deadline)
            time.sleep(args.stop_at)
            victim.popen.send_signal(signal.SIGSTOP)
            time.sleep(args.stop_seconds)
            victim.popen.send_signal(signal.SIGCONT)
        elif event == "kill":
            _wait_for(lambda: victim.rounds >= args.kill_round, deadline)
            victim.popen.kill()
        _wait_for(lambda: all(d.popen.poll() is not None for d in devices), deadline)
        for device in devices:
            if device.popen.poll() is None:
                device.popen.kill()
            device.popen.wait(5)
            assert device.pump is not None
            device.pump.join(5)
        reports = [device.result() for device in devices]
        failed = [d for d in devices if d.result() is None and not (event == "kill"
                                                                     and d is victim)]
        if failed:
            raise RingtrainError("bench-rl run failed:\n" + "\n".join(
                f"  device {d.rank} (exit {d.popen.returncode}):\n    "
                + "\n    ".join(d.lines[-30:]) for d in failed))
        return Run(scenario, nodes, mode, event, reports)


def _wait_for(condition: Any, deadline: float) -> None:
    while not condition() and time.time() < deadline:
        time.sleep(0.02)


# tables ---------------------------------------------------------------------------------

def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def scaling_table(runs: list[Run]) -> str:
    """1 device beside N: time to solve and environment steps (medians over runs)."""
    lines = ["| devices | solved | time to solve (median, range) | env steps (median) | "
             "rounds | ms per round: acting / training / waiting | CPU cores used | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    single = None
    for nodes in sorted({r.nodes for r in runs}):
        mine = [r for r in runs if r.nodes == nodes]
        reports = [max((x for x in r.reports if x), key=lambda x: x["wall"]) for r in mine]
        walls = [x["wall"] for x in reports]
        wall = _median(walls)
        single = wall if nodes == 1 else single
        speedup = f"{single / wall:.2f}x" if single else ""
        rounds = _median([x["rounds"] for x in reports])
        split = " / ".join(f"{_median([x['seconds'][k] / x['rounds'] for x in reports]) * 1e3:.0f}"
                           for k in ("acting", "training", "waiting"))
        lines.append(f"| {nodes} | {sum(x['solved'] for x in reports)}/{len(reports)} | "
                     f"{wall:.1f} s ({min(walls):.1f}-{max(walls):.1f}) | "
                     f"{_median([x['env_steps'] for x in reports]):,.0f} | "
                     f"{rounds:.0f} | {split} | "
                     f"{_median([x['cpu'] / x['wall'] for x in reports]):.2f} | {speedup} |")
    return "\n".join(lines)


def slow_table(runs: list[Run]) -> str:
    """The devices that were not stopped: env steps/s with and without a stopped peer."""
    lines = ["| mode | device 3 | others' env steps/s (median) | slowed / unslowed | solved | "
             "largest staleness | re-formations |", "|---|---|---|---|---|---|---|"]
    for mode in ("async", "sync"):
        base = None
        for event in ("", "stop"):
            mine = [r for r in runs if r.mode == mode and r.event == event]
            if not mine:
                continue
            rates = [x["local_steps"] / x["wall"] for r in mine for x in r.reports[:-1] if x]
            rate = _median(rates)
            base = rate if event == "" else base
            ratio = f"{rate / base:.2f}" if event and base else "1.00"
            solved = sum(all(x and x["solved"] for x in r.reports[:-1]) for r in mine)
            staleness = max(x["max_staleness"] for r in mine for x in r.reports if x)
            reforms = _median([max(x["reforms"] for x in r.reports if x) for r in mine])
            lines.append(f"| {mode} | {'stopped' if event else 'running'} | {rate:,.0f} | "
                         f"{ratio} | {solved}/{len(mine)} | {staleness} | {reforms:.0f} |")
    return "\n".join(lines)


def kill_table(runs: list[Run]) -> str:
    """Survivors of a SIGKILL: solved, identical parameters."""
    lines = ["| run | survivors | solved | identical parameters | time to solve | "
             "env steps | rounds dropped |", "|---|---|---|---|---|---|---|"]
    for index, run in enumerate(runs, start=1):
        alive = [x for x in run.reports[:-1] if x]
        identical = len({x["hash"] for x in alive}) == 1
        lines.append(f"| {index} | {len(alive)} | {all(x['solved'] for x in alive)} | "
                     f"{identical} ({alive[0]['hash'] if alive else '-'}) | "
                     f"{max(x['wall'] for x in alive):.1f} s | {alive[0]['env_steps']:,} | "
                     f"{max(x['dropped_rounds'] for x in alive)} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Every scenario; prints the tables."""
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown or not scenarios:
        raise ConfigError(f"--scenarios takes {', '.join(SCENARIOS)}; got {args.scenarios!r}")
    if args.nodes < 2 or args.repeats < 1 or not args.timeout > 0:
        raise ConfigError("need --nodes >= 2, --repeats >= 1, --timeout > 0")
    plan = []
    for seed in range(args.repeats):  # run r of every configuration: job seed r
        if "scaling" in scenarios:
            plan += [("scaling", 1, "sync", "", seed),
                     ("scaling", args.nodes, args.scaling_mode, "", seed)]
        if "slow" in scenarios:
            plan += [("slow", args.nodes, mode, event, seed) for mode in ("async", "sync")
                     for event in ("", "stop")]
        if "kill" in scenarios:
            plan += [("kill", args.nodes, "sync", "kill", seed)]
    print(f"bench-rl: PPO on CartPole-v1 (solved: the ring's last 100 episodes average >= "
          f"475); devices of {args.cpu:g} core, links {args.rate:g} Mbit/s; {len(plan)} runs",
          flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="ringtrain-bench-rl-") as tmp:
        key_file = write_key_file(Path(tmp) / "job.key", JobKey.generate())
        for scenario, nodes, mode, event, seed in plan:
            result = measure(scenario, nodes, mode, event, seed, args, key_file)
            runs.append(result)
            done = [x for x in result.reports if x]
            print(f"  {nodes} device(s), {mode}{', ' + event if event else ''}: "
                  + ", ".join(f"{x['wall']:.1f} s {'solved' if x['solved'] else 'NOT solved'}"
                              f" {x['local_steps'] / x['wall']:,.0f} steps/s" for x in done),
                  flush=True)
    if "scaling" in scenarios:
        print(f"\nscaling (1 device synchronous, {args.nodes} {args.scaling_mode}):")
        print(scaling_table([r for r in runs if r.scenario == "scaling"]))
    if "slow" in scenarios:
        print(f"\none device stopped for {args.stop_seconds:g} s, {args.stop_at:g} s into "
              f"training ({args.nodes} devices):")
        print(slow_table([r for r in runs if r.scenario == "slow"]))
    if "kill" in scenarios:
        print(f"\ndevice {args.nodes - 1} killed (SIGKILL) after round {args.kill_round}:")
        print(kill_table([r for r in runs if r.scenario == "kill"]))
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "worker":
        sys.exit(worker_main(sys.argv[2:]))
    from ..cli.main import main

    sys.exit(main(["bench-rl", *sys.argv[1:]]))
