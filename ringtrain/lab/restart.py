"""``ringtrain lab-restart``: restarted devices and a split start, on an emulated LAN (root).

    sudo ringtrain lab-restart                       # scenarios A, B and C in turn
    sudo ringtrain lab-restart --scenario A --epochs 40

Four network namespaces on one bridge (:class:`ringtrain.lab.netns.EmulatedLan`), each an
emulated device with its own folder (working directory, ``HOME`` and
``RINGTRAIN_DEVICE_DIR``, so its device key and node id survive a restart), running
``ringtrain node --key-file job.key --peer ... --state-file state.json --epochs E`` exactly as a
user runs it on a device: the built-in digits job, the default port 7077, static peers (mDNS
stays on, as by default).

* **A**: one node (not the lowest id) SIGKILLed and restarted at once with the same command in
  the same namespace, three times in a row; then SIGTERM (a graceful leave, as Ctrl-C), and
  restarted once it exited.
* **B**: the same for the lowest-ranked node (the lowest node id: rank 0).
* **C**: a 2|2 split at start (nftables between the pairs before any node starts, ``--min-nodes
  2``): each pair forms its own ring and trains; then the split heals, and the two rings must
  become one.

Per restart: seconds from the kill (or SIGTERM) until every node runs one view of 4 members
(the nodes' "ring formed" / "ring re-formed" lines, stamped as they arrive); the longest gap
between consecutive training steps on each surviving node (its ``metrics.jsonl``: one row per
step with its wall-clock end) against the failure-detection bound (``--heartbeat-timeout``).
At the end every node must end with "done at step S, model ... hash H", the same H everywhere.
One line per event, a table at the end; exit 1 if a check fails. Every wait is bounded; on a
timeout every node's last lines and state file are printed. Namespaces and processes are
removed whatever happens.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..comm.security import JobKey, write_key_file
from ..config import Settings
from ..errors import ConfigError
from ..observe.metrics import METRICS_FILE, read_metrics
from .netns import EmulatedLan

NODES = 4
PORT = 7077  # the product's default: a restart comes back on the same address and port
JOB = "default"
_IN_RING = re.compile(r"ringtrain node (\S+): in a ring of (\d+) \(generation (\d+)\)")
_VIEW = re.compile(r"ring (?:re-)?formed: (\d+) members, generation (\d+)")
_END = re.compile(r"ringtrain node (\S+): (done|left the ring) at step (\d+), model generation "
                  r"(\d+) step \d+ hash ([0-9a-f]+)")
_SHOWN = re.compile(r"ring formed|ring re-formed|suspects|blamed|two rings|redone|done at|"
                    r"left the ring|could not|failed|error|Error|Assert|Traceback|leaving")


class LabFailure(RuntimeError):
    """A bounded wait ran out, or a node died unexpectedly (the message says which)."""


def stamp() -> str:
    now = time.time()
    return time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"


def say(text: str) -> None:
    print(f"{stamp()} lab: {text}", flush=True)


@dataclass
class Device:
    """One emulated device: a namespace, a folder, and the `ringtrain node` processes it ran."""

    lan: EmulatedLan
    index: int
    folder: Path
    argv: list[str]
    echo: bool
    lines: list[tuple[float, str]] = field(default_factory=list)  # (wall clock, text)
    process: subprocess.Popen[str] | None = None
    launches: list[float] = field(default_factory=list)
    node_id: str | None = None

    @property
    def name(self) -> str:
        return f"dev{self.index}"

    @property
    def state_file(self) -> Path:
        return self.folder / "state.json"

    def start(self) -> None:
        """Run the node's command in its namespace, from its folder (a device's home)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HOME": str(self.folder / "home"),
               "RINGTRAIN_DEVICE_DIR": str(self.folder / "home" / "devices")}
        env.pop("XDG_CONFIG_HOME", None)
        launched = time.time()
        self.process = self.lan.popen(self.index, self.argv, cwd=str(self.folder), env=env,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
        self.launches.append(launched)
        self.lines.append((launched, f"--- launched (pid {self.process.pid})"))
        threading.Thread(target=self._pump, args=(self.process,), daemon=True).start()

    def _pump(self, process: subprocess.Popen[str]) -> None:
        with (self.folder / "output.log").open("a") as log:
            log.write(f"--- {stamp()} launched (pid {process.pid}): {' '.join(self.argv)}\n")
            for line in process.stdout:  # type: ignore[union-attr]
                self._line(line.rstrip("\n"))
                log.write(f"{stamp()} {line}")
                log.flush()

    def _line(self, text: str) -> None:
        self.lines.append((time.time(), text))
        if (found := _IN_RING.search(text)) and self.node_id is None:
            self.node_id = found.group(1)
        if self.echo and _SHOWN.search(text):
            print(f"{stamp()} {self.name}| {text}", flush=True)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, number: int) -> None:
        assert self.process is not None
        # `ip netns exec` execs the command: the pid is the node's own
        self.process.send_signal(number)

    def wait_exit(self, timeout: float) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise LabFailure(f"{self.name} did not exit within {timeout:.0f} s") from None

    def views_since(self, since: float) -> list[tuple[float, int, int]]:
        """(time, size, generation) of every ring line printed after ``since``."""
        return [(t, int(m.group(1)), int(m.group(2))) for t, text in list(self.lines)
                if t >= since and (m := _VIEW.search(text))]

    def view(self) -> tuple[int, int] | None:
        """(size, generation) of the last ring line of the current process."""
        since = self.launches[-1] if self.launches else 0.0
        views = self.views_since(since)
        return (views[-1][1], views[-1][2]) if views else None

    def steps(self) -> list[dict]:
        """This device's metrics rows (one per step, every process of it, in order)."""
        if self.node_id is None:
            return []
        path = self.folder / f"ringtrain-{JOB}" / self.node_id / METRICS_FILE
        return read_metrics(path) if path.exists() else []

    def end(self) -> re.Match[str] | None:
        for _, text in reversed(self.lines):
            if found := _END.search(text):
                return found
        return None

    def tail(self, n: int = 12) -> str:
        try:
            state = self.state_file.read_text().strip()
        except OSError:
            state = "(no state file)"
        code = None if self.process is None else self.process.poll()
        lines = "\n    ".join(text for _, text in self.lines[-n:]) or "(no output)"
        return (f"  {self.name} ({self.node_id or 'id not yet known'}, exit code {code}), state: "
                f"{state}\n    {lines}")


