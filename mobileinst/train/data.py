"""Datasets and loaders for a training run, built from the DATA file and the TrainConfig."""
from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.coco import CocoInstances
from ..data.config import load_data_config
from ..data.copy_paste import CopyPaste
from ..data.loader import collate
from ..data.transforms import EvalTransform, TrainTransform
from ..errors import DataError
from ..evaluate.coco_eval import check_ground_truth
from .config import TrainConfig
from .sampler import ResumableSampler
from .video import build_video_train_loader, build_video_val_set

log = logging.getLogger("mobileinst.train")


class SkipUnreadable(Dataset):
    """Training view of a dataset: an unreadable image is replaced by the next readable one, with
    a counted warning, so one corrupt file does not kill a long run (the choice is deterministic)."""

    def __init__(self, dataset: CocoInstances, max_tries: int = 16) -> None:
        self.dataset, self.max_tries = dataset, max_tries
        self.class_names, self.cat_ids = dataset.class_names, dataset.cat_ids
        self.is_video = getattr(dataset, "is_video", False)  # YouTube-VIS clips (train/video.py)
        self.skipped: set[int] = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        for k in range(self.max_tries):
            i = (index + k) % len(self.dataset)
            try:
                return self.dataset[(i, seed)]
            except DataError as e:
                if i not in self.skipped:  # counted for the console by data.validate.unreadable_images
                    self.skipped.add(i)
                    log.debug("skipping unreadable training image: %s", e)
        raise DataError(f"{self.dataset.json_path}: {self.max_tries} unreadable images in a row")


def build_train_loader(cfg: TrainConfig, rank: int, world: int) -> tuple[DataLoader, SkipUnreadable]:
    data = load_data_config(cfg.data)
    if data.format == "ytvis":  # clips for temporal query passing
        return build_video_train_loader(cfg, data, rank, world, SkipUnreadable)
    if data.format != "coco":
        raise DataError(f"{cfg.data}: format {data.format!r} is not supported by image training")
    transform = TrainTransform(cfg.imgsz, crop=cfg.crop, color=cfg.color_jitter)
    mix = CopyPaste(cfg.copy_paste) if cfg.copy_paste > 0 else None
    dataset = SkipUnreadable(CocoInstances(data.train.json, data.train.images, transform,
                                           data.names, mix=mix))
    if cfg.batch % world:
        raise DataError(f"--batch {cfg.batch} does not split evenly over {world} workers")
    per_worker = cfg.batch // world
    groups = aspect_groups(dataset.dataset.images) if cfg.aspect_grouping else None
    sampler = ResumableSampler(len(dataset), per_worker, cfg.seed, rank, world, groups=groups)
    loader = DataLoader(dataset, batch_size=per_worker, sampler=sampler, num_workers=cfg.workers,
                        collate_fn=collate, drop_last=True, persistent_workers=cfg.workers > 0,
                        generator=torch.Generator().manual_seed(cfg.seed))
    return loader, dataset


def aspect_groups(images: list[dict]) -> list[int]:
    """detectron2's grouping of COCO image entries: 1 if portrait (height > width), else 0. The
    optional crop can turn an image, a rare case the grouping ignores (padding, not correctness)."""
    return [int(int(im["height"]) > int(im["width"])) for im in images]


def build_val_set(cfg: TrainConfig) -> CocoInstances:
    data = load_data_config(cfg.data)
    if data.format == "ytvis":  # evaluated as videos (evaluate/video.py)
        return build_video_val_set(cfg, data)
    # the in-run evaluation scores against the json: no ground-truth mask is decoded per image
    val = CocoInstances(data.val.json, data.val.images, EvalTransform(cfg.imgsz), data.names, masks=False)
    check_ground_truth(data.val.json)  # what evaluation needs, before the first training step
    return val
