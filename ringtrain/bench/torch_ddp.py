"""``ringtrain bench-torch``: PyTorch DDP training step time with the ``ringtrain`` backend
beside the same DDP on Gloo, in one run; and the cost of the torch API over the node.

    ringtrain bench-torch                                   # loopback, 4 processes
    ringtrain bench-torch --where lan --rate 1000 --repeats 5   # emulated 1 Gbit/s LAN (root)

Every run starts N fresh worker processes (one per namespace on ``--where lan``); each
builds the same MLP (``--hidden``; float32), wraps it in DDP on its backend and times
``--steps`` training steps (forward, backward with the bucket all-reduces overlapping it,
SGD step) after 3 warm-up steps; a run's step time is the slowest rank's mean. Backends
alternate run by run (``--repeats`` rounds): Gloo, ringtrain, ringtrain with the int8 DDP
communication hook (``ringtrain.integrations.torch.hooks``). The table shows the median
and the best run. Then, in the ringtrain runs, the gradient-sized all-reduce through
``dist.all_reduce`` against ``Node.all_reduce`` on the same ring, interleaved (the
wrapper's overhead). ringtrain links are encrypted (CURVE) off loopback; Gloo's are not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from ..comm.security import JobKey
from ..errors import ConfigError, RingtrainError
from ..testing import free_ports

BACKENDS = ("gloo", "ringtrain", "ringtrain+int8")
RUN_TIMEOUT_S = 600.0
PORT = 29800  # inside namespaces every node has its own ports


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the subcommand."""
    parser.add_argument("--where", choices=["loopback", "lan"], default="loopback",
                        help="loopback processes, or an emulated LAN of namespaces (root)")
    parser.add_argument("--rate", type=float, default=1000.0, help="LAN link rate, Mbit/s")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--batch", type=int, default=256, help="samples per rank per step")
    parser.add_argument("--hidden", type=int, default=1024,
                        help="MLP 512-H-H-10 (H=1024: 6.3 MB of gradient)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of interleaved runs")


def _model(hidden: int) -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(512, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, 10))


