"""Streaming video instance segmentation over a MobileInst model: kernel reuse + kernel association.

    vp = VideoPredictor.from_checkpoint("best.pt", reuse=3, conf=0.3)
    for rgb in frames:
        out = vp.step(rgb)      # TrackedFrame: track ids, labels, scores, masks at the frame's size

Kernel reuse (/shared/spec/mobileinst.md, "Video"): every `reuse`-th frame is a KEY frame and runs
the whole network (backbone + SEMD + instance decoder); the frames in between run backbone + SEMD
only and dot their mask features with the last key frame's kernels (M_{t+i} = K_t . X_mask^{t+i}).
reuse = 1 runs the full model on every frame. Key-frame kernels are associated with the previous
key frame's (`tracker.match_kernels`) and tracks start / continue / end on key frames only
(`tracker.Tracker`); non-key frames draw the alive tracks with the reused kernels.

Frames of any size are resized (short side `imgsz`, long side capped) and padded to a multiple of 32
like image prediction (`predict.preprocess`); masks come back at the frame's own size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import MobileInstError
from ..models.postprocess import InferenceConfig, binary_masks, maskness
from ..predict import preprocess
from .tracker import Track, Tracker, TrackerConfig


@dataclass
class TrackedFrame:
    """One frame's tracked instances, K alive tracks in slot order."""
    index: int
    key: bool  # the instance decoder ran on this frame
    track_ids: np.ndarray  # (K,) int
    labels: np.ndarray  # (K,) contiguous class labels (the track's class so far)
    scores: np.ndarray  # (K,) the track's score so far
    masks: np.ndarray  # (K, H, W) bool at the frame's size
    names: list[str] = field(default_factory=list)
    tracks: list[Track] = field(default_factory=list)  # the alive Track objects (shared state)
    slot_mask_logits: Tensor | None = None  # (N, H/4, W/4) every slot's mask logits, slot order

    def __len__(self) -> int:
        return len(self.track_ids)


class VideoPredictor:
    """A MobileInst model plus the streaming state of one video (call `reset` between videos)."""

    def __init__(self, model: torch.nn.Module, class_names: list[str] | None = None,
                 imgsz: int = 640, max_size: int | None = None, reuse: int = 1,
                 conf: float = 0.3, keep_conf: float | None = None, patience: int = 10,
                 device: str | torch.device = "cpu") -> None:
        if int(reuse) != reuse or reuse < 1:
            raise MobileInstError(f"the reuse interval must be an integer >= 1, got {reuse}")
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.class_names = class_names or getattr(model, "class_names", None) or \
            [str(i) for i in range(model.cfg.num_classes)]
        self.cat_ids = list(getattr(model, "cat_ids", None) or range(1, len(self.class_names) + 1))
        self.imgsz = imgsz
        self.max_size = max_size or round(imgsz * 853 / 640)  # as image prediction
        self.reuse = reuse
        self.mask_threshold = InferenceConfig().mask_threshold
        self.tracker = Tracker(TrackerConfig(conf, keep_conf, patience))
        self.reset()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", **kwargs) -> "VideoPredictor":
        from ..checkpoint import model_from_checkpoint
        model, ckpt = model_from_checkpoint(path)
        kwargs.setdefault("imgsz", (ckpt.get("train_config") or {}).get("imgsz", 640))
        return cls(model, model.class_names, device=device, **kwargs)

    def reset(self) -> None:
        """Forget the video: the next frame is frame 0 and a key frame."""
        self.tracker.reset()
        self.frame = 0
        self.last_key = -1
        self.kernels: Tensor | None = None  # (N, E) the last key frame's kernels, slot order
        self.class_probs: Tensor | None = None  # (N, C) its class probabilities, slot order

    @torch.no_grad()
    def step(self, image: np.ndarray) -> TrackedFrame:
        """One RGB uint8 frame (H, W, 3) -> its tracked instances."""
        batch, sizes = preprocess([image], self.imgsz, self.max_size)
        mask_feats, f_mask, x6 = self.model.features(batch.to(self.device))
        key = self.kernels is None or self.frame - self.last_key >= self.reuse
        if key:
            self._key_frame(x6, f_mask, mask_feats)
        logits = self.model.masks(self.kernels[None], mask_feats)[0]  # (N, H/4, W/4)
        prob = logits.float().sigmoid()
        if key:
            self.tracker.update(self.frame, self.class_probs.cpu().numpy(),
                                maskness(prob, self.mask_threshold).cpu().numpy())
        out = self._frame_result(key, prob, tuple(batch.shape[-2:]), sizes[0], image.shape[:2])
        out.slot_mask_logits = logits
        self.frame += 1
        return out

    def _key_frame(self, x6: Tensor, f_mask: Tensor, mask_feats: Tensor) -> None:
        """Run the instance decoder, put its queries into slot order, keep kernels and classes."""
        raw = self.model.add_pooled_class_logits(self.model.instance_decoder(x6, f_mask), mask_feats)
        kernels = raw["pred_kernels"][0]  # (N, E)
        perm = torch.from_numpy(self.tracker.associate(kernels)).to(kernels.device)
        probs = (raw["pred_logits"][0].float().sigmoid() * raw["pred_scores"][0].float().sigmoid()).sqrt()
        self.kernels, self.class_probs = kernels[perm], probs[perm]  # (N, E), (N, C)
        self.last_key = self.frame

    def _frame_result(self, key: bool, prob: Tensor, padded: tuple[int, int],
                      size: tuple[int, int], orig: tuple[int, int]) -> TrackedFrame:
        tracks = sorted(self.tracker.alive(), key=lambda t: t.slot)
        masks = np.zeros((0, *orig), bool)
        if tracks:
            slots = torch.tensor([t.slot for t in tracks], device=prob.device)
            masks = binary_masks(prob[slots], padded, size, orig, self.mask_threshold).cpu().numpy()
        labels = np.array([t.label for t in tracks], np.int64)
        return TrackedFrame(self.frame, key, np.array([t.id for t in tracks], np.int64), labels,
                            np.array([t.score for t in tracks], np.float32), masks,
                            [self.class_names[i] for i in labels], tracks)
