"""ringtrain.integrations.torch across real node processes: N nodes equal one process with the
whole global batch, and equal torch.distributed DDP on Gloo for the same model, data and seed."""

from __future__ import annotations

import datetime
import multiprocessing as mp

import numpy as np
import pytest

from ringtrain.node.node import Node
from ringtrain.testing import free_ports, run_local
from ringtrain.train.datasets import load_digits
from ringtrain.train.sharding import DataPosition, Sampler

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

SAMPLES = 200
BATCH = 8
STEPS = 12
TOLERANCE = 1e-10  # float64; only the summation order differs


def _model(seed: int):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 10)).double()


def _batches(world_size: int):
    """Each step's batches, one per member in rank order: the ringtrain sample stream."""
    digits = load_digits()
    x = torch.from_numpy(digits.x[:SAMPLES].astype(np.float64))
    y = torch.from_numpy(digits.y[:SAMPLES].copy())
    sampler, at = Sampler(SAMPLES, seed=0), DataPosition()
    for _ in range(STEPS):
        parts, at = sampler.next_batches(at, [BATCH] * world_size)
        yield [(x[torch.from_numpy(p.copy())], y[torch.from_numpy(p.copy())]) for p in parts]


def _flat(model) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


def _ringtrain_run(node: Node, bucket_bytes: int) -> np.ndarray:
    from ringtrain.integrations.torch import DataParallel

    torch.set_num_threads(1)
    model = _model(seed=100 + node.rank)  # differs per rank: the broadcast must fix it
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ddp = DataParallel(node, model, bucket_bytes=bucket_bytes)
    for parts in _batches(node.world_size):
        x, y = parts[node.rank]
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        assert ddp.backward(loss, samples=len(x))
        optimizer.step()
    return _flat(model)


def _oracle(world_size: int) -> np.ndarray:
    model = _model(seed=100)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for parts in _batches(world_size):
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return _flat(model)


@pytest.mark.parametrize("size", [1, 2, 4])
def test_n_torch_nodes_equal_one_process_with_the_global_batch(size):
    # 512-byte buckets: the model's 4 tensors go in 3 buckets, in flight during backward
    results = run_local(_ringtrain_run, size, args=(512,), timeout=90)
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])
    difference = np.abs(results[0] - _oracle(size)).max()
    print(f"torch N={size}: max |param - oracle| = {difference:.2e}")
    assert difference < TOLERANCE


def _ddp_run(rank: int, port: int) -> np.ndarray:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=30))
    try:
        model = _model(seed=100 + rank)  # DDP broadcasts rank 0's parameters, as ringtrain does
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for parts in _batches(2):
            x, y = parts[rank]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
            optimizer.step()
        return _flat(model)
    finally:
        dist.destroy_process_group()


def test_parity_with_torch_distributed_ddp_on_gloo():
    port = free_ports(1)[0]
    with mp.get_context("spawn").Pool(2) as pool:
        ddp = pool.starmap_async(_ddp_run, [(0, port), (1, port)]).get(timeout=90)
    ours = run_local(_ringtrain_run, 2, args=(1 << 20,), timeout=90)
    np.testing.assert_array_equal(ddp[0], ddp[1])
    difference = np.abs(ours[0] - ddp[0]).max()
    print(f"ringtrain vs DDP/Gloo after {STEPS} steps: max |param difference| = {difference:.2e}")
    assert difference < TOLERANCE
