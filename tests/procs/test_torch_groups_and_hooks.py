"""Process groups and torch's communication hooks with the ringtrain backend, in 3 processes
launched by ``ringtrain node`` (one launch, read by both tests):

* ``dist.new_group``: a group of every rank works (collectives, DDP over it); a subset, or
  every rank in another order, is refused on every rank at creation with a message that says
  what to use; torch's creator hook (its path on older torch, or under another default
  backend) refuses a subset too; and the ring is still usable afterwards.
* torch's own PowerSGD hook runs unchanged on the ring (its all-reduces go through
  ``dist.all_reduce`` on the default group, one of them from inside a future's callback), and
  at full rank its low-rank product is the exact mean gradient, so DDP with the hook ends
  where plain DDP ends."""

from __future__ import annotations

import textwrap

import pytest

pytest.importorskip("torch")
pytestmark = [pytest.mark.torch, pytest.mark.timeout(150)]  # past BOUND_S, which reports

SIZE = 3
BOUND_S = 120  # ~10 s on a quiet machine, most of it importing torch 3 times

SCRIPT = textwrap.dedent("""
    import copy
    import json
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    def refused(make):
        try:
            make()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return "made"

    dist.init_process_group("ringtrain")
    rank = dist.get_rank()
    whole = dist.new_group()
    value = torch.full((3,), float(rank + 1))
    dist.all_reduce(value, group=whole)
    torch.manual_seed(rank)  # DDP over the new group gives every rank rank 0's parameters
    model = DDP(torch.nn.Linear(4, 2), process_group=whole)
    model(torch.randn(5, 4)).square().sum().backward()  # a different batch on every rank
    creator = dist.Backend._plugins["RINGTRAIN"].creator_fn
    after = torch.tensor([float(rank)])
    out = {
        "rank": rank, "backend": dist.get_backend(whole), "size": dist.get_world_size(whole),
        "group_rank": dist.get_rank(whole), "name": whole.group_name, "sum": value.tolist(),
        "grad": model.module.weight.grad.reshape(-1).tolist(),
        "subset": refused(lambda: dist.new_group(ranks=[0, 1])),
        "reordered": refused(lambda: dist.new_group(ranks=[2, 1, 0], sort_ranks=False)),
        "creator": refused(lambda: creator(dist.HashStore(), 0, 2, timedelta(seconds=5))),
    }
    dist.all_reduce(after)
    out["after"] = after.item()

    size = dist.get_world_size()
    torch.manual_seed(0)
    initial = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(),
                                  torch.nn.Linear(6, 3)).double()
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(size * 4 * 8, 8, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (size * 4 * 8,), generator=generator)

    def train(rank_of_matrices):
        model = DDP(copy.deepcopy(initial))
        if rank_of_matrices:
            state = powerSGD_hook.PowerSGDState(
                process_group=None, matrix_approximation_rank=rank_of_matrices,
                start_powerSGD_iter=2, min_compression_rate=0)
            model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(8):
            start = (step * size + rank) * 4
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[start:start + 4]),
                                                     y[start:start + 4])
            loss.backward()
            optimizer.step()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()

    out.update({"plain": train(0), "full": train(6), "low": train(1)})
    print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def results(module_script_ring):
    return module_script_ring.run(SCRIPT, SIZE, BOUND_S)


def test_new_group_of_every_rank_works_and_a_subset_is_refused_on_every_rank(results):
    for rank, out in results.items():
        assert (out["backend"], out["size"], out["group_rank"]) == ("ringtrain", SIZE, rank)
        assert out["name"] == results[0]["name"] != ""  # torch's name for it (FSDP reads it)
        assert out["sum"] == [6.0] * 3  # 1 + 2 + 3
        assert out["grad"] == results[0]["grad"]  # averaged over the new group
        assert out["subset"].startswith(
            "ConfigError: the ringtrain backend makes process groups of the whole ring only "
            "(ranks 0..2, in order); new_group(ranks=[0, 1]) is a subset or another order, "
            "and subsets are not supported"), out["subset"]
        assert "new_group() with no ranks" in out["subset"]
        assert "new_group(ranks=[2, 1, 0]) is a subset or another order" in out["reordered"]
        assert out["reordered"].startswith("ConfigError: ")
        assert out["creator"].startswith("ConfigError: ") and \
            "a group of 2 with this node as rank 0 is a subset" in out["creator"]
        assert out["after"] == 3.0  # 0 + 1 + 2: the ring works after the refusals
    assert results[0]["grad"] != [0.0] * 8


def test_torchs_powersgd_hook_at_full_rank_reproduces_the_mean_over_the_ring(results):
    first = results[0]
    for out in results.values():  # every member holds the same model, whatever the hook
        assert (out["plain"], out["full"], out["low"]) == (first["plain"], first["full"],
                                                           first["low"])
    full_off = max(abs(a - b) for a, b in zip(first["full"], first["plain"], strict=True))
    low_off = max(abs(a - b) for a, b in zip(first["low"], first["plain"], strict=True))
    print(f"\nmax |PowerSGD - plain DDP| after 8 steps: rank 6 {full_off:.2g}, "
          f"rank 1 {low_off:.2g}")
    assert full_off < 1e-9  # full rank: the mean, up to float64 rounding
    assert low_off > 1e-4  # rank 1: the factors did carry the gradient (not a plain mean)
