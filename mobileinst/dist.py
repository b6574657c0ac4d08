"""Data-parallel helpers: the same code runs alone or under `torchrun --nproc_per_node N`."""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def env_rank() -> int:
    """The rank torchrun gave this process (0 without torchrun), valid after the group is gone."""
    return int(os.environ.get("RANK", 0))


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str) -> torch.device:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA); pick the device."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not is_dist():
        local = int(os.environ.get("LOCAL_RANK", 0))
        use_cuda = device.startswith("cuda") and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        return torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over the workers (a copy; the input is untouched)."""
    if not is_dist():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world_size()


def gather_objects(obj: Any) -> list[Any]:
    """Every worker's object, in rank order (on every worker)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's object on every worker."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
