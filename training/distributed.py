"""Data-parallel training: the process group, sharded validation and the checks that keep the
processes in step.

`torchrun --nproc-per-node N -m cxrlt train ...` (or `cxrlt train --nproc N`, which runs
exactly that) starts N processes with RANK / WORLD_SIZE / LOCAL_RANK set; `setup` joins them
into one torch.distributed process group: NCCL when they train on CUDA GPUs (one GPU each,
`cuda:LOCAL_RANK`), gloo on CPU. Without those variables (a plain `cxrlt train`) nothing here
does anything and training runs in one process exactly as before.

What stays the same across processes, and how:
* the weights: DistributedDataParallel averages the gradients, so every process takes the
  same optimiser step (and DDP broadcasts rank 0's weights when it wraps the module);
* the batch-norm statistics: broadcast from rank 0 after every step (`sync_buffers`), so the
  EMA of weights and buffers is the same everywhere (`check_same` compares its hash each epoch);
* the draw of each epoch: training.samplers.DistributedBatchSampler, from (seed, epoch);
* validation: each process predicts a contiguous share of the images (`shard`) and
  `gather` puts the shares back together in order, so every process computes the same metrics.
Rank 0 alone writes checkpoints, metrics and logs.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclasses.dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched() -> bool:
    """Started by torchrun (or another launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def env_rank() -> int:
    """This process's rank from the launcher's environment (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def world() -> World:
    """The current process group's rank and size (0 of 1 without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: torch.device) -> World:
    """Join the launcher's process group once per process (NCCL for CUDA, else gloo)."""
    if not launched():
        return World()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        atexit.register(teardown)
    return world()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def process_device(device: torch.device) -> torch.device:
    """One GPU per process: cuda:LOCAL_RANK when the run is distributed on CUDA."""
    if device.type == "cuda" and launched() and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """The module DistributedDataParallel-wrapped when the run is distributed, else itself."""
    if not world().distributed:
        return module
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    # depthwise convolutions' gradients are laid out unlike DDP's buckets: a copy, not an error
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(module: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


@torch.no_grad()
def sync_buffers(module: nn.Module) -> None:
    """Rank 0's floating-point buffers (batch-norm running statistics) to every process."""
    if not world().distributed:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.broadcast(buffer, src=0)


def shard(count: int) -> np.ndarray:
    """The contiguous share of `count` items this process handles (all of them in one process)."""
    current = world()
    return np.array_split(np.arange(count), current.size)[current.rank]


def sharded(dataset):
    """This process's share of a validation dataset (the dataset itself in one process)."""
    if not world().distributed:
        return dataset
    return torch.utils.data.Subset(dataset, shard(len(dataset)).tolist())


def gather(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Each of `arrays` concatenated over the processes in rank order (itself in one process)."""
    if not world().distributed:
        return arrays
    parts: list[Any] = [None] * world().size
    dist.all_gather_object(parts, [np.asarray(a) for a in arrays])
    return [np.concatenate([part[i] for part in parts]) for i in range(len(arrays))]


def reduce_sums(values: dict[str, float]) -> dict[str, float]:
    """The sum of each value over the processes (same keys in every process)."""
    if not world().distributed or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = tensor.to(backend_device)
    dist.all_reduce(tensor)
    return dict(zip(keys, tensor.cpu().tolist()))


def check_same(digest: str, what: str) -> None:
    """Raise when `digest` differs between the processes."""
    if not world().distributed:
        return
    digests: list[Any] = [None] * world().size
    dist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"{what} differ between processes: {digests}")


def barrier() -> None:
    if world().distributed:
        dist.barrier()
