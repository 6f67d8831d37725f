"""``ringtrain bench-hostile``: a keyless stranger on the LAN cannot stop a training ring.

    ringtrain bench-hostile       # 2 nodes, 64 adverts x 16, 2000 idle each, 5000 door asks/s
    ringtrain bench-hostile --nodes 3 --seconds 90 --connections 500

On an emulated LAN (``lab.netns``, root), N real ``ringtrain node`` processes run a training
script (``hostile_worker.py``) with discovery on. Once they train, a keyless host
(``lab.hostile``) announces ``--adverts`` adverts of the job under the real key fingerprint,
each with ``--addresses`` dead addresses, re-announced with new ports every few seconds, and
holds ``--connections`` idle TCP connections to every node, and sends ``--door-asks``
datagrams a second to each node's key door. Printed: the longest gap between
two training steps before and during the attack against the failure-detection bound
(``heartbeat_timeout``), each node's open descriptors (most, and at the end) against its
limit, connections shut and refused by its budgets, probes expired, and how each node ended.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..comm.security import JobKey, write_key_file
from ..config import Settings

PORT = 7077
WORKER = Path(__file__).with_name("hostile_worker.py")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ringtrain bench-hostile``."""
    parser.add_argument("--nodes", type=int, default=2, help="training nodes (default 2)")
    parser.add_argument("--adverts", type=int, default=64)
    parser.add_argument("--addresses", type=int, default=16)
    parser.add_argument("--connections", type=int, default=2000,
                        help="idle TCP connections to every node (default 2000)")
    parser.add_argument("--door-asks", type=float, default=5000.0, metavar="PER_S",
                        help="asks under no job key sent to every node's key door a second "
                             "(default 5000)")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="seconds of attack (default 60)")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds of training before the attack (default 10)")


def run(args: argparse.Namespace) -> int:
    """Run the ring and the stranger; print the table."""
    from ..lab.netns import EmulatedLan  # only here: it needs root and iproute2

    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root}
    bound = Settings.from_env().heartbeat_timeout
    with tempfile.TemporaryDirectory(prefix="ringtrain-hostile-") as folder, \
            EmulatedLan(args.nodes + 1) as lan:
        out = Path(folder)
        key = JobKey.generate()
        key_file = write_key_file(out / "job.key", key)
        nodes = []
        for i in range(args.nodes):
            node_env = {**env, "RINGTRAIN_DEVICE_DIR": str(out / f"dev{i}")}
            nodes.append(lan.popen(i, [
                sys.executable, "-m", "ringtrain", "node", "--job", "hostile", "--key-file",
                str(key_file), "--interface", lan.address(i), "--port", str(PORT),
                "--min-nodes", str(args.nodes), str(WORKER), str(out / f"{i}.jsonl")],
                env=node_env, stdout=subprocess.DEVNULL, stderr=open(out / f"{i}.err", "w")))
        formed = _wait_for_steps(out, args.nodes, 180.0)
        if not formed:
            print("the ring did not form; node stderr:")
            for i in range(args.nodes):
                print((out / f"{i}.err").read_text()[-2000:])
            return 1
        time.sleep(args.warmup)
        attack_start = time.monotonic()
        attacker = lan.popen(args.nodes, [
            sys.executable, "-m", "ringtrain.lab.hostile", "--interface",
            lan.address(args.nodes), "--job", "hostile", "--fingerprint", key.fingerprint,
            "--dead-prefix", lan.address(0).rpartition(".")[0], "--adverts",
            str(args.adverts), "--addresses", str(args.addresses), "--connections",
            str(args.connections), "--seconds", str(args.seconds),
            "--door-asks", str(args.door_asks),
            *[a for i in range(args.nodes) for a in ("--target", f"{lan.address(i)}:{PORT}")]],
            env=env, stdout=open(out / "attacker.jsonl", "w"), stderr=subprocess.STDOUT)
        attacker_code = attacker.wait(args.seconds + 60)
        attack_end = time.monotonic()
        # every node leaves at the same step (one left alone would wait for --min-nodes)
        steps = [_last_step(out / f"{i}.jsonl") for i in range(args.nodes)]
        (out / "stop").write_text(str(max(steps) + 20))
        codes = []
        for node in nodes:
            try:
                codes.append(node.wait(60))
            except subprocess.TimeoutExpired:
                node.kill()
                codes.append("killed")  # it did not leave within a minute of its end
        print(_report(out, args, attack_start, attack_end, bound, codes))
        if attacker_code != 0:
            print(f"the stranger's process ended {attacker_code}; its output ends:\n"
                  f"{_traceback_or_tail((out / 'attacker.jsonl').read_text())}")
        for i, code in enumerate(codes):
            if code not in (0, 130):
                print(f"node {i} ended {code}; the end of its stderr:\n"
                      f"{(out / f'{i}.err').read_text()[-1500:]}")
        return 0 if all(code in (0, 130) for code in codes) and attacker_code == 0 else 1


