"""Image + instance-mask augmentation (SparseInst's recipe, scaled to the training size).

Source: hustvl/SparseInst `configs/Base-SparseInst.yaml`, `sparse_inst_r50_giam_aug.yaml` and
`sparseinst/dataset_mapper.py`: training short side chosen from {416, 448, ..., 640} with the
long side <= 853, horizontal flip; the optional "_aug" crop (p = 0.5: short side to one of
{400, 500, 600}, random crop of 384..600 px, instances whose mask became empty dropped) before
the resize; test short side 640, long <= 853. All sizes scale with imgsz / 640.

Conventions:
- in: image uint8 (H, W, 3) RGB, masks uint8 (M, H, W) in {0, 1}, a `np.random.Generator`;
- out: (image (h, w, 3), masks (m, h, w), keep bool (M,)) where `keep` says which input instances
  survived (labels are filtered with it);
- images are resized with cv2 INTER_LINEAR; masks with the SAME cv2 INTER_LINEAR call on 0/255
  values, then > 127 (bilinear then > 0.5): the mask follows the image's sampling grid exactly and
  its edges are smoother than nearest-neighbour ones;
- every random draw comes from the generator passed in, so an augmented sample depends only on
  its seed (not on the DataLoader worker that loads it).
"""
from __future__ import annotations

import cv2
import numpy as np

LONG_OVER_SHORT = 853 / 640  # SparseInst: short 640, long <= 853
CV2_MAX_CHANNELS = 128  # cv2.resize takes (H, W, C) arrays of at most 128 channels


def max_size_for(imgsz: int) -> int:
    """Long-side cap for a short side of imgsz: 853 at 640."""
    return round(imgsz * LONG_OVER_SHORT)


def train_sizes(imgsz: int) -> list[int]:
    """Short sides for multi-scale training: imgsz, imgsz - 32, ... down to 0.65 * imgsz
    (416/640), ascending: [416, 448, ..., 640] at 640, [224, 256, 288, 320] at 320."""
    lo = max(1, -(-416 * imgsz // 640))  # ceil(0.65 * imgsz)
    return list(range(imgsz, lo - 1, -32))[::-1]


def resized_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """(h, w) scaled so the short side is `short` and the long side at most `max_size`."""
    scale = min(short / min(h, w), max_size / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def resize_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(M, H, W) uint8 {0,1} -> (M, h, w): bilinear (cv2 INTER_LINEAR) on 0/255, then > 127."""
    h, w = size
    if len(masks) == 0:
        return np.zeros((0, h, w), np.uint8)
    out = []
    for i in range(0, len(masks), CV2_MAX_CHANNELS):
        chunk = np.ascontiguousarray(masks[i : i + CV2_MAX_CHANNELS].transpose(1, 2, 0)) * 255
        r = cv2.resize(chunk, (w, h), interpolation=cv2.INTER_LINEAR)
        out.append(r.reshape(h, w, -1).transpose(2, 0, 1))  # cv2 drops a single channel's axis
    return (np.concatenate(out) > 127).astype(np.uint8)


def resize(image: np.ndarray, masks: np.ndarray, size: tuple[int, int]
           ) -> tuple[np.ndarray, np.ndarray]:
    """Image (H, W, 3) and masks (M, H, W) to size (h, w)."""
    h, w = size
    if image.shape[:2] != (h, w):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        masks = resize_masks(masks, size)
    return image, masks


def random_crop(image: np.ndarray, masks: np.ndarray, crop_range: tuple[int, int],
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """detectron2's RandomCrop("absolute_range"): crop h, w uniform in [min(side, lo), min(side, hi)]."""
    h, w = image.shape[:2]
    ch = int(rng.integers(min(h, crop_range[0]), min(h, crop_range[1]) + 1))
    cw = int(rng.integers(min(w, crop_range[0]), min(w, crop_range[1]) + 1))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return image[y0 : y0 + ch, x0 : x0 + cw], masks[:, y0 : y0 + ch, x0 : x0 + cw]


def color_jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation each scaled by a factor drawn uniformly from
    [1 - strength, 1 + strength] (torchvision ColorJitter's definitions, applied in that order)."""
    brightness, contrast, saturation = rng.uniform(1 - strength, 1 + strength, 3)
    img = image.astype(np.float32) * brightness  # (H, W, 3)
    gray = img @ np.float32([0.299, 0.587, 0.114])  # (H, W)
    img = (img - gray.mean()) * contrast + gray.mean()
    gray = (img @ np.float32([0.299, 0.587, 0.114]))[..., None]
    img = (img - gray) * saturation + gray
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def nonempty(masks: np.ndarray) -> np.ndarray:
    """(M, H, W) -> bool (M,): which masks still have a pixel."""
    return masks.reshape(len(masks), -1).any(1) if masks.size else np.zeros(len(masks), bool)


class TrainTransform:
    """(image (H, W, 3) uint8, masks (M, H, W) uint8, rng) -> augmented (image, masks, keep).

    Order as SparseInst's mapper: [crop with p=0.5 when enabled] -> multi-scale resize (short side
    from `train_sizes(imgsz)`, long side <= `max_size`) -> horizontal flip with p=0.5, then
    colour jitter of `color` strength when > 0."""

    random = True  # draws from the generator: the dataset must give it a seeded one

    def __init__(self, imgsz: int, flip: bool = True, crop: bool = False,
                 sizes: list[int] | None = None, max_size: int | None = None,
                 color: float = 0.0) -> None:
        self.sizes = list(sizes) if sizes else train_sizes(imgsz)
        self.max_size = max_size or max_size_for(imgsz)
        self.flip, self.crop, self.color = flip, crop, color
        s = imgsz / 640
        self.crop_short = [round(v * s) for v in (400, 500, 600)]
        self.crop_range = (round(384 * s), round(600 * s))

    def __call__(self, image: np.ndarray, masks: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.crop and rng.random() < 0.5:
            short = int(rng.choice(self.crop_short))
            image, masks = resize(image, masks, resized_size(*image.shape[:2], short, 10**9))
            image, masks = random_crop(image, masks, self.crop_range, rng)
        short = int(rng.choice(self.sizes))
        image, masks = resize(image, masks, resized_size(*image.shape[:2], short, self.max_size))
        if self.flip and rng.random() < 0.5:
            image, masks = image[:, ::-1], masks[:, :, ::-1]
        if self.color > 0:
            image = color_jitter(image, self.color, rng)
        keep = nonempty(masks)  # crops and downscaling can empty small instances
        return np.ascontiguousarray(image), np.ascontiguousarray(masks[keep]), keep

    def __repr__(self) -> str:
        return (f"TrainTransform(sizes={self.sizes}, max_size={self.max_size}, flip={self.flip}, "
                f"crop={self.crop}: short {self.crop_short}, range {self.crop_range}, color={self.color})")


class EvalTransform:
    """Deterministic resize to the evaluation size (short side imgsz, long side capped).
    Keeps every instance (keep is all True, even if a mask vanished when shrunk)."""

    random = False

    def __init__(self, imgsz: int, max_size: int | None = None) -> None:
        self.imgsz, self.max_size = imgsz, max_size or max_size_for(imgsz)

    def __call__(self, image: np.ndarray, masks: np.ndarray, rng: np.random.Generator | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image, masks = resize(image, masks, resized_size(*image.shape[:2], self.imgsz, self.max_size))
        return image, masks, np.ones(len(masks), bool)

    def __repr__(self) -> str:
        return f"EvalTransform(imgsz={self.imgsz}, max_size={self.max_size})"
