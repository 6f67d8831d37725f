"""DDP that carries on when a device dies or joins: the canonical example plus ringtrain's
elastic State (the one ringtrain import), in the manner of Horovod's elastic API.

    ringtrain node --key-file job.key --min-nodes 2 examples/torch_elastic_ddp.py   # each device

Kill a device mid-training (or start another): the others print one line, re-form the ring,
take the most advanced member's committed state and go on from that step; no step is lost
(see ringtrain/integrations/torch/elastic.py).
"""

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

from ringtrain.integrations.torch import elastic


def make_dataset(samples: int = 2048, features: int = 32, classes: int = 4) -> TensorDataset:
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(samples, features, generator=generator)
    teacher = torch.randn(features, classes, generator=generator)
    return TensorDataset(x, (x @ teacher).argmax(dim=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--save", default=None, help="write the final parameters to SAVE.RANK.pt")
    args = parser.parse_args()

    dist.init_process_group(backend="ringtrain")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    dataset = make_dataset()
    state = elastic.State(model, optimizer, epoch=0, step=0, position=0)

    def train(state: elastic.State) -> None:
        ddp = DDP(state.model)
        sampler = elastic.ElasticSampler(len(dataset), args.batch_size, seed=0)
        while state.epoch < args.epochs:
            sampler.set_epoch(state.epoch, state.position)
            for x, y in DataLoader(dataset, batch_size=args.batch_size, sampler=sampler):
                optimizer.zero_grad()
                loss = F.cross_entropy(ddp(x), y)
                loss.backward()
                optimizer.step()
                state.position += args.batch_size * dist.get_world_size()
                state.step += 1
                print(f"step {state.step}: loss {loss.item():.4f} (rank {dist.get_rank()} of "
                      f"{dist.get_world_size()})", flush=True)
                state.commit()
            state.epoch, state.position = state.epoch + 1, 0
            state.commit()

    elastic.run(train, state)
    print(f"done: {state.step} steps, epoch {state.epoch}", flush=True)
    if args.save:
        torch.save(model.state_dict(), f"{args.save}.{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
