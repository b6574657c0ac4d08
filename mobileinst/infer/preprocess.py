"""Images -> the network's input batch, the same for every backend (and for video frames).

- any-size input (a PyTorch model, a dynamic export): resize so the short side is `imgsz` (long
  side capped at `max_size`), pad bottom/right to a multiple of 32 with the mean pixel;
- a fixed-size export: letterbox into its (H, W): resize to fit, pad bottom/right with the mean.

Batches are float 0..255 (B, 3, H, W); `to_input` casts them to what a graph takes (uint8 graphs
get whole pixel values, the pad the rounded mean).
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch

from ..errors import MobileInstError
from ..utils import check_memory
from ..models.mobileinst import PIXEL_MEAN
from ..models.model_info import InputSpec


def inference_size(h: int, w: int, imgsz: int, max_size: int) -> tuple[int, int]:
    """(h, w) scaled so the short side is imgsz and the long side at most max_size."""
    scale = min(imgsz / min(h, w), max_size / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def prediction_sizes(spec, imgsz: int | None, max_size: int | None, trained: int) -> tuple[int, int]:
    """(short side, long-side cap) that prediction resizes to: a fixed-size input's own short
    side, else imgsz (default the training size); the cap defaults to short * 853 / 640
    (SparseInst's test size 640 / 853). spec: the network's InputSpec."""
    short = min(spec.size) if spec.size else int(imgsz or trained)
    long = max_size or round(short * 853 / 640)
    check_memory("--imgsz", short, max(spec.size) if spec.size else long)  # before any image
    return short, long


def preprocess(images: list[np.ndarray], imgsz: int, max_size: int, divisor: int = 32
               ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """RGB uint8 images -> a padded batch (B, 3, Hp, Wp) float 0..255 and each resized size."""
    resized = []
    for img in images:
        h, w = inference_size(*img.shape[:2], imgsz, max_size)
        resized.append(cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR))
    hp = -(-max(r.shape[0] for r in resized) // divisor) * divisor
    wp = -(-max(r.shape[1] for r in resized) // divisor) * divisor
    batch = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1).repeat(len(images), 1, hp, wp)
    for i, r in enumerate(resized):
        batch[i, :, : r.shape[0], : r.shape[1]] = torch.from_numpy(r).permute(2, 0, 1).float()
    return batch, [r.shape[:2] for r in resized]


def letterbox(images: list[np.ndarray], size: tuple[int, int]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """RGB uint8 images -> (B, 3, H, W) float 0..255 at exactly `size`, each image resized to fit
    (aspect kept) and padded bottom/right with the mean pixel; and each resized (h, w)."""
    hp, wp = size
    batch = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1).repeat(len(images), 1, hp, wp)
    sizes = []
    for i, img in enumerate(images):
        scale = min(hp / img.shape[0], wp / img.shape[1])
        h = min(hp, max(1, round(img.shape[0] * scale)))
        w = min(wp, max(1, round(img.shape[1] * scale)))
        r = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
        batch[i, :, :h, :w] = torch.from_numpy(r).permute(2, 0, 1).float()
        sizes.append((h, w))
    return batch, sizes


def prepare(images: list[np.ndarray], spec: InputSpec, imgsz: int, max_size: int
            ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """RGB uint8 images -> (float batch for `spec`, each image's resized size inside it)."""
    if spec.size:
        return letterbox(images, tuple(spec.size))
    return preprocess(images, imgsz, max_size, spec.divisor)


def input_arrays(images: list[np.ndarray], spec: InputSpec, imgsz: int) -> list[np.ndarray]:
    """RGB uint8 images -> the arrays a network with input `spec` is fed, one (fixed-size) batch
    each (the last filled with its last image): exactly what prediction feeds it, which is what
    int8 calibration must see. imgsz: the short side of an any-size network."""
    step = spec.batch or 1
    arrays = []
    for s in range(0, len(images), step):
        chunk = images[s:s + step]
        chunk = chunk + [chunk[-1]] * (step - len(chunk))
        batch, _ = prepare(chunk, spec, imgsz, round(imgsz * 853 / 640))
        arrays.append(to_input(batch, spec.dtype))
    return arrays


def to_input(batch: torch.Tensor, dtype: str | np.dtype) -> np.ndarray:
    """A float 0..255 batch -> the array a graph of input `dtype` takes."""
    if np.dtype(dtype) == np.uint8:  # pixels are whole numbers; the pad is the rounded mean
        return batch.round().clamp(0, 255).to(torch.uint8).numpy()
    return batch.numpy().astype(dtype)


def check_image(img: Any) -> None:
    """MobileInstError unless `img` is an RGB uint8 (H, W, 3) array."""
    if not isinstance(img, np.ndarray):
        raise MobileInstError(f"expected an RGB uint8 image (numpy array H x W x 3), got {type(img).__name__}")
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise MobileInstError(f"expected an RGB uint8 image (H, W, 3), got {img.dtype} {tuple(img.shape)}")
