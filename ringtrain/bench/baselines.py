"""Reference all-reduces for ``ringtrain bench``: torch.distributed's Gloo backend.

This is the one place the benchmark touches torch (an optional extra, never a dependency of
ringtrain). A worker process times the same all-reduce ringtrain's worker times, the same
way: a barrier, then one all-reduce, per iteration.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import numpy as np


def torch_available() -> bool:
    """Whether torch with the Gloo backend can be imported here."""
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available() and dist.is_gloo_available()


def gloo_worker(rank: int, world_size: int, master: str, sizes: list[int],
                iterations: Callable[[int], int], warmup: int,
                measure: Callable[[Callable[[], None], Callable[[], None], int, int], dict]
                ) -> dict[int, dict]:
    """Time a Gloo all-reduce of float32 buffers of each size (bytes) in this process.

    Args:
        master: ``host:port`` of the rendezvous store (rank 0 listens there).
        iterations: how many timed iterations a size gets.
        measure: the benchmark's timing loop, ``measure(op, barrier, warmup, iters)``.

    Returns:
        per size, what ``measure`` returned.
    """
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://{master}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=120))
    try:
        out = {}
        for size in sizes:
            data = np.random.default_rng(rank).standard_normal(size // 4).astype(np.float32)
            tensor = torch.from_numpy(data)

            def op(tensor: torch.Tensor = tensor) -> None:
                dist.all_reduce(tensor)

            out[size] = measure(op, dist.barrier, warmup, iterations(size))
        dist.barrier()
        return out
    finally:
        dist.destroy_process_group()
