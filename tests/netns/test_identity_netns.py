"""Who may join, across network namespaces with real ``ringtrain node`` processes: a node
with the wrong job key is told so, naming both fingerprints, within seconds, and exits with
code 2.

Needs root and iproute2 (skips otherwise). On failure every process's output is printed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from ringtrain.comm.security import JobKey, write_key_file
from ringtrain.lab.netns import EmulatedLan

ROOT = Path(__file__).resolve().parents[2]
NAMED_WITHIN_S = 10.0


def _ringtrain_node(lan: EmulatedLan, i: int, key_file: Path, folder: Path, *extra: str):
    argv = [sys.executable, "-m", "ringtrain", "node", "--job", "wrongkey", "--key-file",
            str(key_file), "--interface", lan.address(i), "--min-nodes", "2", "--epochs", "1",
            "--checkpoint-dir", str(folder / f"ckpt{i}"), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return lan.popen(i, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                     env=env, cwd=str(folder))


def _watch(stream, lines: list[tuple[float, str]]) -> None:
    for line in stream:
        lines.append((time.monotonic(), line.rstrip()))


def test_a_node_with_another_key_is_told_within_seconds_and_exits_2(tmp_path):
    keys = [JobKey.generate(), JobKey.generate()]
    files = [write_key_file(tmp_path / f"job{i}.key", key) for i, key in enumerate(keys)]
    with EmulatedLan(2) as lan:
        processes = [_ringtrain_node(lan, i, files[i], tmp_path) for i in range(2)]
        outputs: list[list[tuple[float, str]]] = [[], []]
        errors: list[list[tuple[float, str]]] = [[], []]
        watchers = [threading.Thread(target=_watch, args=(stream, out), daemon=True)
                    for p, out, err in zip(processes, outputs, errors, strict=True)
                    for stream, out in ((p.stdout, out), (p.stderr, err))]
        for watcher in watchers:
            watcher.start()
        ended = []
        for process in processes:
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()
            ended.append(time.monotonic())
        for watcher in watchers:
            watcher.join(5)
    report = "\n".join(f"node {i}: exit {p.returncode}\nstdout: {outputs[i]}\nstderr: "
                       f"{errors[i]}" for i, p in enumerate(processes))
    for i, process in enumerate(processes):
        assert process.returncode == 2, report
        other, mine = keys[1 - i].fingerprint, keys[i].fingerprint
        named, last = errors[i][-1]
        assert last.startswith("ringtrain: "), report
        assert other[:8] in last and mine[:8] in last, report
        started = next(t for t, line in outputs[i] if "looking for" in line)
        print(f"node {i}: named the keys {named - started:.1f} s after it started looking, "
              f"exited (code 2) {ended[i] - started:.1f} s after: {last}")
        assert named - started < NAMED_WITHIN_S, report
