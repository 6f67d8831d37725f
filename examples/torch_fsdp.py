"""FSDP on CPU (``fully_shard``): each rank keeps a shard of every parameter; only the backend
says ringtrain.

    ringtrain node --key-file job.key examples/torch_fsdp.py         # on every device
    ringtrain node --insecure --no-discovery --port 7101 --peer 127.0.0.1:7101 \\
        --peer 127.0.0.1:7102 examples/torch_fsdp.py                 # ...one of 2 on a laptop

The same file runs under ``torchrun --nproc-per-node 2 examples/torch_fsdp.py`` once
``backend="ringtrain"`` reads ``backend="gloo"``. FSDP's own traffic (all-gather of the
parameters before each layer runs, reduce-scatter of the gradients after) goes through the
group's collectives. DTensor's functional collectives (``DTensor.full_tensor()``,
``redistribute``) need a backend written in C++, which a Python group cannot register on
torch 2.13: the full parameters are gathered here with ``dist.all_gather`` instead.
"""

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard


def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole, on every rank, from the shards (dim 0, torch.chunk's cut)."""
    world = dist.get_world_size()
    whole = {}
    for name, sharded in model.state_dict().items():
        local = sharded.to_local()
        rows = -(-sharded.shape[0] // world)  # every shard padded to the largest
        padded = torch.zeros((rows, *local.shape[1:]), dtype=local.dtype)
        padded[:local.shape[0]] = local
        shards = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(shards, padded)
        whole[name] = torch.cat(shards)[:sharded.shape[0]]
    return whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--save", default=None, help="write rank R's parameters to SAVE.R.pt")
    args = parser.parse_args()

    dist.init_process_group(backend="ringtrain")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 9))  # 9 rows: uneven
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    generator = torch.Generator().manual_seed(1234)  # the same data on every rank
    x = torch.randn(64 * world_size, 32, generator=generator)
    y = torch.randint(0, 9, (64 * world_size,), generator=generator)
    for step in range(args.steps):
        loss = F.cross_entropy(model(x[rank::world_size]), y[rank::world_size])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and step % 5 == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)

    whole = full_parameters(model)
    if args.save:
        torch.save(whole, f"{args.save}.{rank}.pt")
    print(f"rank {rank} of {world_size}: done after {args.steps} steps, backend "
          f"{dist.get_backend()}, {sum(p.numel() for p in whole.values())} parameters",
          flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
