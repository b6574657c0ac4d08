"""A training sampler that is reproducible, splits work across workers, and resumes mid-epoch.

Epoch e's order is a permutation drawn from (seed, e) alone, so a resumed run sees exactly the
batches the uninterrupted run would have. Each yielded key is (index, sample_seed): the dataset
draws its augmentation from sample_seed, so augmentation does not depend on which DataLoader
worker happens to load the sample.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler):
    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 shuffle: bool = True) -> None:
        if n == 0:
            raise ValueError("the training set is empty")
        self.n, self.batch, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.shuffle = shuffle
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        """Full batches per worker per epoch (at least one: tiny sets are repeated)."""
        return max(1, self.n // (self.batch * self.world))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        need = self.batches_per_epoch * self.batch * self.world
        reps = math.ceil(need / self.n)
        perms = [torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
                 for _ in range(reps)]
        return torch.cat(perms)[:need].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._order()
        mine = order[self.rank :: self.world]  # this worker's share, same length on every worker
        for pos in range(self.start_batch * self.batch, len(mine)):
            global_pos = pos * self.world + self.rank
            yield mine[pos], (self.seed * 1_000_003 + self.epoch) * 10_000_019 + global_pos

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch
