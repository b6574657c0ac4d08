"""Image + instance-mask augmentation (SparseInst's recipe, scaled to the training size).

Source: /shared/spec/training.md §4: training short side chosen from {416, 448, ..., 640} with the
long side <= 853, horizontal flip; the optional "_aug" crop (p = 0.5: short side to one of
{400, 500, 600}, random crop of 384..600 px) before the resize; test short side 640, long <= 853.
All sizes scale with imgsz / 640. Every random draw comes from the generator passed in, so an
augmented sample depends only on its seed.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

LONG_OVER_SHORT = 853 / 640  # SparseInst: short 640, long <= 853


def max_size_for(imgsz: int) -> int:
    return round(imgsz * LONG_OVER_SHORT)


def train_sizes(imgsz: int) -> list[int]:
    """Short sides for multi-scale training: 416..640 step 32 at imgsz 640, scaled otherwise."""
    lo = max(32, int(round(imgsz * 416 / 640 / 32)) * 32)
    return list(range(lo, imgsz + 1, 32)) or [imgsz]


def resized_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """(h, w) scaled so the short side is `short` and the long side at most `max_size`."""
    scale = min(short / min(h, w), max_size / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def resize(image: np.ndarray, masks: np.ndarray, size: tuple[int, int]
           ) -> tuple[np.ndarray, np.ndarray]:
    """Image bilinear; masks (M, H, W) bilinear then > 0.5 (smoother edges than nearest)."""
    h, w = size
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    if len(masks):
        m = F.interpolate(torch.from_numpy(masks).float()[None], size=(h, w), mode="bilinear",
                          align_corners=False)[0]
        masks = (m > 0.5).numpy().astype(np.uint8)
    else:
        masks = np.zeros((0, h, w), np.uint8)
    return image, masks


def random_crop(image: np.ndarray, masks: np.ndarray, crop_range: tuple[int, int],
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """detectron2's RandomCrop("absolute_range"): crop h, w uniform in the range, clipped."""
    h, w = image.shape[:2]
    ch = min(h, int(rng.integers(crop_range[0], crop_range[1] + 1)))
    cw = min(w, int(rng.integers(crop_range[0], crop_range[1] + 1)))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return image[y0 : y0 + ch, x0 : x0 + cw], masks[:, y0 : y0 + ch, x0 : x0 + cw]


class TrainTransform:
    """(image (H, W, 3) uint8, masks (M, H, W) uint8, rng) -> augmented (image, masks, keep)."""

    def __init__(self, imgsz: int, flip: bool = True, crop: bool = False) -> None:
        self.sizes, self.max_size = train_sizes(imgsz), max_size_for(imgsz)
        self.flip, self.crop = flip, crop
        s = imgsz / 640
        self.crop_short = [round(v * s) for v in (400, 500, 600)]
        self.crop_range = (round(384 * s), round(600 * s))

    def __call__(self, image: np.ndarray, masks: np.ndarray, rng: np.random.Generator):
        if self.crop and rng.random() < 0.5:
            short = int(rng.choice(self.crop_short))
            image, masks = resize(image, masks, resized_size(*image.shape[:2], short, 10**9))
            image, masks = random_crop(image, masks, self.crop_range, rng)
        short = int(rng.choice(self.sizes))
        image, masks = resize(image, masks, resized_size(*image.shape[:2], short, self.max_size))
        if self.flip and rng.random() < 0.5:
            image, masks = image[:, ::-1], masks[:, :, ::-1]
        keep = masks.reshape(len(masks), -1).any(1) if len(masks) else np.zeros(0, bool)
        return np.ascontiguousarray(image), np.ascontiguousarray(masks[keep]), keep


class EvalTransform:
    """Deterministic resize to the evaluation size (short side imgsz, long side capped)."""

    def __init__(self, imgsz: int) -> None:
        self.imgsz, self.max_size = imgsz, max_size_for(imgsz)

    def __call__(self, image: np.ndarray, masks: np.ndarray, rng=None):
        image, masks = resize(image, masks, resized_size(*image.shape[:2], self.imgsz, self.max_size))
        return image, masks, np.ones(len(masks), bool)
