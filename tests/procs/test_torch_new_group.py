"""``dist.new_group`` with the ringtrain backend, in 3 processes launched by ``ringtrain node``:
a group of every rank works (collectives, DDP over it); a subset, or every rank in another
order, is refused on every rank at creation with a message that says what to use; torch's
creator hook (its path on older torch, or under another default backend) refuses a subset
too; and the ring is still usable afterwards."""

from __future__ import annotations

import textwrap

import pytest

pytest.importorskip("torch")
pytestmark = [pytest.mark.torch, pytest.mark.timeout(150)]  # past BOUND_S, which reports

SIZE = 3
BOUND_S = 120  # ~8 s on a quiet machine, most of it importing torch 3 times

SCRIPT = textwrap.dedent("""
    import json
    from datetime import timedelta

    import torch
    import torch.distributed as dist
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
    print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()
""")


def test_new_group_of_every_rank_works_and_a_subset_is_refused_on_every_rank(script_ring):
    results = script_ring.run(SCRIPT, SIZE, BOUND_S)
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
