"""The membership protocol under the deterministic simulator (``tests/sim/world.py``).

``SCHEDULES`` seeded schedules of 2-9 devices with every fault kind run in CI, over every
core; a failure names its seed and the command that replays it. The soak is a command:
``python -m tests.sim --schedules 1000000``.
"""

from __future__ import annotations

import os

from tests.sim.__main__ import run_many
from tests.sim.world import World

# schedules run in CI: issue 13 asks for at least 5,000 within 2 minutes on 2 cores (about
# 20 ms of CPU each here: ~55 s on 2 idle cores); RINGTRAIN_SIM_SCHEDULES changes it
SCHEDULES = int(os.environ.get("RINGTRAIN_SIM_SCHEDULES", "5000"))


def test_seeded_schedules_keep_every_invariant():
    failures = run_many(0, SCHEDULES, workers=os.cpu_count() or 1)
    assert not failures, "\n\n".join(f"seed {seed}:\n{text}" for seed, text in failures[:3])


def test_one_seed_replays_one_schedule_exactly():
    first, second = World(7), World(7)
    first.run()
    second.run()
    assert first.log == second.log and first.decided == second.decided
