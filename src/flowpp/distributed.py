"""Devices and processes: which device to run on, CPU threads, and the torchrun / DDP process
group (a no-op in single-process runs)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UsageError

__all__ = [
    "DistInfo",
    "resolve_device",
    "set_threads",
    "setup_distributed",
    "shutdown_distributed",
    "all_reduce_sum",
    "broadcast_module",
    "barrier",
]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' -> this process's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but CUDA is not available")
        return torch.device("cuda", local_rank)
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name!r} is not a device: {e}") from None


def set_threads(threads: int | None) -> None:
    """CPU threads for PyTorch's intra-op parallelism (None: PyTorch's choice)."""
    if threads:
        torch.set_num_threads(threads)


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


def setup_distributed(device_kind: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_module(module: torch.nn.Module, info: DistInfo, src: int = 0) -> None:
    """Give every rank rank ``src``'s parameters and buffers."""
    if not info.enabled:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.dtype == torch.bool:  # gloo cannot broadcast bool tensors
                tmp = t.data.to(torch.uint8)
                dist.broadcast(tmp, src=src)
                t.data.copy_(tmp.bool())
            else:
                dist.broadcast(t.data, src=src)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
