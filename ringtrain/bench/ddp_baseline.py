"""The reference of ``ringtrain bench-wifi``: plain synchronous data-parallel training through
torch's DistributedDataParallel over the Gloo backend, on the same model, initial parameters,
data order, batches and optimizer as ringtrain's synchronous method.

This module and :mod:`ringtrain.bench.baselines` are the only bench modules that import torch
(an optional extra, never a dependency of ringtrain).
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import numpy as np

from ..train.sharding import DataPosition, Sampler
from .wifi_worker import POINT, data, model_of, schedule_of

GLOO_PORT = 29811


def run(config: dict[str, Any]) -> dict[str, Any]:
    """Train with DDP + Gloo on this device; rank 0 prints the curve like the ringtrain
    worker. Returns this device's summary."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    rank, addresses = config["rank"], config["addresses"]
    world = len(addresses)
    master = addresses[0].rsplit(":", 1)[0]
    dist.init_process_group("gloo", init_method=f"tcp://{master}:{GLOO_PORT}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=config["timeout"]))
    try:
        x, y, test_x, test_y = data()
        reference = model_of(config["hidden"])
        layers: list[torch.nn.Module] = []
        for layer in reference.layers:
            if hasattr(layer, "weight"):
                linear = torch.nn.Linear(layer.in_features, layer.out_features)
                with torch.no_grad():  # numpy keeps (in, out); torch keeps (out, in)
                    linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(layer.weight.T)))
                    linear.bias.copy_(torch.from_numpy(layer.bias.copy()))
                layers.append(linear)
            else:
                layers.append(torch.nn.ReLU())
        model = torch.nn.Sequential(*layers)
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.Adam(ddp.parameters(), lr=config["lr"])
        loss_fn = torch.nn.CrossEntropyLoss()
        sampler, position = Sampler(len(x), seed=config["seed"]), DataPosition()
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        test_tx, test_ty = torch.from_numpy(test_x), torch.from_numpy(test_y)
        dist.barrier()
        start, paused, samples = time.perf_counter(), 0.0, 0
        schedule = schedule_of(config)
        while position.epoch < config["epochs"]:
            if schedule is not None:  # the ringtrain Trainer's progress, the same factor
                progress = (position.epoch + position.position / len(x)) / config["epochs"]
                optimizer.param_groups[0]["lr"] = config["lr"] * schedule.factor(progress)
            batches, position = sampler.next_batches(position, [config["batch"]] * world)
            mine = torch.from_numpy(batches[rank])
            optimizer.zero_grad(set_to_none=True)
            loss_fn(ddp(tx[mine]), ty[mine]).backward()
            optimizer.step()
            samples += len(batches[rank])
            if rank == 0:
                began = time.perf_counter()
                with torch.no_grad():
                    score = float((model(test_tx).argmax(1) == test_ty).float().mean())
                print(f"{POINT}{began - start - paused:.4f} {score:.5f} {samples}", flush=True)
                paused += time.perf_counter() - began
        elapsed = time.perf_counter() - start - paused
        dist.barrier()
        return {"samples": samples, "seconds": elapsed}
    finally:
        dist.destroy_process_group()
