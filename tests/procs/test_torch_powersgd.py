"""torch's own PowerSGD communication hook over the ringtrain backend, in 3 processes launched
by ``ringtrain node``: the hook runs unchanged on the ring (its all-reduces go through
``dist.all_reduce`` on the default group), and at full rank its low-rank product is the exact
mean gradient, so DDP with the hook ends where plain DDP ends."""

from __future__ import annotations

import textwrap

import pytest

pytest.importorskip("torch")
pytestmark = [pytest.mark.torch, pytest.mark.timeout(150)]  # past BOUND_S, which reports

SIZE = 3
BOUND_S = 120  # ~8 s on a quiet machine, most of it importing torch 3 times

SCRIPT = textwrap.dedent("""
    import copy
    import json

    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("ringtrain")
    rank, size = dist.get_rank(), dist.get_world_size()
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

    out = {"rank": rank, "plain": train(0), "full": train(6), "low": train(1)}
    print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()
""")


def test_torchs_powersgd_hook_at_full_rank_reproduces_the_mean_over_the_ring(script_ring):
    results = script_ring.run(SCRIPT, SIZE, BOUND_S)
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
