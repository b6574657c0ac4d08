"""Batching and loaders.

`collate` pads images to a common size that is a multiple of 32 with the mean pixel;
`build_dataloader` makes a reproducible (optionally distributed) DataLoader whose keys are
(index, sample_seed) pairs, so each sample's augmentation depends on (seed, epoch, position in
the epoch) only - not on the number of workers or which worker loads it.
"""
from __future__ import annotations

import random
from collections.abc import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..models.mobileinst import PIXEL_MEAN  # RGB 0..255; the model normalises with it


def collate(batch: list[tuple[torch.Tensor, dict]], size_divisor: int = 32
            ) -> tuple[torch.Tensor, list[dict]]:
    """[(uint8 (3, H, W), target)] -> (float32 images (B, 3, Hp, Wp) in 0..255 RGB, [target]).

    Hp, Wp = the batch max rounded up to a multiple of size_divisor. Padding (bottom/right) is the
    mean pixel, which normalises to 0 inside the model, as SparseInst pads after normalisation.
    Target masks keep the unpadded size."""
    images, targets = zip(*batch)
    hp = -(-max(im.shape[1] for im in images) // size_divisor) * size_divisor
    wp = -(-max(im.shape[2] for im in images) // size_divisor) * size_divisor
    out = torch.tensor(PIXEL_MEAN, dtype=torch.float32).view(1, 3, 1, 1).repeat(len(images), 1, hp, wp)
    for i, im in enumerate(images):
        out[i, :, : im.shape[1], : im.shape[2]] = im.float()
    return out, list(targets)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of the sample at `position` of epoch `epoch`'s global order."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + position


class SeededSampler(Sampler):
    """Wraps a DistributedSampler: yields (index, sample_seed) keys; `set_epoch` reshuffles."""

    def __init__(self, sampler: DistributedSampler, seed: int) -> None:
        self.sampler, self.seed, self.epoch = sampler, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rank, world = self.sampler.rank, self.sampler.num_replicas
        for k, index in enumerate(self.sampler):  # DistributedSampler: global order[rank::world]
            yield index, sample_seed(self.seed, self.epoch, rank + k * world)

    def __len__(self) -> int:
        return len(self.sampler)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: seed python / numpy from the worker's torch seed (which the
    loader derives from its generator), and keep cv2 single-threaded inside workers."""
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)
    cv2.setNumThreads(0)


def build_dataloader(dataset: Dataset, batch_size: int, shuffle: bool = True, workers: int = 2,
                     seed: int = 0, distributed: bool = False, drop_last: bool = False,
                     seed_keys: bool = True) -> DataLoader:
    """A reproducible DataLoader with `collate`.

    The order comes from a DistributedSampler (rank / world size from torch.distributed when
    `distributed`, else one replica) seeded with `seed`; call `loader.sampler.set_epoch(e)` each
    epoch to reshuffle. With `seed_keys` (default) the dataset is indexed with (index, sample_seed)
    keys, as CocoInstances accepts; otherwise with plain indexes, and randomness inside the dataset
    comes from the worker seeds (`seed_worker`). `batch_size` is per process."""
    if distributed:
        inner = DistributedSampler(dataset, shuffle=shuffle, seed=seed)
    else:
        inner = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=seed)
    sampler = SeededSampler(inner, seed) if seed_keys else inner
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, drop_last=drop_last, worker_init_fn=seed_worker,
                      generator=torch.Generator().manual_seed(seed),
                      persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
