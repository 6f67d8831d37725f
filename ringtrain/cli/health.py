"""``ringtrain health``: is the node of this device training? For readiness probes.

``ringtrain node --state-file PATH`` (or ``RINGTRAIN_STATE_FILE``) keeps a small JSON file
with the node's state: ``forming`` until the ring forms, then ``training`` with the generation,
the members and the step, rewritten at most once a second while steps complete, and ``done``
or ``left`` at the end. ``ringtrain health --state-file PATH`` exits 0 only if the node is
training and its last step is recent, so a Kubernetes readiness probe or a service monitor
sees a node that is forming, waiting for a quorum, stuck or gone as not ready:

    ringtrain health --state-file /run/ringtrain/state.json --max-age 30
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ..config import env
from ..errors import ConfigError

EXIT_READY, EXIT_NOT_READY = 0, 1
WRITE_EVERY_S = 1.0  # steps may come hundreds a second; the file changes at most this often
DEFAULT_MAX_AGE_S = 30.0  # longer than a re-formation (a few s) plus a slow step


class StateFile:
    """Writes the node's state to ``path`` atomically (a reader never sees half a file)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._written = 0.0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the folder of state file {self.path}: "
                              f"{exc.strerror}") from None

    def write(self, state: str, *, throttle: bool = False, **facts: object) -> None:
        """Record ``state`` (``forming``, ``training``, ``done``, ``left``) and ``facts``;
        with ``throttle``, only if the last write is at least a second old."""
        now = time.time()
        if throttle and now - self._written < WRITE_EVERY_S:
            return
        self._written = now
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            temporary.write_text(json.dumps({"state": state, "updated": now, **facts}) + "\n")
            os.replace(temporary, self.path)
        except OSError as exc:
            raise ConfigError(f"cannot write state file {self.path}: {exc.strerror}") from None


def readiness(path: str | os.PathLike, max_age: float) -> tuple[bool, str]:
    """Whether the state file says training, updated within ``max_age`` seconds, and why."""
    try:
        facts = json.loads(Path(path).read_text())
        state, updated = str(facts["state"]), float(facts["updated"])
    except OSError as exc:
        return False, f"no state in {path} ({exc.strerror}): is `ringtrain node " \
                      f"--state-file {path}` running?"
    except (ValueError, KeyError, TypeError):
        return False, f"{path} is not a ringtrain state file"
    age = time.time() - updated
    if state != "training":
        return False, f"node is {state} (for {age:.0f} s)"
    if age > max_age:
        return False, f"node has completed no step for {age:.0f} s (more than {max_age:g} s)"
    return True, (f"training: generation {facts.get('generation')}, "
                  f"{facts.get('world_size')} members, step {facts.get('step')}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the subcommand."""
    parser.add_argument("--state-file", default=env("STATE_FILE"),
                        help="the file `ringtrain node --state-file` writes "
                             "(default RINGTRAIN_STATE_FILE)")
    parser.add_argument("--max-age", type=float, default=DEFAULT_MAX_AGE_S,
                        help=f"not ready if the last step is older than this many seconds "
                             f"(default {DEFAULT_MAX_AGE_S:g})")


def run(args: argparse.Namespace) -> int:
    """Print one line saying whether the node is ready; exit 0 if it is, 1 if not."""
    if not args.state_file:
        raise ConfigError("say which node: --state-file PATH (or RINGTRAIN_STATE_FILE)")
    ready, reason = readiness(args.state_file, args.max_age)
    print(f"{'ready' if ready else 'not ready'}: {reason}")
    return EXIT_READY if ready else EXIT_NOT_READY
