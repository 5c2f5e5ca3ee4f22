"""torch.distributed glue for torchrun: process-group set-up and gathering tensors across ranks.

Everything degrades to single-process behaviour when not launched by torchrun (no WORLD_SIZE in the env).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device, timeout: timedelta | None = None) -> DistInfo:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, gloo on CPU); `timeout`: how
    long a collective waits for the other ranks (None: torch's default)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return DistInfo(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0"))
    )


def cleanup() -> None:
    """Leave and destroy the process group (no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def ends_process_group(fn):
    """Decorate a job that may `init_distributed`: the process group it created is destroyed (`cleanup`) when
    it returns or raises. A group that existed before the call (the caller's own) is left alone."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        existed = dist.is_available() and dist.is_initialized()
        try:
            return fn(*args, **kwargs)
        finally:
            if not existed:
                cleanup()

    return run


def all_gather_cat(tensor: torch.Tensor, same_size: bool = False) -> torch.Tensor:
    """Concatenate `tensor` from every rank, in rank order; identity when alone.

    Rows may differ in number across ranks, unless `same_size` promises they do not (then no host sync).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    world = dist.get_world_size()
    if same_size:
        out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_into_tensor(out, tensor.contiguous())
        return out
    n = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
