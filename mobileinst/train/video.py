"""Video training with temporal query passing (the MobileInst paper, Zhang et al., AAAI 2024,
arXiv 2303.17594).

A batch holds B clips of two frames t and t + d (`data.ytvis.YtvisClips`, d in 1..max_gap), stacked
as images (2B, 3, H, W) = [the B frames t; the B frames t + d]. One forward pass:
- backbone + SEMD run on all 2B frames (mask features M, local features F_mask, X6);
- the GLOBAL half of the instance decoder runs on frame t's X6 only, giving queries q_t;
- the LOCAL half runs twice with those queries: with frame t's F_mask (the ordinary image path)
  and with frame t + d's F_mask (temporal query passing: q_t is "passed" to the later frame);
- each output's kernels dot its own frame's mask features.
No extra parameters. The spec leaves open whether frame t is supervised too; we supervise BOTH
(the natural choice): frame t with its targets exactly as image training, frame t + d with its own
targets, each through the same MobileInstCriterion (its own Hungarian matching); the loss is the
mean of the two, so its scale equals image training's. `--batch` counts clips (2 frames each).
A `coco:` entry in the DATA file adds that json's images as pseudo-clips (`data.pseudo_clips`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.data import DataLoader

from ..data.coco import CocoInstances
from ..data.config import DataConfig
from ..data.pseudo_clips import MixedClips, PseudoClips
from ..data.transforms import EvalTransform, TrainTransform
from ..data.ytvis import YtvisClips, collate_clips
from ..errors import DataError
from .config import TrainConfig
from .losses import MobileInstCriterion
from .sampler import ResumableSampler

Outputs = dict[str, Tensor]


class TemporalQueryPassing(nn.Module):
    """Wraps a MobileInst (no parameters of its own, so state_dict keys are `model.*` here but the
    trainer saves the inner model): images (2B, ...) -> (outputs of frames t, outputs of t + d)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Outputs, Outputs]:
        b = images.shape[0] // 2
        mask_feats, f_mask, x6 = self.model.features(images)  # (2B, E, h, w), (2B, D, h, w), (2B, C6, ..)
        dec = self.model.instance_decoder
        q, pos, _ = dec.forward_global(x6[:b], f_mask[:b])  # (B, N, hidden): frame t's queries
        out_t = self.model.decode(dec.heads(dec.forward_local(q, pos, f_mask[:b])), mask_feats[:b])
        out_d = self.model.decode(dec.heads(dec.forward_local(q, pos, f_mask[b:])), mask_feats[b:])  # passed to t + d
        return out_t, out_d  # pred_masks (B, N, H/4, W/4) each


class VideoCriterion(nn.Module):
    """MobileInstCriterion on frame t and on frame t + d; each loss is the mean of the two.
    `loss_t` / `loss_d` (detached) report the two frames' totals."""

    def __init__(self, criterion: MobileInstCriterion) -> None:
        super().__init__()
        self.criterion = criterion

    def forward(self, outputs: tuple[Outputs, Outputs], targets: list[dict]) -> dict[str, Tensor]:
        out_t, out_d = outputs
        b = len(targets) // 2
        lt, ld = self.criterion(out_t, targets[:b]), self.criterion(out_d, targets[b:])
        losses = {k: (lt[k] + ld[k]) / 2 for k in lt}
        losses.update(loss_t=lt["loss"].detach(), loss_d=ld["loss"].detach())
        return losses


def build_video_train_loader(cfg: TrainConfig, data: DataConfig, rank: int, world: int, wrap
                             ) -> tuple[DataLoader, object]:
    """The clip loader of a `video: true` DATA file; `wrap` is the image path's SkipUnreadable."""
    max_gap = int(data.extra.get("max_gap", 5))
    transform = TrainTransform(cfg.imgsz, crop=cfg.crop, color=cfg.color_jitter)
    clips = YtvisClips(data.train.json, data.train.images, transform, data.names, max_gap=max_gap)
    if not any(clips.anns.values()):
        raise DataError(f"{data.train.json}: no annotations: nothing to train on")
    if data.coco is not None:  # COCO images as pseudo-clips (data/pseudo_clips.py)
        clips = MixedClips([clips, pseudo_clips(data, clips, transform)])
    dataset = wrap(clips)
    if len(dataset) == 0:
        raise DataError(f"{data.train.json}: no frames to train on")
    if cfg.batch % world:
        raise DataError(f"--batch {cfg.batch} does not split evenly over {world} workers")
    per_worker = cfg.batch // world
    sampler = ResumableSampler(len(dataset), per_worker, cfg.seed, rank, world)
    loader = DataLoader(dataset, batch_size=per_worker, sampler=sampler, num_workers=cfg.workers,
                        collate_fn=collate_clips, drop_last=True, persistent_workers=cfg.workers > 0,
                        generator=torch.Generator().manual_seed(cfg.seed))
    return loader, dataset


def pseudo_clips(data: DataConfig, clips: YtvisClips, transform: TrainTransform) -> PseudoClips:
    """The DATA file's `coco` images as pseudo-clips, with the videos' classes (same category ids)."""
    coco = CocoInstances(data.coco.json, data.coco.images, None, clips.class_names)
    if coco.cat_ids != clips.cat_ids:
        raise DataError(f"{data.path}: the coco json {data.coco.json} has category ids {coco.cat_ids}, "
                        f"the videos {data.train.json} {clips.cat_ids}: they must be the same")
    return PseudoClips(coco, transform)


def build_video_val_set(cfg: TrainConfig, data: DataConfig) -> YtvisClips:
    """The val videos, evaluated with the tracker at short side cfg.imgsz (`evaluate.video`)."""
    return YtvisClips(data.val.json, data.val.images, EvalTransform(cfg.imgsz), data.names)