def _worker(config: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    backend, rank, n = config["backend"], config["rank"], len(config["addresses"])
    node = None
    if backend == "gloo":
        dist.init_process_group("gloo", init_method=f"tcp://{config['addresses'][0]}",
                                rank=rank, world_size=n)
    else:
        from ..integrations.torch import hooks
        from ..node.launch import set_launched_node
        from ..node.node import Node

        key = None if config["insecure"] else JobKey.from_hex(os.environ["RINGTRAIN_BENCH_KEY"])
        node = Node(config["addresses"], listen=config["addresses"][rank], key=key,
                    insecure=config["insecure"], node_id=f"bench-{rank:02d}")
        set_launched_node(node)
        dist.init_process_group("ringtrain", init_method="ringtrain://")
    model = _model(config["hidden"])
    ddp = DDP(model)
    if backend == "ringtrain+int8":
        ddp.register_comm_hook(hooks.RingCodecState("int8"), hooks.ring_codec_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(config["batch"], 512, generator=generator)
    y = torch.randint(0, 10, (config["batch"],), generator=generator)

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        optimizer.step()

    for _ in range(3):
        step()
    dist.barrier()
    started = time.perf_counter()
    for _ in range(config["steps"]):
        step()
    out: dict[str, Any] = {"step_s": (time.perf_counter() - started) / config["steps"]}
    if node is not None and backend == "ringtrain":
        grads = sum(p.numel() for p in model.parameters())
        tensor = torch.ones(grads)
        array = np.ones(grads, dtype=np.float32)
        torch_api, direct = [], []
        for _ in range(config["steps"]):
            dist.barrier()
            began = time.perf_counter()
            dist.all_reduce(tensor)
            torch_api.append(time.perf_counter() - began)
            dist.barrier()
            began = time.perf_counter()
            node.all_reduce(array, out=array)
            direct.append(time.perf_counter() - began)
        out["torch_api_s"], out["node_s"] = statistics.median(torch_api), statistics.median(direct)
    dist.destroy_process_group()
    if node is not None:
        node.close()
    return out


def worker_main(argv: list[str]) -> int:
    """``python -m ringtrain.bench.torch_ddp CONFIG_JSON``: one rank of one run."""
    print("RESULT " + json.dumps(_worker(json.loads(argv[0]))), flush=True)
    return 0


def _run(args: argparse.Namespace, lan: Any, backend: str, round_: int,
         key: JobKey) -> list[dict[str, Any]]:
    hosts = ["127.0.0.1"] * args.nodes if lan is None else \
        [lan.address(i) for i in range(args.nodes)]
    ports = free_ports(args.nodes) if lan is None else [PORT + round_] * args.nodes
    config = {"backend": backend, "addresses": [f"{h}:{p}" for h, p in zip(hosts, ports,
                                                                          strict=True)],
              "insecure": lan is None, "steps": args.steps, "batch": args.batch,
              "hidden": args.hidden}
    env = {**os.environ, "RINGTRAIN_BENCH_KEY": key.hex(), "OMP_NUM_THREADS": "1"}
    if lan is not None:
        env["GLOO_SOCKET_IFNAME"] = "eth0"
    argv = [sys.executable, "-m", "ringtrain.bench.torch_ddp"]
    processes = []
    for rank in range(args.nodes):
        command = [*argv, json.dumps({**config, "rank": rank})]
        kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "env": env}
        processes.append(subprocess.Popen(command, **kwargs) if lan is None
                         else lan.popen(rank, command, **kwargs))
    results, deadline = [], time.monotonic() + RUN_TIMEOUT_S
    for rank, process in enumerate(processes):
        try:
            stdout, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise RingtrainError(f"{backend} rank {rank}: no result in {RUN_TIMEOUT_S:.0f} s")\
                from None
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        if process.returncode != 0 or not lines:
            raise RingtrainError(f"{backend} rank {rank} failed ({process.returncode}): "
                                 f"{stderr.strip()[-2000:]}")
        results.append(json.loads(lines[-1][7:]))
    return results


def run(args: argparse.Namespace) -> int:
    """Interleaved runs of every backend; print the table."""
    try:
        import torch  # noqa: F401 - only to say so early
    except ImportError:
        raise ConfigError("bench-torch needs PyTorch: bash deploy/install.sh --torch") from None
    lan = None
    if args.where == "lan":
        from ..lab.netns import EmulatedLan

        lan = EmulatedLan(args.nodes, rate_mbit=args.rate)
    key = JobKey.generate()
    steps: dict[str, list[float]] = {b: [] for b in BACKENDS}
    overhead: list[tuple[float, float]] = []
    try:
        for round_ in range(args.repeats):
            for index, backend in enumerate(BACKENDS):
                results = _run(args, lan, backend, round_ * len(BACKENDS) + index, key)
                steps[backend].append(max(r["step_s"] for r in results))
                if backend == "ringtrain":
                    overhead.append((max(r["torch_api_s"] for r in results),
                                     max(r["node_s"] for r in results)))
                print(f"round {round_ + 1}: {backend}: {steps[backend][-1] * 1e3:.1f} ms/step",
                      flush=True)
    finally:
        if lan is not None:
            lan.close()
    where = "loopback" if lan is None else f"emulated LAN, {args.rate:g} Mbit/s links"
    grads = sum(p.numel() for p in _model(args.hidden).parameters()) * 4
    print(f"\nDDP step, {args.nodes} processes, {where}, MLP 512-{args.hidden}-{args.hidden}-10 "
          f"({grads / 1e6:.1f} MB of gradient), batch {args.batch} per rank; median (best) "
          f"of {args.repeats} runs of {args.steps} steps")
    gloo = statistics.median(steps["gloo"])
    print("| backend | step | best | / Gloo (median) |\n|---|---|---|---|")
    for backend in BACKENDS:
        median = statistics.median(steps[backend])
        print(f"| {backend} | {median * 1e3:.1f} ms | {min(steps[backend]) * 1e3:.1f} ms | "
              f"{median / gloo:.3f} |")
    torch_api = statistics.median(a for a, _ in overhead)
    direct = statistics.median(d for _, d in overhead)
    print(f"\nall-reduce of the gradient ({grads / 1e6:.1f} MB): dist.all_reduce "
          f"{torch_api * 1e3:.2f} ms, Node.all_reduce {direct * 1e3:.2f} ms (torch API / node "
          f"= {torch_api / direct:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
