"""Device CPU budgets of the emulated LAN: every command of a node runs in its cgroup, with its
quota and on its core, and nothing is left after close. Functional only: no timing."""

from __future__ import annotations

import os
import sys

import pytest

from ringtrain.errors import ConfigError
from ringtrain.lab import cpu_budget
from ringtrain.lab.cpu_budget import PERIOD_US, CpuBudget
from ringtrain.lab.netns import EmulatedLan

PROBE = "import os; print(open('/proc/self/cgroup').read()); print(sorted(os.sched_getaffinity(0)))"


def test_each_node_runs_in_its_own_budget_on_its_core():
    cores = sorted(os.sched_getaffinity(0))
    version, mount = cpu_budget.hierarchy()
    with EmulatedLan(3, cpu_cores=0.3) as lan:
        groups = [lan.namespace(i) for i in range(3)]
        assert set(groups) <= set(cpu_budget.groups())
        for i, group in enumerate(groups):
            done = lan.run(i, [sys.executable, "-c", PROBE])
            assert done.returncode == 0, done.stderr
            memberships, affinity = done.stdout.strip().rsplit("\n", 1)
            assert f":/{group}\n" in memberships + "\n"
            assert affinity == str([cores[i % len(cores)]])
            quota = (mount / group / ("cpu.max" if version == 2 else "cpu.cfs_quota_us"))
            assert quota.read_text().split()[0] == str(round(0.3 * PERIOD_US))
    assert not set(groups) & set(cpu_budget.groups())


def test_bad_budgets_are_config_errors():
    for cores, core in ((0, None), (-1.0, None), (1.5, 0), (0.5, 10_000)):
        with pytest.raises(ConfigError):
            CpuBudget("rtbadbudget-0", cores, core=core)
    with pytest.raises(ConfigError):
        CpuBudget("../escape", 0.5)
    assert "rtbadbudget-0" not in cpu_budget.groups()
