"""An ordinary Hugging Face Accelerate training script; ringtrain only chooses the backend.

    pip install accelerate                                           # with torch already in
    ringtrain node --key-file job.key examples/accelerate_ddp.py    # on every device
    for port in 7101 7102 7103; do                                   # ...or 3 on one machine
      ringtrain node --insecure --no-discovery --world-size 3 --port $port \\
        --peer 127.0.0.1:7101 --peer 127.0.0.1:7102 --peer 127.0.0.1:7103 \\
        examples/accelerate_ddp.py &
    done; wait

(``--world-size 3``: the first ring waits for all three; without it two would start alone.)

``ringtrain node`` forms the ring, then runs this file with torchrun's variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...), which is what Accelerate reads to find its
processes. The one ringtrain line is ``dist.init_process_group(backend="ringtrain")`` before
``Accelerator(cpu=True)``: Accelerate then adopts that group (DistributedType.MULTI_CPU, its
num_processes and process_index are the ring's) and wraps the model in DDP over it. Accelerate
1.15 accepts no other CPU backend name than gloo or mpi (``InitProcessGroupKwargs(backend=
"ringtrain")`` with ``cpu=True`` raises; without ``cpu=True`` on a machine with no GPU it makes
the group but detects no distributed run, so the gradients would not be averaged), and its
``state.backend`` attribute reads "gloo" for every multi-CPU run without asking torch: the
group that carries the gradients is the one ``dist.get_backend()`` names.

Every process prints what Accelerate detected and, at the end, its step count (each process
takes 1/N of every epoch) and a hash of its parameters: the hashes are equal when every
process holds the same model.
"""

import argparse
import hashlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ringtrain.train.datasets import load_digits  # data only: 8x8 digits shipped in the package


def parameter_hash(model: nn.Module) -> str:
    """The first 16 hex digits of sha256 over every parameter's bytes, in order."""
    digest = hashlib.sha256()
    for parameter in model.parameters():
        digest.update(parameter.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=0.003)
    args = parser.parse_args()

    dist.init_process_group(backend="ringtrain")  # the only ringtrain-specific line
    accelerator = Accelerator(cpu=True)
    state = accelerator.state
    print(f"accelerate: process {accelerator.process_index} of {accelerator.num_processes}, "
          f"local {accelerator.local_process_index}, {state.distributed_type}, process group "
          f"backend {dist.get_backend()}", flush=True)

    torch.manual_seed(0)
    train_set, test_set = load_digits().split(0.2, seed=0)
    dataset = TensorDataset(torch.from_numpy(train_set.x.copy()),
                            torch.from_numpy(train_set.y.copy()))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    steps = 0
    for epoch in range(args.epochs):
        model.train()
        for x, y in loader:  # this process's shard of each global batch
            steps += 1
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
        mean_loss = accelerator.reduce(loss.detach(), reduction="mean")
        accelerator.print(f"epoch {epoch}: loss {mean_loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(test_set.x.copy())).argmax(dim=1)
    accuracy = (predicted.numpy() == test_set.y).mean()
    print(f"process {accelerator.process_index}: {steps} steps, test accuracy {accuracy:.3f}, "
          f"parameters {parameter_hash(accelerator.unwrap_model(model))}", flush=True)
    accelerator.end_training()  # destroys the process group


if __name__ == "__main__":
    main()
