"""COCO instance-segmentation datasets: polygons, uncompressed and compressed RLE.

- `iscrowd` annotations are not training targets (the evaluator still sees them in the json);
- images without annotations are kept;
- category ids of any values map to contiguous labels 0..C-1 in sorted-id order, and back
  through `cat_ids` when results are written;
- the json is validated up front (`validate.py`: types, ids, file names inside the image folder,
  RLE runs decoded): every problem is one DataError line naming the file and the entry;
- a json without images, or without one usable (non-crowd, non-degenerate) instance, is an error;
- degenerate annotations (empty or missing segmentation, polygons with < 3 points, an odd number
  of coordinates or zero area, zero-area RLE) are skipped with ONE counted warning line per file;
- images are checked when read: a truncated JPEG / PNG is unreadable (DataError, not decoded half
  grey); every item whose image fails to load is counted in `unreadable` (all DataLoader
  workers; `validate.unreadable_images(ds)` lists the files) with a warning naming the file;
- masks are decoded lazily, per item (pycocotools); a mask that rasterises to no pixel at all
  (a sub-pixel polygon) is dropped at load time.

Item `ds[i]` (or `ds[(i, seed)]`: the augmentation is drawn from np.random.default_rng(seed)):

    image  : torch.uint8 (3, H, W), RGB, after the transform (not normalised, not padded)
    target : {"labels": int64 (M,), "masks": uint8 (M, H, W) at the transformed size,
              "image_id": int (the json's id), "orig_size": (h0, w0), "size": (H, W)}

With an int key and a random transform, the seed is drawn from torch's global generator, which
DataLoader workers seed from the loader's generator, so runs are reproducible either way.
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
from .transforms import nonempty
from .validate import (UnreadableImages, check_annotation, check_categories, check_images,
                       check_layout, image_file_problem, polygon_area)

log = logging.getLogger("mobileinst.data")

Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator],
                     tuple[np.ndarray, np.ndarray, np.ndarray]]
# (dataset, image, labels, masks, rng) -> (image, labels, masks): a mix of two training images
Mix = Callable[[Any, np.ndarray, np.ndarray, np.ndarray, np.random.Generator],
               tuple[np.ndarray, np.ndarray, np.ndarray]]


def read_json(path: str | Path) -> Any:
    """Parse a json file; DataError naming the file if it is missing or broken."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such annotation file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: broken json at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None


