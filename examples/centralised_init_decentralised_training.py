"""Centralised initialisation, decentralised training: one node initialises the model, every node
trains on its own partition in parallel, and the nodes aggregate parameters periodically.

On this machine, as 4 local node processes (a few seconds):

    python examples/centralised_init_decentralised_training.py
    python examples/centralised_init_decentralised_training.py --nodes 3 --rounds 10

Across devices, call :func:`train` on every device with its own
``Node(peers=[...], listen=...)`` (see examples/digits_classifier.py) instead of ``run_local``.

The steps, written out with the node's collectives (``Trainer(average_every=k)`` packages the
same pattern, with a different partition every epoch):

1. initialise on rank 0 only (here: a short warm-up on a small labelled set only rank 0 has),
   then ``node.broadcast`` the parameters, so every node starts from rank 0's model;
2. partition the training set with :func:`ringtrain.train.sharding.epoch_shards`: disjoint shards,
   every sample in exactly one;
3. each round, every node trains ``--local-steps`` steps on its shard, alone;
4. then ``node.all_reduce(op="mean", weight=shard size)`` averages the parameters;
5. evaluate the aggregated model on the test set after every round.
"""

from __future__ import annotations

import argparse

import numpy as np

from ringtrain.node.node import Node
from ringtrain.testing import run_local
from ringtrain.train.datasets import load_digits
from ringtrain.train.nn import Dense, ReLU, Sequential, accuracy, softmax_cross_entropy
from ringtrain.train.optim import SGD
from ringtrain.train.sharding import epoch_shards

BATCH = 32


def local_steps(net: Sequential, optimizer: SGD, x: np.ndarray, y: np.ndarray, steps: int,
                rng: np.random.Generator) -> None:
    """Train ``steps`` minibatch steps on (x, y) without talking to anyone."""
    for _ in range(steps):
        batch = rng.choice(len(x), size=min(BATCH, len(x)), replace=False)
        net.backward(softmax_cross_entropy(net.forward(x[batch]), y[batch])[1])
        optimizer.step(net.grads)


def train(node: Node, rounds: int, steps_per_round: int) -> tuple[list[str], np.ndarray]:
    """Initialise on rank 0, broadcast, train on partitions, average, evaluate.

    Returns:
        (this node's log lines, its final parameters).
    """
    train_set, test_set = load_digits().split(0.2, seed=0)
    net = Sequential(Dense(64, 64), ReLU(), Dense(64, 10), seed=node.rank)
    optimizer = SGD(net.params, lr=0.1, momentum=0.9)
    log = []

    # 1. centralised initialisation: only rank 0's warm-up counts
    if node.rank == 0:
        local_steps(net, optimizer, train_set.x[:100], train_set.y[:100], 20,
                    np.random.default_rng(0))
    net.load_params(node.broadcast(net.params, root=0))
    optimizer = SGD(net.params, lr=0.1, momentum=0.9)  # fresh momentum on every node
    log.append(f"after rank 0's initialisation: test accuracy "
               f"{accuracy(net.forward(test_set.x), test_set.y):.3f}")

    # 2. partition
    shard = epoch_shards(len(train_set), seed=0, epoch=0, members=node.members)[node.node_id]
    x, y = train_set.x[shard], train_set.y[shard]
    rng = np.random.default_rng(100 + node.rank)

    for round_ in range(1, rounds + 1):
        local_steps(net, optimizer, x, y, steps_per_round, rng)  # 3. in parallel
        net.load_params(node.all_reduce(net.params, op="mean", weight=len(shard)))  # 4.
        log.append(f"round {round_:2d}: test accuracy "  # 5.
                   f"{accuracy(net.forward(test_set.x), test_set.y):.3f}, "
                   f"{node.bytes_sent / 1e3:.0f} kB sent so far")
    return log, net.params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=10)
    args = parser.parse_args()
    results = run_local(train, args.nodes, args=(args.rounds, args.local_steps), timeout=120)
    same = all(np.array_equal(params, results[0][1]) for _, params in results)
    print(f"{args.nodes} nodes, {args.local_steps} local steps per round (rank 0's log)")
    print("\n".join(results[0][0]))
    print(f"every node ends with the same model: {same}")


if __name__ == "__main__":
    main()