@dataclass
class Episode:
    """One restart and what it measured."""

    scenario: str
    how: str  # "SIGKILL" or "SIGTERM"
    victim: str
    full_after: float | None = None  # kill -> every node in one view of 4 members
    startup: float | None = None  # restart launch -> its "looking for" line
    generation: int | None = None
    gaps: dict[str, float] = field(default_factory=dict)  # survivor -> longest step gap


class Lab:
    """The emulated LAN, its devices, and the checks."""

    def __init__(self, lan: EmulatedLan, root: Path, args: argparse.Namespace,
                 min_nodes: int) -> None:
        self.lan, self.args = lan, args
        root.mkdir(parents=True, exist_ok=True)
        key_file = write_key_file(root / "job.key", JobKey.generate())
        self.devices = []
        for i in range(lan.n):
            folder = root / f"dev{i}"
            (folder / "home").mkdir(parents=True)
            peers = [a for j in range(lan.n) if j != i for a in ("--peer",
                                                                 f"{lan.address(j)}:{PORT}")]
            argv = [sys.executable, "-m", "ringtrain", "node", "--key-file", str(key_file),
                    *peers, "--min-nodes", str(min_nodes), "--epochs", str(args.epochs),
                    "--state-file", "state.json"]
            if args.heartbeat_timeout is not None:
                argv += ["--heartbeat-timeout", str(args.heartbeat_timeout)]
            self.devices.append(Device(lan, i, folder, argv, echo=not args.quiet))
        self.bound = args.heartbeat_timeout or Settings().heartbeat_timeout
        self.failures: list[str] = []

    def command_line(self, i: int) -> str:
        argv = self.devices[i].argv
        return "ringtrain " + " ".join(argv[3:])

    # waiting ------------------------------------------------------------------------------

    def wait(self, condition, timeout: float, what: str, allow_dead: tuple[int, ...] = ()):
        """Poll ``condition`` every 50 ms until it returns a true value; bounded."""
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            if result:
                return result
            dead = [d for d in self.devices if d.index not in allow_dead and d.process
                    is not None and d.process.poll() is not None]
            if dead:
                done = any(d.end() is not None and d.end().group(2) == "done" for d in dead)
                raise LabFailure(f"while waiting for {what}: "
                                 + ", ".join(f"{d.name} exited with code {d.process.returncode}"
                                             for d in dead)  # type: ignore[union-attr]
                                 + ("; training ended before the scenario did: pass more "
                                    "--epochs" if done else ""))
            if time.monotonic() > deadline:
                raise LabFailure(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.05)

    def one_view(self, since: float, size: int = NODES) -> tuple[float, int] | None:
        """When every running node's latest ring line (after ``since``) says ``size`` members
        of one generation: (time of the last of those lines, generation); else None."""
        latest = []
        for device in self.devices:
            views = device.views_since(max(since, device.launches[-1]))
            if not views or views[-1][1] != size:
                return None
            latest.append(views[-1])
        if len({g for _, _, g in latest}) != 1:
            return None
        return max(t for t, _, _ in latest), latest[0][2]

    def steps_at_full_size(self, since: float, count: int = 5) -> bool:
        """Every node completed ``count`` steps in a ring of 4 after ``since``."""
        return all(sum(1 for row in d.steps() if row.get("time", 0) > since
                       and row.get("world_size") == NODES) >= count for d in self.devices)

    # scenarios ----------------------------------------------------------------------------

    def start_all(self, timeout: float) -> None:
        for device in self.devices:
            device.start()
        say(f"started {NODES} nodes, one per namespace {self.lan.prefix}-0..{NODES - 1} "
            f"({self.lan.address(0)}..{self.lan.address(NODES - 1)}), each from its own "
            f"folder as its device: {self.command_line(0)}")

    def form(self, timeout: float) -> float:
        started = time.time()
        formed, generation = self.wait(lambda: self.one_view(0.0), timeout,
                                       "a ring of 4")
        say(f"ring of {NODES} formed (generation {generation}), "
            f"{formed - self.devices[0].launches[0]:.1f} s after the first launch")
        self.wait(lambda: self.steps_at_full_size(started), timeout, "5 steps in the ring of 4")
        return formed

    def lowest(self) -> Device:
        return min(self.devices, key=lambda d: d.node_id or "~")

    def restart(self, scenario: str, device: Device, how: int) -> Episode:
        name = "SIGKILL" if how == signal.SIGKILL else "SIGTERM"
        episode = Episode(scenario, name, device.node_id or device.name)
        survivors = [d for d in self.devices if d is not device]
        before = {d.name: d.view() for d in self.devices}
        hit = time.time()
        say(f"{scenario}: {name} to {device.name} ({device.node_id}, pid "
            f"{device.process.pid}); views before: {before}")  # type: ignore[union-attr]
        device.signal(how)
        code = device.wait_exit(60.0 if how == signal.SIGTERM else 10.0)
        say(f"{scenario}: {device.name} exited with code {code} {time.time() - hit:.1f} s after "
            f"the {name}; starting it again with the same command")
        device.start()
        relaunched = device.launches[-1]
        try:
            full, generation = self.wait(lambda: self.one_view(relaunched), self.args.timeout,
                                         f"the ring back to {NODES} after {device.name}'s restart")
        except LabFailure:
            episode.full_after = None
            self.failures.append(f"{scenario} {name} {device.name}: ring not back to {NODES} "
                                 f"within {self.args.timeout:.0f} s")
            raise
        episode.full_after, episode.generation = full - hit, generation
        looking = next((t for t, text in device.lines if t >= relaunched
                        and "looking for at least" in text), None)
        episode.startup = None if looking is None else looking - relaunched
        say(f"{scenario}: ring back to {NODES} members (generation {generation}) "
            f"{episode.full_after:.1f} s after the {name} (the restarted process's start-up: "
            f"{episode.startup if episode.startup is None else round(episode.startup, 1)} s)")
        self.wait(lambda: self.steps_at_full_size(full), self.args.timeout,
                  "5 steps of every node in the ring of 4 after the restart")
        settled = time.time()
        for survivor in survivors:
            times = [row["time"] for row in survivor.steps()]
            before_hit = [t for t in times if t <= hit]
            window = ([before_hit[-1]] if before_hit else []) + \
                [t for t in times if hit < t <= settled]
            gaps = [b - a for a, b in zip(window, window[1:], strict=False)]
            episode.gaps[survivor.name] = max(gaps) if gaps else float("nan")
        worst = max(episode.gaps.values())
        say(f"{scenario}: longest gap between steps on the survivors {worst:.2f} s "
            f"(bound {self.bound:g} s): " + ", ".join(f"{n} {g:.2f}"
                                                       for n, g in episode.gaps.items()))
        if episode.full_after > self.args.full_within:
            self.failures.append(f"{scenario} {name} {device.name}: back to {NODES} after "
                                 f"{episode.full_after:.1f} s > {self.args.full_within:g} s")
        if not worst <= self.bound:
            self.failures.append(f"{scenario} {name} {device.name}: training stopped "
                                 f"{worst:.2f} s > the failure-detection bound {self.bound:g} s")
        return episode

    def finish(self, scenario: str, timeout: float) -> dict[str, str]:
        """Wait for every node to finish training; their final hashes."""
        say(f"{scenario}: waiting for every node to finish its {self.args.epochs} epochs")
        self.wait(lambda: all(not d.alive() for d in self.devices), timeout,
                  "every node to finish training", allow_dead=tuple(range(len(self.devices))))
        hashes = {}
        for device in self.devices:
            code = device.process.returncode  # type: ignore[union-attr]
            end = device.end()
            if code != 0 or end is None or end.group(2) != "done":
                self.failures.append(f"{scenario}: {device.name} ended with code {code}: "
                                     f"{end.group(0) if end else 'no final line'}")
            hashes[device.name] = end.group(5) if end else "-"
            say(f"{scenario}: {device.name} exit {code}: "
                f"{end.group(0) if end else device.lines[-1][1] if device.lines else '-'}")
        if len(set(hashes.values())) != 1:
            self.failures.append(f"{scenario}: final models differ: {hashes}")
        return hashes

    def tails(self) -> str:
        return "\n".join(d.tail() for d in self.devices)


