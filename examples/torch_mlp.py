"""A PyTorch MLP trained on the bundled digits through ringtrain (the torch integration).

Needs the extra: ``pip install 'ringtrain[torch]'``. On this machine, as 2 local node processes
(about 10 s, most of it importing torch):

    python examples/torch_mlp.py
    python examples/torch_mlp.py --nodes 4 --epochs 10

Across devices, call :func:`train` on every device with its own
``Node(peers=[...], listen=...)`` (see examples/digits_classifier.py) instead of ``run_local``.

The training loop is plain PyTorch except for two lines: ``DataParallel(node, model)`` (rank
0's parameters on every node) and ``ddp.backward(loss, samples)`` instead of
``loss.backward()`` (gradients averaged over the nodes while backward runs).
"""

from __future__ import annotations

import argparse

import numpy as np

from ringtrain.node.node import Node
from ringtrain.testing import run_local
from ringtrain.train.datasets import load_digits
from ringtrain.train.sharding import DataPosition, Sampler

BATCH = 32


def train(node: Node, epochs: int) -> str:
    """Train the torch model on this node's shard of every step; returns a summary line."""
    import torch

    from ringtrain.integrations.torch import DataParallel

    torch.set_num_threads(1)  # several nodes share this machine's cores
    torch.manual_seed(0)  # rank 0's initial parameters win anyway; this makes runs repeatable
    train_set, test_set = load_digits().split(0.2, seed=0)
    x, y = torch.from_numpy(train_set.x.copy()), torch.from_numpy(train_set.y.copy())
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.003)
    ddp = DataParallel(node, model)
    sampler, at = Sampler(len(train_set), seed=0), DataPosition()
    while at.epoch < epochs:
        # the ringtrain sample stream: this node's slice of the next global batch
        batches, at = sampler.next_batches(at, [BATCH] * node.world_size)
        mine = torch.from_numpy(batches[node.rank].copy())
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[mine]), y[mine])
        if ddp.backward(loss, samples=len(mine)):
            optimizer.step()
    with torch.no_grad():
        predicted = model(torch.from_numpy(test_set.x.copy())).argmax(dim=1).numpy()
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    return (f"node {node.rank}: test accuracy {np.mean(predicted == test_set.y):.3f}, "
            f"parameter checksum {checksum:.10f}, sent {node.bytes_sent / 1e6:.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    for line in run_local(train, args.nodes, args=(args.epochs,), timeout=120):
        print(line)


if __name__ == "__main__":
    main()
