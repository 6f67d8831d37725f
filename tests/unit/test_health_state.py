"""The state file `ringtrain node --state-file` keeps, and what `ringtrain health` reads in it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ringtrain.cli.health import StateFile, readiness
from ringtrain.cli.main import main
from ringtrain.discovery.dns import check_name
from ringtrain.errors import ConfigError


def test_ready_only_while_training_with_a_recent_step(tmp_path: Path) -> None:
    path = tmp_path / "run" / "state.json"
    assert readiness(path, 30)[0] is False  # no file: the node is not running
    state = StateFile(path)
    state.write("forming", job="j")
    assert readiness(path, 30) == (False, "node is forming (for 0 s)")
    state.write("training", job="j", generation=3, world_size=4, step=17)
    assert readiness(path, 30) == (True, "training: generation 3, 4 members, step 17")
    facts = json.loads(path.read_text())
    facts["updated"] = time.time() - 60  # a node that stopped stepping a minute ago
    path.write_text(json.dumps(facts))
    ready, reason = readiness(path, 30)
    assert not ready and "no step for 60 s" in reason
    state.write("done", step=40)
    assert readiness(path, 30)[0] is False
    path.write_text("{not json")
    assert readiness(path, 30) == (False, f"{path} is not a ringtrain state file")


def test_throttled_writes_skip_within_a_second(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = StateFile(path)
    state.write("training", step=1)
    state.write("training", throttle=True, step=2)
    assert json.loads(path.read_text())["step"] == 1
    state.write("left", step=3)  # unthrottled: the final state always lands
    assert json.loads(path.read_text())["state"] == "left"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary left


def test_health_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state.json"
    StateFile(path).write("training", generation=1, world_size=2, step=5)
    assert main(["health", "--state-file", str(path)]) == 0
    assert capsys.readouterr().out.startswith("ready: training")
    assert main(["health", "--state-file", str(tmp_path / "absent.json")]) == 1
    assert "not ready: no state in" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["ringtrain", "ringtrain.default.svc.cluster.local.",
                                  "_ringtrain._tcp.ringtrain"])
def test_dns_names_accepted(name: str) -> None:
    assert check_name(name) == name.rstrip(".")


@pytest.mark.parametrize("name", ["", "a..b", "-bad.example", "x" * 64, "a b", "10.0.0.1:53"])
def test_dns_names_refused_with_the_name(name: str) -> None:
    with pytest.raises(ConfigError, match="is not a DNS name"):
        check_name(name)