def run_restarts(args: argparse.Namespace, scenario: str, root: Path) -> dict:
    """A (victim: the highest node id) or B (the lowest): 3 kills, then a graceful leave."""
    with EmulatedLan(NODES) as lan:
        lab = Lab(lan, root / scenario, args, min_nodes=2)
        episodes: list[Episode] = []
        result: dict = {"scenario": scenario, "episodes": episodes, "lab": lab}
        try:
            lab.start_all(args.timeout)
            lab.form(args.timeout)
            ranked = sorted(lab.devices, key=lambda d: d.node_id or "")
            victim = ranked[-1] if scenario == "A" else ranked[0]
            say(f"{scenario}: victim {victim.name} ({victim.node_id}), "
                f"{'the highest' if scenario == 'A' else 'the lowest'} node id "
                f"(rank {ranked.index(victim)})")
            for how in (signal.SIGKILL, signal.SIGKILL, signal.SIGKILL, signal.SIGTERM):
                episodes.append(lab.restart(scenario, victim, how))
            result["hashes"] = lab.finish(scenario, args.timeout + args.epochs * 5.0)
        except LabFailure as exc:
            lab.failures.append(f"{scenario}: {exc}")
            say(f"{scenario}: FAILED: {exc}; every node's last lines and state:\n{lab.tails()}")
        result["failures"] = lab.failures
        return result


