"""What prediction returns: the instances of one image, and their COCO records."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from ..data.rle import encode_mask
from ..models.model_info import ModelInfo

# Bytes of uint8 intermediates `resize_masks` may hold at once at the original size, and of
# full-size masks `MaskChunks` holds at once.
MASK_CHUNK_BYTES = 64 << 20


class MaskChunks:
    """K full-size bool masks (H, W) made a few at a time as they are iterated: `make(start, end)`
    -> masks[start:end] as (end - start, H, W) bool, called with at most ~chunk_bytes of masks
    (at least one). What `val` decodes into: its 100 masks of a 6000 x 6000 photo are 3.6 GB
    at once, ~36 MB this way; each mask is only encoded to RLE and dropped (`result_records`)."""

    def __init__(self, count: int, size: tuple[int, int],
                 make: Callable[[int, int], np.ndarray], chunk_bytes: int | None = None) -> None:
        self.count, self.size, self.make = count, (int(size[0]), int(size[1])), make
        chunk_bytes = MASK_CHUNK_BYTES if chunk_bytes is None else chunk_bytes  # read when made
        self.step = max(1, chunk_bytes // max(1, self.size[0] * self.size[1]))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.count, *self.size)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[np.ndarray]:
        for start in range(0, self.count, self.step):
            yield from self.make(start, min(start + self.step, self.count))


@dataclass
class Result:
    """Instances of one image: labels (K,), scores (K,), masks (K, H, W) bool, sorted by score
    (masks a `MaskChunks` when asked for lazily: iterate it, one mask at a time)."""
    labels: np.ndarray
    scores: np.ndarray
    masks: np.ndarray | MaskChunks
    names: list[str] = field(default_factory=list)  # class name per instance
    path: str = ""

    def __len__(self) -> int:
        return len(self.scores)


def result_records(result: Result, image_id: int, file_name: str, cat_ids: list[int]) -> list[dict]:
    """COCO-style records of one image (original category ids, RLE masks, boxes from the masks)."""
    records: list[dict] = []
    for _ in recorded_masks(result, image_id, file_name, cat_ids, records):
        pass
    return records


def recorded_masks(result: Result, image_id: int, file_name: str, cat_ids: list[int],
                   records: list[dict]) -> Iterator[np.ndarray]:
    """`result`'s masks (H, W) in order, each appended to `records` as its `result_records`
    record before it is yielded: one pass over the masks for both the records and an overlay
    (`predict`), so a lazy Result's (`MaskChunks`) masks are made once and never all held."""
    for label, name, score, mask in zip(result.labels, result.names, result.scores, result.masks):
        rle = encode_mask(mask)
        records.append({"image_id": image_id, "file_name": file_name,
                        "category_id": int(cat_ids[int(label)]), "category_name": name,
                        "score": round(float(score), 5), "segmentation": rle,
                        "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)],
                        "area": int(mask.sum())})
        yield mask


def postprocessed_result(out: dict[str, np.ndarray], i: int, size: tuple[int, int],
                         orig: tuple[int, int], conf: float, info: ModelInfo,
                         lazy_masks: bool = False) -> Result:
    """Image i of a post-processed graph's outputs (labels, scores, masks at the input size) ->
    its Result: the slots scoring above conf, masks cropped and resized to the original size.

    K (the slots) is whatever the graph returned: max_det (graphs exported before `conf`
    existed), or data-dependent (export `--conf`: the instances scoring above it, 0 when none;
    in a batch the most any image keeps, the other images' extra slots score 0, empty masks);
    a conf below the graph's export conf cannot show more (`Predictor` warns once).
    lazy_masks: masks as a `MaskChunks`, resized a few at a time when iterated."""
    keep = out["scores"][i] > conf
    labels, scores, small = out["labels"][i][keep], out["scores"][i][keep], out["masks"][i][keep]
    if lazy_masks:
        masks = MaskChunks(len(small), orig, lambda s, e: resize_masks(small[s:e], size, orig))
    else:
        masks = resize_masks(small, size, orig)
    return Result(labels, scores, masks, info.names(labels))


def resize_masks(masks: np.ndarray, size: tuple[int, int], orig: tuple[int, int],
                 chunk_bytes: int = MASK_CHUNK_BYTES) -> np.ndarray:
    """(K, Hp, Wp) 0/1 masks at the padded input -> (K, H0, W0) bool: crop the image's (h, w),
    resize bilinearly to the original size (i.e. threshold the interpolation at 0.5).

    A few instances at a time (~chunk_bytes of uint8 intermediates at the original size, at
    least one instance); each channel is resized on its own, so chunking changes nothing.
    K may be 0 (a `conf` graph that kept nothing): (0, H0, W0)."""
    h, w = size
    masks = masks[:, :h, :w]  # (K, h, w)
    if (h, w) == tuple(orig):
        return masks.astype(bool)
    out = np.empty((len(masks), *orig), bool)  # (K, H0, W0)
    step = int(min(512, max(1, chunk_bytes // (2 * orig[0] * orig[1]))))  # cv2: <= 512 channels
    for s in range(0, len(masks), step):
        chunk = np.ascontiguousarray(masks[s:s + step].transpose(1, 2, 0)).astype(np.uint8)  # (h,w,k)
        r = cv2.resize(chunk, (orig[1], orig[0]), interpolation=cv2.INTER_LINEAR)  # (H0, W0[, k])
        out[s:s + step] = r.reshape(orig[0], orig[1], -1).transpose(2, 0, 1) > 0
    return out
