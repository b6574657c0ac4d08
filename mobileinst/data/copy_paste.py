"""Simple Copy-Paste (Ghiasi et al., CVPR 2021): instances of another training image pasted on top.

With probability `p` a training sample B is drawn (from the same seeded generator as the rest of
the augmentation), scaled by a factor in `scale_range` relative to A's size, flipped with
p = 0.5, placed at a random offset, and a random subset of its instances (each kept with
p = 0.5, at least one) is pasted over A before A's own transform:

    paste  = union of the chosen masks of B                         (H, W) bool
    image  = where(paste, B, A)
    A mask = A mask & ~paste        (instances fully covered are dropped)

Labels and masks of the pasted instances follow A's. The mix works on untransformed images, so
the usual multi-scale resize and flip then apply to the composite.
"""
from __future__ import annotations

from typing import Protocol

import cv2
import numpy as np

from .transforms import nonempty, resize_masks


class InstanceSource(Protocol):
    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


class CopyPaste:
    """A `mix` for CocoInstances: (dataset, image, labels, masks, rng) -> (image, labels, masks)."""

    def __init__(self, p: float, scale_range: tuple[float, float] = (0.5, 1.5)) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"copy_paste probability must be in [0, 1], got {p}")
        self.p, self.scale_range = p, scale_range

    def __call__(self, source: InstanceSource, image: np.ndarray, labels: np.ndarray,
                 masks: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.p == 0.0 or rng.random() >= self.p or len(source) < 2:
            return image, labels, masks
        other = int(rng.integers(0, len(source)))
        try:
            b_image, b_labels, b_masks = source.load(other)
        except Exception:  # an unreadable partner: A stays as it is (A itself was readable)
            return image, labels, masks
        if len(b_labels) == 0:
            return image, labels, masks
        chosen = rng.random(len(b_labels)) < 0.5
        chosen[int(rng.integers(0, len(b_labels)))] = True
        b_image, b_masks = self._place(b_image, b_masks[chosen], image.shape[:2], rng)
        keep = nonempty(b_masks)
        if not keep.any():
            return image, labels, masks
        b_masks, b_labels = b_masks[keep], b_labels[chosen][keep]
        paste = b_masks.any(0)  # (H, W)
        image = np.where(paste[..., None], b_image, image)
        masks = masks & ~paste[None].astype(np.uint8) if len(masks) else masks
        visible = nonempty(masks)
        return (image, np.concatenate([labels[visible], b_labels]),
                np.concatenate([masks[visible], b_masks]))

    def _place(self, image: np.ndarray, masks: np.ndarray, size: tuple[int, int],
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """B's image (h, w, 3) and masks (m, h, w) scaled, flipped and shifted onto an (H, W) canvas."""
        H, W = size
        h, w = image.shape[:2]
        s = min(H / h, W / w) * float(rng.uniform(*self.scale_range))
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
        masks = resize_masks(masks, (nh, nw))
        if rng.random() < 0.5:
            image, masks = image[:, ::-1], masks[:, :, ::-1]
        # top-left of B on A's canvas; B may hang over any edge (only the overlap is pasted)
        y0 = int(rng.integers(min(0, H - nh), max(0, H - nh) + 1))
        x0 = int(rng.integers(min(0, W - nw), max(0, W - nw) + 1))
        canvas = np.zeros((H, W, 3), np.uint8)
        canvas_masks = np.zeros((len(masks), H, W), np.uint8)
        ys, xs = slice(max(0, y0), min(H, y0 + nh)), slice(max(0, x0), min(W, x0 + nw))
        sy, sx = slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0)
        canvas[ys, xs] = image[sy, sx]
        canvas_masks[:, ys, xs] = masks[:, sy, sx]
        return canvas, canvas_masks
