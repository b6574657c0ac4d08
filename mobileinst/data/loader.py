"""Batching: pad images to a common size that is a multiple of 32."""
from __future__ import annotations

import torch

from ..models.mobileinst import PIXEL_MEAN


def collate(batch: list[tuple[torch.Tensor, dict]], size_divisor: int = 32
            ) -> tuple[torch.Tensor, list[dict]]:
    """[(uint8 (3, H, W), target)] -> float images (B, 3, Hp, Wp) 0..255 and the targets.

    Padding (bottom/right) is the mean pixel, which normalises to 0 inside the model, as
    SparseInst pads after normalisation. Target masks keep the unpadded size."""
    images, targets = zip(*batch)
    hp = -(-max(im.shape[1] for im in images) // size_divisor) * size_divisor
    wp = -(-max(im.shape[2] for im in images) // size_divisor) * size_divisor
    out = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1).repeat(len(images), 1, hp, wp)
    for i, im in enumerate(images):
        out[i, :, : im.shape[1], : im.shape[2]] = im.float()
    return out, list(targets)
