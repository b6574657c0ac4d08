"""COCO instance-segmentation datasets: polygons, uncompressed and compressed RLE.

- `iscrowd` annotations are not training targets (the evaluator still sees them in the json);
- images without annotations are kept;
- category ids of any values map to contiguous labels 0..C-1 in sorted-id order, and back
  through `cat_ids` when results are written;
- the json is validated up front: every problem names the file and what is wrong.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from ..errors import DataError

log = logging.getLogger("mobileinst.data")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such annotation file")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: broken json at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None


def read_rgb(path: str | Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); DataError naming the file if it is missing or not a readable image."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file missing")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{path}: not a readable image (corrupt or unsupported format)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def is_degenerate(seg: Any) -> bool:
    """An annotation that cannot describe any pixels: empty, or polygons with < 3 points."""
    if isinstance(seg, list):
        return not any(isinstance(p, list) and len(p) >= 6 for p in seg)
    if isinstance(seg, dict):
        return "counts" not in seg or "size" not in seg
    return True


def decode_segmentation(seg: Any, h: int, w: int) -> np.ndarray:
    """Polygon list / uncompressed RLE / compressed RLE -> (h, w) uint8 mask."""
    if isinstance(seg, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects([p for p in seg if len(p) >= 6], h, w))
    elif isinstance(seg["counts"], list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, h, w)
    else:  # compressed RLE
        rle = dict(seg, counts=seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"])
    return mask_utils.decode(rle).astype(np.uint8)


class CocoInstances(Dataset):
    """A COCO json + image folder. Item (key = index, or (index, seed) to draw augmentation from):
    (image uint8 tensor (3, H, W), target) with target = labels int64 (M,), masks uint8 (M, H, W)
    at the transformed size, image_id (the json's id), orig_size (h0, w0), size (h, w)."""

    def __init__(self, json_path: str | Path, image_dir: str | Path,
                 transform: Callable | None = None, class_names: list[str] | None = None) -> None:
        self.json_path, self.image_dir = Path(json_path), Path(image_dir)
        self.transform = transform
        data = read_json(self.json_path)
        self._check_layout(data)
        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_ids = [c["id"] for c in cats]
        self.class_names = list(class_names) if class_names else [str(c.get("name", c["id"])) for c in cats]
        if len(self.class_names) != len(self.cat_ids):
            raise DataError(f"{self.json_path}: {len(self.cat_ids)} categories but "
                            f"{len(self.class_names)} names given")
        self.label_of = {cid: i for i, cid in enumerate(self.cat_ids)}
        self.images = data["images"]
        self.anns = self._index_annotations(data["annotations"])

    # -- validation ------------------------------------------------------------------------------
    def _check_layout(self, data: Any) -> None:
        f = self.json_path
        if not isinstance(data, dict):
            raise DataError(f"{f}: a COCO json must be an object with images/annotations/categories")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise DataError(f"{f}: missing or malformed '{key}' list")
        if not data["categories"]:
            raise DataError(f"{f}: no categories")
        ids = [im.get("id") for im in data["images"]]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise DataError(f"{f}: duplicate image id {dup}")
        for im in data["images"]:
            if not {"id", "file_name", "height", "width"} <= im.keys():
                raise DataError(f"{f}: image entry {im.get('id')} lacks id/file_name/height/width")

    def _index_annotations(self, anns: list[dict]) -> dict[int, list[dict]]:
        image_ids = {im["id"] for im in self.images}
        by_image: dict[int, list[dict]] = defaultdict(list)
        skipped = []
        for a in anns:
            if a.get("image_id") not in image_ids:
                raise DataError(f"{self.json_path}: annotation {a.get('id')} refers to unknown "
                                f"image id {a.get('image_id')}")
            if a.get("category_id") not in self.label_of:
                raise DataError(f"{self.json_path}: annotation {a.get('id')} has unknown "
                                f"category id {a.get('category_id')}")
            if a.get("iscrowd", 0):
                continue  # crowd regions are not training targets
            if is_degenerate(a.get("segmentation")):
                skipped.append(a.get("id"))
                continue
            by_image[a["image_id"]].append(a)
        if skipped:
            log.warning("%s: skipped %d degenerate annotation(s) (ids %s%s)", self.json_path.name,
                        len(skipped), ", ".join(map(str, skipped[:10])), ", ..." if len(skipped) > 10 else "")
        self.num_skipped = len(skipped)
        return by_image

    # -- items -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Original image (H, W, 3) RGB uint8, labels (M,), masks (M, H, W) uint8 (empty ones dropped)."""
        info = self.images[index]
        path = self.image_dir / info["file_name"]
        image = read_rgb(path)
        h, w = info["height"], info["width"]
        if image.shape[:2] != (h, w):
            raise DataError(f"{path}: image is {image.shape[1]}x{image.shape[0]} but "
                            f"{self.json_path.name} says {w}x{h}")
        anns = self.anns.get(info["id"], [])
        masks = np.stack([decode_segmentation(a["segmentation"], h, w) for a in anns]) if anns \
            else np.zeros((0, h, w), np.uint8)
        labels = np.array([self.label_of[a["category_id"]] for a in anns], np.int64)
        nonempty = masks.reshape(len(masks), -1).any(1) if len(masks) else np.zeros(0, bool)
        return image, labels[nonempty], masks[nonempty]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, labels, masks = self.load(index)
        orig = image.shape[:2]
        if self.transform is not None:
            rng = np.random.default_rng(seed)
            image, masks, keep = self.transform(image, masks, rng)
            labels = labels[keep]
        target = {"labels": torch.from_numpy(labels), "masks": torch.from_numpy(masks),
                  "image_id": self.images[index]["id"], "orig_size": tuple(orig),
                  "size": tuple(image.shape[:2])}
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), target
