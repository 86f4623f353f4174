"""torchrun plumbing: process group from the environment, rank-0-only writes, gathering val outputs.

``torchrun --nproc_per_node N -m skinlesion train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; without
them everything here degrades to a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from skinlesion.device import resolve_device


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_name: str | None = "auto") -> Dist:
    """Join the torchrun process group if there is one: nccl on CUDA (one GPU per local rank), gloo otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world_size <= 1:
        return Dist(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_reduce_sum(d: Dist, values: list[float]) -> list[float]:
    """Sum a few scalars over ranks (train loss / correct / count)."""
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def gather_rows(d: Dist, indices: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (index, row) pairs, concatenated and sorted by index: the whole val set on each rank."""
    if d.enabled:
        parts: list = [None] * d.world_size
        dist.all_gather_object(parts, (indices.cpu(), rows.cpu()))
        indices = torch.cat([p[0] for p in parts])
        rows = torch.cat([p[1] for p in parts])
    order = torch.argsort(indices)
    return indices[order], rows[order]


def broadcast_object(d: Dist, obj: Any) -> Any:
    """Rank 0's value (e.g. a timestamped run name) on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(d: Dist, obj: Any) -> list[Any]:
    """One picklable object per rank, in rank order (e.g. RNG states for last.pt)."""
    if not d.enabled:
        return [obj]
    parts: list[Any] = [None] * d.world_size
    dist.all_gather_object(parts, obj)
    return parts