def _traceback_or_tail(output: str) -> str:
    """The first traceback in ``output`` (asyncio's complaints follow it), else its end."""
    start = output.find("Traceback")
    return output[start:start + 3000] if start >= 0 else output[-1500:]


def _last_step(path: Path) -> int:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return max((r["step"] for r in rows if "step" in r), default=0)


def _wait_for_steps(out: Path, nodes: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all((out / f"{i}.jsonl").exists() and (out / f"{i}.jsonl").stat().st_size
               for i in range(nodes)):
            return True
        time.sleep(0.5)
    return False


def _report(out: Path, args: argparse.Namespace, start: float, end: float, bound: float,
            codes: list) -> str:
    attack = [json.loads(line) for line in (out / "attacker.jsonl").read_text().splitlines()
              if line.startswith("{")]
    peak_open = max((a["established"] for a in attack), default=0)
    lines = [f"bench-hostile: {args.nodes} nodes training; a keyless host announced "
             f"{args.adverts} adverts x {args.addresses} dead addresses with the real "
             f"fingerprint ({max((a['advert_rounds'] for a in attack), default=0)} rounds of "
             f"new ports) and held up to {peak_open} established idle connections "
             f"({args.connections} per "
             f"node asked; {attack[-1]['reopened'] if attack else 0} reopened after the nodes "
             f"shut them), and sent {attack[-1].get('door_asks', 0) if attack else 0} asks "
             f"under no job key to the nodes' key doors, for {end - start:.0f} s",
             f"failure-detection bound (heartbeat_timeout): {bound:.1f} s",
             f"{'node':>4} {'steps':>6} {'gap before':>11} {'gap during':>11} {'fds max':>8} "
             f"{'fds end':>8} {'shut':>7} {'refused':>8} {'probes expired':>15} {'exit':>6}"]
    for i, code in enumerate(codes):
        every = [json.loads(line) for line in (out / f"{i}.jsonl").read_text().splitlines()]
        rows = [r for r in every if "step" in r]
        times = [r["t"] for r in rows] + [end]  # a stall until the end is a gap too
        gaps_before = [b - a for a, b in zip(times, times[1:], strict=False) if b <= start]
        gaps_during = [b - a for a, b in zip(times, times[1:], strict=False)
                       if b >= start and a <= end]
        budgets = [r["budget"] for r in rows if "budget" in r]
        probes = [r["candidates"] for r in rows if "candidates" in r]
        lines.append(
            f"{i:>4} {len(rows):>6} {max(gaps_before, default=0):>9.2f} s "
            f"{max(gaps_during, default=0):>9.2f} s {max(r['fds'] for r in every):>8} "
            f"{every[-1]['fds']:>8} {budgets[-1]['shut'] if budgets else 0:>7} "
            f"{budgets[-1]['refused'] if budgets else 0:>8} "
            f"{probes[-1]['expired'] if probes else 0:>15} {code!s:>6}")
    return "\n".join(lines)
