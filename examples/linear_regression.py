"""Linear regression three ways across nodes: distributed gradient descent, distributed SGD, and
map-reduce style "train locally, average the parameters once".

On this machine, as 4 local node processes (a few seconds):

    python examples/linear_regression.py
    python examples/linear_regression.py --nodes 2

Across devices, run :func:`compare` on every device with its own
``Node(peers=[...], listen=...)`` (see examples/digits_classifier.py) instead of ``run_local``.

The data: y = X w + noise with 20 features and 4,000 samples, the same on every node (seeded).
Each method is scored by its mean squared error and its distance to the least-squares solution,
next to the bytes each node sent:

* gradient descent: every step, every node computes the gradient on its whole shard, and one
  all-reduce (weighted by shard size) gives the full-data gradient: exactly full-batch GD.
* SGD: :class:`ringtrain.train.Trainer`, a small batch per node, gradients averaged each step.
* train locally, average once: each node runs SGD on its own shard alone, then one all-reduce
  averages the parameters, weighted by shard size. One message instead of one per step; on a
  convex problem with shards drawn from the same distribution it lands close, but not on, the
  optimum.
"""

from __future__ import annotations

import argparse

import numpy as np

from ringtrain.node.node import Node
from ringtrain.testing import run_local
from ringtrain.train.nn import Dense, Sequential, mse_loss
from ringtrain.train.optim import SGD
from ringtrain.train.sharding import epoch_shards
from ringtrain.train.trainer import DistributedOptimizer, Trainer

FEATURES, SAMPLES = 20, 4000


def make_data() -> tuple[np.ndarray, np.ndarray]:
    """The regression problem, identical on every node."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((SAMPLES, FEATURES))
    true_weight = rng.standard_normal((FEATURES, 1))
    return x, x @ true_weight + 0.1 * rng.standard_normal((SAMPLES, 1))


def model() -> Sequential:
    """y = x @ w + b, float64."""
    return Sequential(Dense(FEATURES, 1), seed=0, dtype=np.float64)


def score(net: Sequential, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean squared error, distance of (w, b) to the least-squares solution)."""
    design = np.hstack([x, np.ones((len(x), 1))])
    best = np.linalg.lstsq(design, y, rcond=None)[0].ravel()
    return mse_loss(net.forward(x), y)[0], float(np.linalg.norm(net.params - best))


def gradient_descent(node: Node, x: np.ndarray, y: np.ndarray, steps: int) -> Sequential:
    """Full-batch gradient descent: each node's shard gradient, averaged by shard size."""
    shard = epoch_shards(len(x), seed=0, epoch=0, members=node.members)[node.node_id]
    net = model()
    optimizer = DistributedOptimizer(node, SGD(net.params, lr=0.1))
    for _ in range(steps):
        loss, grad = mse_loss(net.forward(x[shard]), y[shard])
        net.backward(grad)
        optimizer.step(net.grads, weight=len(shard), loss=loss)
    return net


def sgd(node: Node, x: np.ndarray, y: np.ndarray, epochs: int) -> Sequential:
    """Minibatch SGD with the gradient averaged every step."""
    net = model()
    Trainer(node, net, SGD(net.params, lr=0.02), x, y, batch_size=16, loss=mse_loss,
            adaptive=False).fit(epochs)
    return net


def train_locally_average_once(node: Node, x: np.ndarray, y: np.ndarray,
                               epochs: int) -> Sequential:
    """Map: SGD on this node's shard alone. Reduce: one weighted parameter average."""
    shard = epoch_shards(len(x), seed=0, epoch=0, members=node.members)[node.node_id]
    net = model()
    optimizer = SGD(net.params, lr=0.02)
    rng = np.random.default_rng(node.rank)
    for _ in range(epochs):
        order = rng.permutation(shard)
        for start in range(0, len(order), 16):
            batch = order[start:start + 16]
            net.backward(mse_loss(net.forward(x[batch]), y[batch])[1])
            optimizer.step(net.grads)
    net.load_params(node.all_reduce(net.params, op="mean", weight=len(shard)))
    return net


def compare(node: Node) -> list[str]:
    """Run the three methods on this node; returns one result line each."""
    x, y = make_data()
    lines = []
    for name, run, amount in (("gradient descent, 100 steps", gradient_descent, 100),
                              ("SGD, gradients averaged each step, 2 epochs", sgd, 2),
                              ("train locally 2 epochs, average once", train_locally_average_once,
                               2)):
        sent = node.bytes_sent
        loss, distance = score(run(node, x, y, amount), x, y)
        lines.append(f"{name:45s} mse {loss:.5f}  |w - w_lstsq| {distance:.4f}  "
                     f"sent {(node.bytes_sent - sent) / 1e3:7.1f} kB")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4)
    args = parser.parse_args()
    lines = run_local(compare, args.nodes, timeout=120)[0]
    x, y = make_data()
    noise = mse_loss(x @ np.linalg.lstsq(x, y, rcond=None)[0], y)[0]
    print(f"{args.nodes} nodes, {SAMPLES} samples, {FEATURES} features; "
          f"least-squares mse {noise:.5f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