def run_split(args: argparse.Namespace, root: Path) -> dict:
    """C: a 2|2 split before the nodes start, each pair trains, then the split heals."""
    with EmulatedLan(NODES) as lan:
        lab = Lab(lan, root / "C", args, min_nodes=2)
        result: dict = {"scenario": "C", "episodes": [], "lab": lab}
        try:
            lan.partition([[0, 1], [2, 3]])
            say("C: LAN split 2|2 (nftables): dev0+dev1 | dev2+dev3, before any node starts")
            lab.start_all(args.timeout)
            for pair in ((0, 1), (2, 3)):
                lab.wait(lambda pair=pair: all(lab.devices[i].view() is not None and
                                               lab.devices[i].view()[0] == 2 for i in pair),
                         args.timeout, f"dev{pair[0]}+dev{pair[1]} to form a ring of 2")
            since = time.time()
            lab.wait(lambda: all(sum(1 for row in d.steps() if row["time"] > since) >= 10
                                 for d in lab.devices), args.timeout,
                     "10 steps in each ring of 2")
            say("C: both halves formed a ring of 2 and trained: "
                + ", ".join(f"{d.name} {d.view()} step {d.steps()[-1]['step']}"
                            for d in lab.devices))
            lan.heal()
            healed = time.time()
            say("C: split healed")
            merged, generation = lab.wait(lambda: lab.one_view(healed), args.timeout,
                                          "one ring of 4 after the heal")
            result["merged_after"] = merged - healed
            result["generation"] = generation
            say(f"C: one ring of 4 (generation {generation}) {merged - healed:.1f} s after the "
                f"heal")
            result["hashes"] = lab.finish("C", args.timeout + args.epochs * 5.0)
            said = {}
            for device in lab.devices:
                told = [text for t, text in device.lines if t >= healed and (
                    "two rings" in text or _VIEW.search(text))]
                said[device.name] = told
            result["said"] = said
            for name, told in said.items():
                if not any("two rings" in text for text in told):
                    lab.failures.append(f"C: {name}'s output does not say that two rings "
                                        f"met (its ring lines after the heal: {told})")
        except LabFailure as exc:
            lab.failures.append(f"C: {exc}")
            say(f"C: FAILED: {exc}; every node's last lines and state:\n{lab.tails()}")
        result["failures"] = lab.failures
        return result


