"""examples/torch_diloco.py launched by ``ringtrain node`` on 3 processes, one of them
SIGKILLed in the middle of a round: the survivors finish on one model, lose none of their
steps, and reach a useful accuracy. (The example's 4-bit pseudo-gradient keeps members
identical too: tests/procs/test_torch_backend.py; here it is off so the replay is exact.)

The invariant checked, "no survivor's step is lost": the survivors end on the model a single
process computes by replaying every device's inner steps (its own batches, its own Adam) with
the victim in the rounds applied before it died and not after, the round it died in closed by
the survivors' full rounds of steps. A survivor that restarted that round from another
member's model, or from the anchor, would end elsewhere (5e-3 away when tried).
"""

from __future__ import annotations

import copy
import importlib.util
import re
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.torch, pytest.mark.timeout(150)]  # past BOUND_S, which reports

SIZE = 3
BOUND_S = 120  # ~10 s on a quiet machine, most of it importing torch 3 times
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "torch_diloco.py"


INNER, ROUNDS, KILLED_AT = 10, 20, 2 * 10 + 3  # the victim dies after its 23rd inner step
LR, BATCH = 1e-3, 32
SUICIDE = """
import os, runpy, signal, sys
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
if os.environ["RANK"] == "2":  # the victim: SIGKILL itself right after inner step KILLED_AT
    done = [0]
    def count(optimizer, args, kwargs):
        if isinstance(optimizer, torch.optim.Adam):
            done[0] += 1
            if done[0] == {killed_at}:
                os.kill(os.getpid(), signal.SIGKILL)
    register_optimizer_step_post_hook(count)
sys.argv = [{example!r}, *sys.argv[1:]]
runpy.run_path({example!r}, run_name="__main__")
"""


def _replay(survivors: set[int], rounds_with_victim: int) -> torch.Tensor:
    """The anchor after ROUNDS rounds, computed in this process from every device's steps."""
    spec = importlib.util.spec_from_file_location("torch_diloco_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    from ringtrain.train.datasets import load_digits
    train_set, _ = load_digits().split(0.2, seed=0)
    x, y = torch.tensor(train_set.x), torch.tensor(train_set.y)
    start = example.make_model()
    models = {device: copy.deepcopy(start) for device in range(3)}
    optimizers = {device: torch.optim.Adam(model.parameters(), lr=LR)
                  for device, model in models.items()}
    batches = dict.fromkeys(models, 0)
    for round_ in range(1, ROUNDS + 1):
        members = sorted(models) if round_ <= rounds_with_victim else sorted(survivors)
        for device in members:
            for _ in range(INNER):
                batch = example.batch_of(device, batches[device], len(x), BATCH)
                optimizers[device].zero_grad()
                torch.nn.functional.cross_entropy(models[device](x[batch]),
                                                  y[batch]).backward()
                optimizers[device].step()
                batches[device] += 1
        flats = [torch.nn.utils.parameters_to_vector(models[d].parameters()) for d in members]
        anchor = torch.stack(flats).mean(0).detach()
        for device in members:
            torch.nn.utils.vector_to_parameters(anchor.clone(), models[device].parameters())
    return anchor


def test_a_member_killed_mid_round_costs_the_survivors_none_of_their_steps(tmp_path,
                                                                         script_ring):
    deadline = time.monotonic() + BOUND_S
    wrapper = tmp_path / "suicide.py"
    wrapper.write_text(SUICIDE.format(killed_at=KILLED_AT, example=str(EXAMPLE)))
    procs = script_ring.launch(wrapper, ["--rounds", str(ROUNDS), "--inner-steps", str(INNER),
                                         "--batch-size", str(BATCH), "--lr", str(LR),
                                         "--compression", "none", "--save",
                                         str(tmp_path / "final")],
                               size=SIZE, extra=("--min-nodes", "2"),
                               heartbeat_timeout=6)
    codes = script_ring.finish(procs, deadline)
    assert sorted(codes) == [-9, 0, 0], script_ring.report()
    logs = [(tmp_path / f"node-{i}.log").read_text() for i, code in enumerate(codes) if code == 0]
    for log in logs:  # every survivor re-formed in the round the victim died in, kept its steps
        assert re.search(rf"resumed round 3 after this member's inner step \d of "
                         rf"{INNER}, with rank \d's outer state \(0 of this member's steps "
                         rf"lost\)", log), script_ring.report()
        sizes = re.findall(r"^round (\d+): .*\(rank \d of (\d)\)", log, re.M)
        assert sizes == [(str(r), "3" if r <= 2 else "2") for r in range(1, ROUNDS + 1)], log
        assert re.search(rf"^device \d of 2: {ROUNDS} rounds, parameters [0-9a-f]{{16}}$", log,
                         re.M), log
    finals = {int(path.name.split(".")[1]): torch.load(path) for path in
              tmp_path.glob("final.*.pt")}
    assert len(finals) == 2 and 2 not in finals, sorted(finals)  # device 2 was the victim
    assert torch.equal(finals[0], finals[1])
    expected = _replay(survivors={0, 1}, rounds_with_victim=2)
    error = (finals[0] - expected).abs().max().item()
    accuracy = [float(a) for log in logs
                for a in re.findall(rf"round {ROUNDS}: .*test accuracy (\d\.\d+)", log)]
    print(f"\nsurvivors' model against the replay of every device's steps: {error:.1e}; "
          f"test accuracy {accuracy}")
    assert error < 1e-5
    assert len(accuracy) == 1 and accuracy[0] > 0.9, script_ring.report()
