"""A ring ordered by measured links, across network namespaces: two sites (a bridge each,
joined by a slow shared uplink), nodes alternating between them in id order, so the sorted
ring would cross the uplink on every link. The members must measure that, agree on a ring
that crosses only twice, compute every collective right in that order, and measure and
order again after a member leaves. Needs root and iproute2 (skips otherwise)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from ringtrain.comm.security import JobKey, write_key_file
from ringtrain.lab.netns import EmulatedLan

NODE = Path(__file__).with_name("ordered_node.py")
sys.path.insert(0, str(NODE.parent))
from ordered_node import contribution  # noqa: E402  (the nodes' own inputs)

PORT = 7411
SITES = [0, 1, 0, 1]
LEAVER = 3
DEADLINE = 90.0  # each node's own bound: then it prints its state and exits
TIMEOUT = DEADLINE + 30.0


def crossings(members: list[str]) -> int:
    site = [SITES[int(m.rsplit("-", 1)[1])] for m in members]
    return sum(site[k] != site[(k + 1) % len(site)] for k in range(len(site)))


def check_phase(reports: list[dict], indexes: list[int]) -> None:
    members = reports[0]["members"]
    assert sorted(members) == [f"node-{i:02d}" for i in indexes]
    order = [int(m.rsplit("-", 1)[1]) for m in members]
    size = 3 * 1024 * 1024 + 5
    total = sum(contribution(i, size) for i in indexes)
    scattered = np.array_split(sum(contribution(i, 1001) for i in indexes), len(indexes))
    for report in reports:
        assert report["members"] == members, "members disagree on the ring order"
        assert report["links"] == reports[0]["links"], "members measured different links"
        rank = report["rank"]
        assert report["sum"] == total[:: 4099].tolist()
        assert report["gathered"] == order  # stacked in ring order
        assert report["broadcast"] == order[0]
        assert report["scattered"] == scattered[rank].tolist()
        # int8 only over the slow links: the same everywhere, within the codec's error
        assert report["compressed"] == reports[0]["compressed"]
        assert report["slow"] == reports[0]["slow"]
        error = np.abs(np.array(report["compressed"]) - total[:: 4099]).max()
        assert error <= 2 * len(indexes) * 8 * len(indexes) / 254 + 1e-6


def test_the_ring_orders_itself_around_a_slow_uplink(tmp_path: Path) -> None:
    key_file = tmp_path / "job.key"
    write_key_file(key_file, JobKey.generate())
    env = {**os.environ, "RINGTRAIN_KEY_FILE": str(key_file)}
    with EmulatedLan(len(SITES), rate_mbit=1000, sites=SITES, uplink_mbit=200) as lan:
        peers = [f"{lan.address(i)}:{PORT}" for i in range(lan.n)]
        processes = [lan.popen(i, [sys.executable, str(NODE), "--index", str(i), "--peers",
                                   *peers, "--leaver", str(LEAVER), "--probe-bytes",
                                   str(2 << 20), "--deadline", str(DEADLINE)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for i in range(lan.n)]
        outputs = []
        for i, process in enumerate(processes):
            try:
                out, err = process.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:  # not even its watchdog fired
                for p in processes:
                    p.kill()
                raise AssertionError(f"node {i} hung past its own deadline") from None
            assert process.returncode == 0, f"node {i} failed:\n{out[-3000:]}\n{err[-3000:]}"
            outputs.append([json.loads(line) for line in out.splitlines() if line])
    first = [lines[0] for lines in outputs]
    check_phase(first, [0, 1, 2, 3])
    assert crossings(first[0]["members"]) == 2, first[0]
    links = first[0]["links"]
    inside = [rate for a, row in links.items() for b, rate in row.items()
              if SITES[int(a[-2:])] == SITES[int(b[-2:])]]
    across = [rate for a, row in links.items() for b, rate in row.items()
              if SITES[int(a[-2:])] != SITES[int(b[-2:])]]
    assert min(inside) > max(across), links  # the probe saw the uplink
    # the two crossings are the slow links, the ones compressed
    assert len(first[0]["slow"]) == 2, first[0]["slow"]
    assert all(SITES[int(link[5:7])] != SITES[int(link[-2:])] for link in first[0]["slow"])
    second = [lines[1] for i, lines in enumerate(outputs) if i != LEAVER]
    check_phase(second, [0, 1, 2])
    assert len(second[0]["links"]) == 3  # measured again for the new view
