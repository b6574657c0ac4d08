"""COCO images as two-frame pseudo-clips, to mix into video training (as is common in VIS training).

A still image becomes a clip (frame 0, frame 1): frame 0 is the image, frame 1 the same image under a
random "camera motion" (a similarity warp: shift up to `max_shift` of each side, zoom within
1 +- `max_zoom`, the uncovered border filled with the mean pixel); then BOTH frames go through the
training transform with the same draw (scale, crop, flip), as `ytvis.YtvisClips` does for real
frames, so they come out the same size. Instances are the same objects in both frames (track ids =
annotation ids); one warped out of view or shrunk to nothing is dropped from frame 1 only.

Items have YtvisClips' layout (`clip` uint8 (2, 3, H, W), [target_0, target_1]), so `MixedClips`
can concatenate the two kinds for the clip loader (`train.video`).
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .coco import CocoInstances, Transform
from .transforms import nonempty
from .ytvis import clip_frame

MEAN_PIXEL = (124, 116, 104)  # RGB, the letterbox fill (export/onnx.py)


def random_motion(image: np.ndarray, masks: np.ndarray, rng: np.random.Generator,
                  max_shift: float = 0.1, max_zoom: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8, (M, H, W) uint8 -> the same, warped by one random similarity transform
    (zoom about the centre, then shift); same size out."""
    h, w = image.shape[:2]
    zoom = 1.0 + rng.uniform(-max_zoom, max_zoom)
    dx, dy = rng.uniform(-max_shift, max_shift) * w, rng.uniform(-max_shift, max_shift) * h
    affine = np.array([[zoom, 0.0, (1 - zoom) * w / 2 + dx],
                       [0.0, zoom, (1 - zoom) * h / 2 + dy]])  # x' = zoom * (x - c) + c + shift
    moved = cv2.warpAffine(image, affine, (w, h), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=MEAN_PIXEL)
    moved_masks = np.stack([cv2.warpAffine(m, affine, (w, h), flags=cv2.INTER_NEAREST,
                                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
                            for m in masks]) if len(masks) else masks
    return moved, moved_masks


class PseudoClips(Dataset):
    """Two-frame pseudo-clips of a COCO json's images (module docstring); item `ds[(i, seed)]`."""

    is_video = True

    def __init__(self, coco: CocoInstances, transform: Transform | None = None,
                 max_shift: float = 0.1, max_zoom: float = 0.1) -> None:
        self.coco, self.transform = coco, transform
        self.max_shift, self.max_zoom = max_shift, max_zoom
        self.json_path, self.class_names, self.cat_ids = coco.json_path, coco.class_names, coco.cat_ids

    def __len__(self) -> int:
        return len(self.coco)

    def _frame(self, index: int, t: int, image: np.ndarray, labels: np.ndarray, ids: np.ndarray,
               masks: np.ndarray, aug_seed: int) -> tuple[torch.Tensor, dict]:
        keep = nonempty(masks)  # instances warped out of view
        image_id = int(self.coco.images[index]["id"])
        return clip_frame(image, labels[keep], masks[keep], ids[keep], self.transform, aug_seed,
                          video_id=-1 - image_id, frame=t, image_id=image_id)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, list[dict]]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        rng = np.random.default_rng(seed)
        image, labels, masks, ids = self.coco.load_with_ids(index)
        moved, moved_masks = random_motion(image, masks, rng, self.max_shift, self.max_zoom)
        aug = int(rng.integers(0, 2**62))  # one draw for both frames, as for real clips
        (a, ta), (b, tb) = (self._frame(index, 0, image, labels, ids, masks, aug),
                            self._frame(index, 1, moved, labels, ids, moved_masks, aug))
        return torch.stack([a, b]), [ta, tb]

    def __repr__(self) -> str:
        return f"PseudoClips({self.coco!r}, max_shift={self.max_shift}, max_zoom={self.max_zoom})"


class MixedClips(Dataset):
    """Clip datasets one after the other (real video clips first, then pseudo-clips); item
    `ds[(i, seed)]` is item (i - offset, seed) of the dataset i falls in. Class names and category
    ids are the first dataset's; the others must have the same category ids."""

    is_video = True

    def __init__(self, datasets: list[Dataset]) -> None:
        self.datasets = datasets
        self.offsets = np.cumsum([0] + [len(d) for d in datasets])
        first = datasets[0]
        self.json_path, self.class_names, self.cat_ids = first.json_path, first.class_names, first.cat_ids

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.datasets[k][(index - int(self.offsets[k]), seed)]

    def __repr__(self) -> str:
        return f"MixedClips({', '.join(map(repr, self.datasets))})"
