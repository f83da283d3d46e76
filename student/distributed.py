"""Running under ``torchrun``: the process group, sums over ranks, and a check that all ranks hold the same weights.

Without torchrun (no ``WORLD_SIZE`` > 1 in the environment) everything here is a no-op on a single process, so the
training loop has one code path.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    """Where this process stands: its rank among ``world_size`` and the device it trains on."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs and writes files."""
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` is CUDA when there is a GPU, else CPU; under torchrun each local rank takes its own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPU), or describe a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(0, 1, resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    where = resolve_device(device, local_rank)
    if where.type == "cuda":
        torch.cuda.set_device(where)
        dist.init_process_group("nccl", device_id=where)
    else:
        dist.init_process_group("gloo")
    return Dist(rank, world_size, where)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: torch.Tensor, where: Dist) -> torch.Tensor:
    """The element-wise sum of ``values`` over all ranks (``values`` itself on a single process)."""
    if where.world_size > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_objects(items: list[Any], where: Dist) -> list[Any]:
    """Every rank's ``items``, concatenated in rank order (``items`` itself on a single process)."""
    if where.world_size == 1:
        return items
    lists: list[list[Any]] = [[] for _ in range(where.world_size)]
    dist.all_gather_object(lists, items)
    return [item for part in lists for item in part]


def waiting_group(where: Dist) -> Any:
    """A gloo group for waiting while rank 0 alone works (a probe), with a timeout of hours: the other ranks idle
    there rather than inside a collective of the default group, whose timeout (NCCL's watchdog: 10 min) would
    abort them. Every rank must create it, at the same point; None on a single process."""
    if where.world_size == 1:
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(hours=6))


def broadcast_from_main(value: Any, where: Dist, group: Any = None) -> Any:
    """Rank 0's ``value`` on every rank (``value`` itself on a single process)."""
    if where.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def weights_digest(model: nn.Module) -> str:
    """sha256 of every parameter's name and exact bytes: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def gather_digests(model: nn.Module, where: Dist) -> list[str]:
    """Every rank's :func:`weights_digest`, in rank order."""
    digest = weights_digest(model)
    if where.world_size == 1:
        return [digest]
    digests: list[str] = [""] * where.world_size
    dist.all_gather_object(digests, digest)
    return digests
