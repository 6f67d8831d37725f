"""The canonical PyTorch DDP example, as written for torchrun, with one change: the backend.

    ringtrain node --key-file job.key examples/torch_ddp.py          # on every device
    ringtrain node --insecure --no-discovery --port 7101 --peer 127.0.0.1:7101 \\
        --peer 127.0.0.1:7102 examples/torch_ddp.py                  # ...one of 2 on a laptop

The same file runs under ``torchrun --nproc-per-node 4 examples/torch_ddp.py`` once
``backend="ringtrain"`` reads ``backend="gloo"``: it imports nothing from ringtrain. Under
``ringtrain node`` the ring is the rendezvous (no MASTER_ADDR to set), and RANK, WORLD_SIZE,
LOCAL_RANK are the ring's.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def make_dataset(samples: int = 1024, features: int = 32, classes: int = 4) -> TensorDataset:
    """A fixed synthetic classification task (the same on every rank)."""
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(samples, features, generator=generator)
    teacher = torch.randn(features, classes, generator=generator)
    return TensorDataset(x, (x @ teacher).argmax(dim=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--save", default=None, help="write rank R's parameters to SAVE.R.pt")
    args = parser.parse_args()

    local_rank = int(os.environ["LOCAL_RANK"])  # torchrun's; one process per device here
    dist.init_process_group(backend="ringtrain")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    ddp = DDP(model)  # broadcasts rank 0's parameters; averages gradients during backward
    dataset = make_dataset()
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(ddp(x), y)
            loss.backward()
            optimizer.step()
        total = torch.tensor([loss.item()])
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
        if rank == 0:
            print(f"epoch {epoch}: loss {total.item():.4f} (rank {rank} of {world_size}, "
                  f"local rank {local_rank})", flush=True)
    if args.save:
        torch.save(model.state_dict(), f"{args.save}.{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