def print_table(results: list[dict], bound: float, full_within: float) -> None:
    print("\nsummary (seconds; full size = kill or SIGTERM -> every node in one view of 4)")
    print(f"| scenario | restart | victim | full size s (<= {full_within:g}) | start-up s | "
          f"max step gap s (bound {bound:g}) | generation |")
    print("|---|---|---|---|---|---|---|")
    for result in results:
        for k, e in enumerate(result["episodes"], 1):
            full = "-" if e.full_after is None else f"{e.full_after:.1f}"
            start = "-" if e.startup is None else f"{e.startup:.1f}"
            gap = "-" if not e.gaps else f"{max(e.gaps.values()):.2f}"
            print(f"| {e.scenario} | {k}: {e.how} | {e.victim} | {full} | {start} | {gap} | "
                  f"{e.generation} |")
        if result["scenario"] == "C" and "merged_after" in result:
            print(f"| C | heal of a 2\\|2 split | - | {result['merged_after']:.1f} | - | - | "
                  f"{result['generation']} |")
    print()
    for result in results:
        hashes = result.get("hashes") or {}
        same = bool(hashes) and len(set(hashes.values())) == 1 and "-" not in hashes.values()
        print(f"{result['scenario']}: final hashes equal: {'yes' if same else 'NO'} "
              f"({', '.join(f'{n} {h}' for n, h in hashes.items()) or 'none'})")
    for result in results:
        for failure in result["failures"]:
            print(f"CHECK FAILED: {failure}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the subcommand."""
    parser.add_argument("--scenario", choices=("A", "B", "C"), action="append", default=None,
                        help="run only this scenario (repeatable; default A, B and C)")
    parser.add_argument("--epochs", type=int, default=120,
                        help="the nodes' --epochs: enough to last the scenario (default 120; "
                             "4 nodes train about an epoch a second on 2 shared cores)")
    parser.add_argument("--heartbeat-timeout", type=float, default=None,
                        help="the nodes' --heartbeat-timeout, also the bound on a step gap "
                             "(default: the product's, 2 s)")
    parser.add_argument("--full-within", type=float, default=30.0,
                        help="a restart must bring the ring back to 4 within this many "
                             "seconds (default 30)")
    parser.add_argument("--timeout", type=float, default=90.0,
                        help="bound on each wait (default 90 s)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="keep every device's folder (output, state file, metrics, "
                             "checkpoints) under DIR/<scenario>/devN (default: a temporary "
                             "folder, removed)")
    parser.add_argument("--quiet", action="store_true",
                        help="do not echo the nodes' event lines")


def run(args: argparse.Namespace) -> int:
    """Run the scenarios one after the other; print the table; 1 if a check failed."""
    if args.epochs < 1 or not args.timeout > 0:
        raise ConfigError("need --epochs >= 1 and --timeout > 0")

    def stop(_number: int, _frame: object) -> None:
        # Ctrl-C or SIGTERM: clean up (namespaces, processes), and let no second signal
        # interrupt the cleaning
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    results = []
    with tempfile.TemporaryDirectory(prefix="ringtrain-lab-restart-") as tmp:
        if args.out:
            tmp = args.out
            Path(tmp).mkdir(parents=True, exist_ok=True)
        for scenario in args.scenario or ["A", "B", "C"]:
            say(f"scenario {scenario}: " + {
                "A": "a node (not the lowest id) SIGKILLed and restarted 3 times, then SIGTERM "
                     "and restarted",
                "B": "the lowest-ranked node SIGKILLed and restarted 3 times, then SIGTERM and "
                     "restarted",
                "C": "a 2|2 split at start, then healed"}[scenario])
            if scenario == "C":
                results.append(run_split(args, Path(tmp)))
            else:
                results.append(run_restarts(args, scenario, Path(tmp)))
    bound = args.heartbeat_timeout or Settings().heartbeat_timeout
    print_table(results, bound, args.full_within)
    return 1 if any(r["failures"] for r in results) else 0


def _main() -> None:  # python -m ringtrain.lab.restart
    parser = argparse.ArgumentParser(prog="python -m ringtrain.lab.restart")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))


if __name__ == "__main__":
    _main()
