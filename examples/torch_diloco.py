"""DiLoCo in a torch script, for devices on a slow link (Wi-Fi): every device trains its own
copy of the model on its own batches, and every ``--inner-steps`` steps the devices average how
far they moved (in 4 bits) and take one outer step together.

    ringtrain node --key-file job.key examples/torch_diloco.py        # on every device
    ringtrain node --insecure --no-discovery --port 7101 --peer 127.0.0.1:7101 \\
        --peer 127.0.0.1:7102 examples/torch_diloco.py                # ...one of 2 on a laptop

Compared with DDP (examples/torch_ddp.py) the model is not wrapped and nothing travels during
backward: one all-reduce per round instead of one per step. Each device reads its own shuffle
of the bundled digits. Rank 0 prints the shared model's test accuracy after every few rounds;
every device prints the same parameter hash at the end.
"""

import argparse
import hashlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ringtrain.integrations.torch.diloco import DiLoCo
from ringtrain.train.datasets import load_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32, help="per device and step")
    parser.add_argument("--lr", type=float, default=1e-3, help="the inner Adam's")
    args = parser.parse_args()

    dist.init_process_group(backend="ringtrain")
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    train, test = load_digits().split(0.2, seed=0)
    x, y = torch.tensor(train.x), torch.tensor(train.y)
    test_x, test_y = torch.tensor(test.x), torch.tensor(test.y)

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    outer = DiLoCo(model, inner_steps=args.inner_steps, outer_lr=1.0, momentum=0.0,
                   compression="int4")  # starts every device from rank 0's parameters
    order = torch.Generator().manual_seed(1 + rank)  # this device's own shuffle
    batches = iter(())
    while outer.rounds_done < args.rounds:
        batch = next(batches, None)
        if batch is None:
            batches = iter(torch.randperm(len(x), generator=order).split(args.batch_size))
            batch = next(batches)
        optimizer.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
        if outer.step() and rank == 0 and outer.rounds_done % 10 == 0:
            with torch.no_grad():
                accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
            print(f"round {outer.rounds_done}: test accuracy {accuracy:.3f}", flush=True)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]
    print(f"device {rank} of {size}: {outer.rounds_done} rounds, parameters {digest}",
          flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
