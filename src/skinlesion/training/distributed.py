"""Multi-process plumbing: the process group, which ranks write files, broadcasting rank 0's decisions.

Where the ranks come from, in this order: a process group that is already set up (Ray Train, Lightning
Fabric, a notebook; left for the caller to tear down), torchrun's RANK / WORLD_SIZE / LOCAL_RANK (also under
``srun torchrun``), or SLURM's SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID when ``srun`` starts one task
per GPU itself (a batch script's own step, outside srun, is one process). Without any of them everything here
degrades to a single process.

Nodes need not share a file system: rank 0 decides (the split, a resumed run's state) and broadcasts, and the
first rank on each node that cannot see rank 0's run folder writes that node's own copy (``Dist.writes``).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from skinlesion.device import resolve_device
from skinlesion.errors import SkinLesionError

T = TypeVar("T")
TIMEOUT_ENV = "SKINLESION_DIST_TIMEOUT_MIN"
# Longer than torch's 10 / 30 min: every node may first build its own image cache (HAM10000 at full size takes
# minutes on a few cores) while the others wait in a collective.
DEFAULT_TIMEOUT_MIN = 120


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    writes: bool = True  # writes the run folder: rank 0, and (after with_writers) one rank per node without its view
    owns_group: bool = False  # setup() created the process group, so teardown() destroys it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks_from_env(env: Mapping[str, str]) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's variables, else from those srun sets for each task of a step;
    None for a single process. SLURM_NTASKS alone is not enough: a batch script that asked for 8 tasks sees it too,
    and would wait for 7 processes nobody started."""
    if "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return (int(env["RANK"]), world, int(env.get("LOCAL_RANK", "0"))) if world > 1 else None
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", "0"))
    return None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("gpu[003-005,9],cpu1" -> "gpu003"), for MASTER_ADDR."""
    try:  # scontrol knows every form of the syntax
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    match = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist)
    if not match:
        raise SkinLesionError(f"cannot read the SLURM node list {nodelist!r}; set MASTER_ADDR to the first node")
    return match.group(1) + (match.group(2) or "")


def timeout() -> timedelta:
    return timedelta(minutes=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_MIN)))


def setup(device_name: str | None = "auto") -> Dist:
    """Join (or adopt) the process group: nccl on CUDA (one GPU per local rank), gloo otherwise."""
    device = resolve_device(device_name)
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", rank)))
    else:
        found = ranks_from_env(os.environ)
        if found is None:
            return Dist(device=device)
        rank, world_size, local_rank = found
        if "WORLD_SIZE" not in os.environ:  # srun started us: env:// needs the rendezvous address
            os.environ.setdefault("MASTER_ADDR", first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")))
            os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))
    if world_size <= 1:
        return Dist(device=device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                timeout=timeout())  # fmt: skip
    return Dist(rank, world_size, local_rank, device, writes=rank == 0, owns_group=owns_group)


def with_writers(d: Dist, run_dir: Path) -> Dist:
    """``d`` with ``writes`` set: rank 0 always; on a node whose file system does not show rank 0's run folder
    (node-local disks), that node's first local rank too, so each node keeps its own copy to resume from."""
    if not d.enabled:
        return d
    def leave_marker() -> str:
        run_dir.mkdir(parents=True, exist_ok=True)
        name = f".rank0-{os.urandom(8).hex()}"
        (run_dir / name).touch()
        return name

    marker = run_dir / from_main(d, leave_marker)  # looked for in this rank's own --out (nodes may have others)
    writes = d.is_main or (d.local_rank == 0 and not marker.exists())
    barrier(d)
    if d.is_main:
        marker.unlink(missing_ok=True)
    if writes and not d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    return replace(d, writes=writes)


def from_main(d: Dist, compute: Callable[[], T]) -> T:
    """``compute()`` on rank 0, its result on every rank. If it fails there, every rank raises (the others a
    SkinLesionError with its message), so a bad input is one clear error instead of the others waiting out the
    timeout."""
    if not d.enabled:
        return compute()
    value, error, failure = None, None, None
    if d.is_main:
        try:
            value = compute()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks have been told
            failure, error = e, str(e) if isinstance(e, SkinLesionError) else f"{type(e).__name__}: {e}"
    value, error = broadcast_object(d, (value, error))
    if failure is not None:
        raise failure
    if error is not None:
        raise SkinLesionError(f"{error} (on rank 0)")
    return value


def broadcast_buffers(d: Dist, module: torch.nn.Module) -> None:
    """Rank 0's BatchNorm statistics (and other buffers) on every rank. In train mode each rank updates them
    from its own batches, so before validation (and for the EMA copy, which DDP never syncs) they differ."""
    if d.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def teardown(d: Dist) -> None:
    """Destroy the process group setup() created (one the caller set up stays theirs)."""
    if d.owns_group and dist.is_initialized():
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
