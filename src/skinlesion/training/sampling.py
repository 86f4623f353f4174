"""Samplers: per-epoch deterministic shuffling that shards across DDP ranks, and class-balanced draws.

Every sampler here is a pure function of (seed, epoch, rank), so a resumed run sees the same order;
``SeededSampler`` gives each drawn sample its own augmentation seed the same way, so crops and flips do not
depend on the number of loader workers, on worker processes that live across epochs, or on --resume.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Sampler

from skinlesion.errors import SkinLesionError


class BalancedSampler(Sampler[int]):
    """Draw ``len(labels)`` indices per epoch with replacement, each class equally likely overall
    (sample weight 1 / class count); under DDP every rank takes its own slice of the same draw."""

    def __init__(self, labels: Sequence[int], num_replicas: int = 1, rank: int = 0, seed: int = 0):
        counts = np.bincount(np.asarray(labels), minlength=max(labels) + 1)
        self.weights = torch.tensor(1.0 / counts[np.asarray(labels)], dtype=torch.double)
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.num_samples = math.ceil(len(labels) / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        draw = torch.multinomial(self.weights, self.num_samples * self.num_replicas, replacement=True, generator=g)
        return iter(draw[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``n`` gets indices r, r+n, r+2n ... in order, without padding, so gathering every
    rank's outputs covers the validation set exactly once."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, length, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, seed)``: ``inner``'s indices, each with a seed for its augmentation drawn from
    ``seed_of(epoch)`` (``LesionDataset`` runs the transform under it). Persistent workers never see the epoch
    change, but the seeds they receive do."""

    def __init__(self, inner: Sampler[int], seed_of):
        self.inner, self.seed_of, self.epoch = inner, seed_of, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(self.inner)
        g = torch.Generator().manual_seed(self.seed_of(self.epoch))
        seeds = torch.randint(0, 2**62, (len(indices),), generator=g).tolist()
        return iter(zip(indices, seeds, strict=True))

    def __len__(self) -> int:
        return len(self.inner)


def train_sampler(labels: Sequence[int], kind: str, num_replicas: int, rank: int, seed: int) -> Sampler[int]:
    """``none``: a shuffled pass over the training set (sharded by DDP rank, reseeded each epoch);
    ``balanced``: class-balanced draws with replacement."""
    if kind == "balanced":
        return BalancedSampler(labels, num_replicas, rank, seed)
    if kind != "none":
        raise SkinLesionError(f"unknown --sampler {kind!r}; choose none or balanced")
    return DistributedSampler(range(len(labels)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
