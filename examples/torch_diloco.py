"""DiLoCo in a torch script, for devices on a slow link (Wi-Fi): every device trains its own
copy of the model on its own batches, and every ``--inner-steps`` steps the devices average how
far they moved (in 4 bits) and take one outer step together. Elastic: a device that dies costs
only its own steps of the round; the others carry on.

    ringtrain node --key-file job.key --min-nodes 2 examples/torch_diloco.py   # on every device
    ringtrain node --insecure --no-discovery --port 7101 --peer 127.0.0.1:7101 \\
        --peer 127.0.0.1:7102 examples/torch_diloco.py                # ...one of 2 on a laptop

Compared with DDP (examples/torch_ddp.py) the model is not wrapped and nothing travels during
backward: one all-reduce per round instead of one per step. Each device reads its own shuffle
of the bundled digits. Every device prints a line per round (rank 0 adds the shared model's
test accuracy every 10 rounds) and the same parameter hash at the end.
"""

import argparse
import hashlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ringtrain.integrations.torch import elastic
from ringtrain.integrations.torch.diloco import DiLoCo
from ringtrain.train.datasets import load_digits


def make_model() -> nn.Module:
    """The same starting model on every device."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def batch_of(device: int, index: int, samples: int, batch_size: int) -> torch.Tensor:
    """The ``index``-th batch of ``device``'s own endless shuffle of ``samples`` samples."""
    per_epoch = samples // batch_size
    epoch, place = divmod(index, per_epoch)
    order = torch.randperm(samples, generator=torch.Generator().manual_seed(
        1000 * device + epoch))
    return order[place * batch_size:(place + 1) * batch_size]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32, help="per device and step")
    parser.add_argument("--lr", type=float, default=1e-3, help="the inner Adam's")
    parser.add_argument("--compression", default="int4", help="the pseudo-gradient's codec, "
                        "or none")
    parser.add_argument("--save", default=None, help="write the final parameters to SAVE.RANK.pt")
    args = parser.parse_args()

    dist.init_process_group(backend="ringtrain")
    torch.set_num_threads(1)
    device = dist.get_rank()  # names this device's data order for the whole run
    train_set, test_set = load_digits().split(0.2, seed=0)
    x, y = torch.tensor(train_set.x), torch.tensor(train_set.y)
    test_x, test_y = torch.tensor(test_set.x), torch.tensor(test_set.y)

    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    outer = DiLoCo(model, inner_steps=args.inner_steps, outer_lr=1.0, momentum=0.0,
                   compression=None if args.compression == "none" else args.compression,
                   broadcast=False)  # elastic.run starts every device from one model
    state = elastic.State(model, optimizer, outer=outer, batches=0)

    def train(state: elastic.State) -> None:
        while outer.rounds_done < args.rounds:
            batch = batch_of(device, state.batches, len(x), args.batch_size)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            state.batches += 1
            if outer.step():  # a round's end: one all-reduce, one outer step
                line = f"round {outer.rounds_done}: loss {loss.item():.4f}"
                if dist.get_rank() == 0 and outer.rounds_done % 10 == 0:
                    with torch.no_grad():
                        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
                    line += f", test accuracy {accuracy:.3f}"
                print(f"{line} (rank {dist.get_rank()} of {dist.get_world_size()})", flush=True)
            state.commit()  # nothing before this is lost when the ring changes

    elastic.run(train, state)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]
    print(f"device {dist.get_rank()} of {dist.get_world_size()}: {outer.rounds_done} rounds, "
          f"parameters {digest}", flush=True)
    if args.save:
        torch.save(flat, f"{args.save}.{device}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