def read_rgb(path: str | Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); DataError naming the file if it is missing, truncated (JPEG / PNG
    without its end marker) or not a readable image. cv2 applies the EXIF orientation and turns
    grey / 16-bit / RGBA files into 8-bit RGB."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file missing")
    try:
        problem = image_file_problem(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    if problem:
        raise DataError(f"{path}: {problem}")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{path}: not a readable image (corrupt or unsupported format)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


# -- segmentations ---------------------------------------------------------------------------------
def _valid_polygon(p: Any) -> bool:
    """A flat [x1, y1, x2, y2, ...] list of numbers with >= 3 points and a non-zero area."""
    if not isinstance(p, list) or len(p) < 6 or len(p) % 2:
        return False
    try:
        return polygon_area(p) > 0
    except (TypeError, ValueError):  # not numbers
        return False


def is_degenerate(seg: Any) -> bool:
    """An annotation that cannot describe any pixels: missing, empty, malformed, polygons with
    < 3 points or no area, RLE with no foreground run (checked on the RLE, without decoding)."""
    if isinstance(seg, list):
        return not any(_valid_polygon(p) for p in seg)
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
        return True
    counts = seg["counts"]
    if isinstance(counts, list):  # uncompressed: runs alternate background / foreground
        try:
            return sum(counts[1::2]) == 0
        except TypeError:  # not numbers
            return True
    if isinstance(counts, (str, bytes)):
        try:
            return int(mask_utils.area(seg)) == 0
        except Exception:  # noqa: BLE001 - pycocotools raises bare exceptions on garbage
            return True
    return True


def rle_size(seg: Any) -> tuple[int, int] | None:
    """(h, w) an RLE declares, None for polygons."""
    return tuple(int(v) for v in seg["size"]) if isinstance(seg, dict) else None


def decode_segmentation(seg: Any, h: int, w: int) -> np.ndarray:
    """Polygon list / uncompressed RLE / compressed RLE -> (h, w) uint8 {0, 1} mask."""
    if isinstance(seg, list):  # polygons (the valid parts), merged
        rle = mask_utils.merge(mask_utils.frPyObjects([p for p in seg if _valid_polygon(p)], h, w))
    elif isinstance(seg["counts"], list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, h, w)
    else:  # compressed RLE
        counts = seg["counts"]
        rle = {"size": seg["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(np.uint8)


# -- the dataset -------------------------------------------------------------------------------
class CocoInstances(Dataset):
    """A COCO instance-segmentation json + image folder (see the module docstring for the item).

    Attributes: `class_names` (C,), `cat_ids` (contiguous label -> original category id),
    `label_of` (original id -> label), `images` (the json's image entries), `num_skipped`
    (degenerate annotations), `unreadable` (items whose image failed to load, all workers)."""

    def __init__(self, json_path: str | Path, image_dir: str | Path,
                 transform: Transform | None = None, class_names: list[str] | None = None,
                 mix: Mix | None = None, masks: bool = True) -> None:
        self.json_path, self.image_dir = Path(json_path), Path(image_dir)
        self.transform, self.mix = transform, mix
        self.with_masks = masks  # False: items carry no instances (evaluation reads the json's)
        data = read_json(self.json_path)
        check_layout(self.json_path, data)
        check_categories(self.json_path, data["categories"])
        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_ids: list[int] = [c["id"] for c in cats]
        self.class_names: list[str] = (list(class_names) if class_names else
                                       [str(c.get("name", c["id"])) for c in cats])
        if len(self.class_names) != len(self.cat_ids):
            raise DataError(f"{self.json_path}: {len(self.cat_ids)} categories but "
                            f"{len(self.class_names)} names given")
        self.label_of = {cid: i for i, cid in enumerate(self.cat_ids)}
        self.images: list[dict] = data["images"]
        sizes = check_images(self.json_path, self.images, self.image_dir)
        if not self.images:
            raise DataError(f"{self.json_path}: no images: nothing to train or evaluate on")
        self.anns = self._index_annotations(data["annotations"], sizes)
        self.unreadable = UnreadableImages(len(self.images))

    def _index_annotations(self, anns: list, sizes: dict[int, tuple[int, int]]
                           ) -> dict[int, list[dict]]:
        """Check every annotation (one pass) and group the training targets by image id."""
        by_image: dict[int, list[dict]] = defaultdict(list)
        skipped, seen, crowd = [], set(), 0
        for i, a in enumerate(anns):
            kind = check_annotation(self.json_path, i, a, sizes, self.label_of, seen)
            if kind == "ok":
                by_image[a["image_id"]].append(a)
            elif kind == "degenerate":
                skipped.append(a.get("id"))
            else:  # crowd regions are not training targets
                crowd += 1
        self.num_skipped = len(skipped)
        if skipped:
            shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
            log.warning("%s: skipped %d degenerate annotation(s) (ids %s)", self.json_path.name,
                        len(skipped), shown)
        if not by_image:
            raise DataError(f"{self.json_path}: no usable instance in {len(self.images)} image(s) "
                            f"({len(anns)} annotation(s): {crowd} crowd, {len(skipped)} degenerate): "
                            f"nothing to train or evaluate on")
        return by_image

    # -- items -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.images)

    def num_instances(self, index: int) -> int:
        """Training instances of image `index`, without loading it."""
        return len(self.anns.get(self.images[index]["id"], []))

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Untransformed image (H, W, 3) RGB uint8, labels int64 (M,), masks uint8 (M, H, W);
        masks that rasterise to nothing are dropped."""
        return self.load_with_ids(index)[:3]

    def load_with_ids(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`load` plus each instance's annotation id, int64 (M,)."""
        info = self.images[index]
        h, w = int(info["height"]), int(info["width"])
        image = self._read_image(index, h, w)
        anns = self.anns.get(info["id"], []) if self.with_masks else []
        masks = (np.stack([decode_segmentation(a["segmentation"], h, w) for a in anns]) if anns
                 else np.zeros((0, h, w), np.uint8))
        labels = np.array([self.label_of[a["category_id"]] for a in anns], np.int64)
        ids = np.array([a.get("id", -1) for a in anns], np.int64)
        keep = nonempty(masks)
        return image, labels[keep], masks[keep], ids[keep]

    def item_path(self, index: int) -> Path:
        """The image file of item `index`."""
        return self.image_dir / self.images[index]["file_name"]

    def _read_image(self, index: int, h: int, w: int) -> np.ndarray:
        """The RGB image of item `index`, which must be h x w; a failure is counted in
        `unreadable` (and re-raised: the caller decides whether to skip it)."""
        path = self.item_path(index)
        try:
            image = read_rgb(path)
            if image.shape[:2] != (h, w):
                raise DataError(f"{path}: image is {image.shape[1]}x{image.shape[0]} (w x h) but "
                                f"{self.json_path.name} says {w}x{h}")
        except DataError as e:
            self.unreadable.mark(index, e)
            raise
        return image

    def _rng(self, seed: int | None) -> np.random.Generator:
        if seed is None and getattr(self.transform, "random", True):
            seed = int(torch.randint(0, 2**62, ()))  # reproducible under torch.manual_seed / workers
        return np.random.default_rng(seed)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, labels, masks = self.load(index)
        orig = image.shape[:2]
        rng = self._rng(seed) if self.transform is not None or self.mix is not None else None
        if self.mix is not None:  # e.g. copy-paste (data/copy_paste.py), before the transform
            image, labels, masks = self.mix(self, image, labels, masks, rng)
        if self.transform is not None:
            image, masks, keep = self.transform(image, masks, rng)
            labels = labels[keep]
        target = {"labels": torch.from_numpy(labels), "masks": torch.from_numpy(masks),
                  "image_id": self.images[index]["id"], "orig_size": tuple(orig),
                  "size": tuple(image.shape[:2])}
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), target

    def __repr__(self) -> str:
        return (f"CocoInstances({self.json_path}, {len(self)} images, "
                f"{sum(map(len, self.anns.values()))} instances, {len(self.cat_ids)} classes, "
                f"transform={self.transform!r})")

