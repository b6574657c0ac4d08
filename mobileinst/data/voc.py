"""Pascal VOC / SBD instance masks -> a COCO instance-segmentation json.

VOC layout (VOC2012, or SBD converted to PNGs the same way):

    VOC_ROOT/JPEGImages/<name>.jpg
    VOC_ROOT/SegmentationObject/<name>.png   palette PNG: instance index per pixel, 0 = background,
                                             255 = void (object boundaries, "difficult" regions)
    VOC_ROOT/SegmentationClass/<name>.png    palette PNG: class index per pixel (1..20), 255 = void
    VOC_ROOT/ImageSets/Segmentation/{train,val,trainval}.txt   (optional) image name lists

Also the original SBD layout (`img/`, `inst/*.mat` with GTinst.Segmentation / Categories,
`train.txt`, `val.txt`), read with scipy.io.

Palette PNGs are read as INDICES: with PIL (installed with matplotlib) a mode "P"/"L" image gives
its indices directly; an RGB-coloured mask (what cv2.imread makes of a palette PNG, or a re-saved
file) is mapped back to indices through the VOC colour map. Void pixels are left out of every
mask. An instance's class is the majority class of its pixels in SegmentationClass.

Output: categories ids 1..20 with the VOC names, image ids 1..N in name order, one annotation per
instance with a compressed RLE, area, bbox (from the mask) and iscrowd 0. Images with no instance
are kept (no annotations).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from ..errors import DataError

log = logging.getLogger("mobileinst.data")

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep",
               "sofa", "train", "tvmonitor"]
VOID = 255
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


def voc_colormap(n: int = 256) -> np.ndarray:
    """The VOC palette: (n, 3) uint8 RGB, colour of index i (bit-interleaving construction)."""
    cmap = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = r, g, b
    return cmap


def _rgb_code(c: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> (...) int64 0xRRGGBB."""
    c = c.astype(np.int64)
    return (c[..., 0] << 16) | (c[..., 1] << 8) | c[..., 2]


def colours_to_indices(rgb: np.ndarray, path: Path) -> np.ndarray:
    """(H, W, 3) RGB colours of the VOC palette -> (H, W) uint8 indices."""
    table = {int(k): i for i, k in enumerate(_rgb_code(voc_colormap()))}
    keys, inverse = np.unique(_rgb_code(rgb), return_inverse=True)
    unknown = [k for k in keys.tolist() if k not in table]
    if unknown:
        k = unknown[0]
        raise DataError(f"{path}: colour {(k >> 16, (k >> 8) & 255, k & 255)} is not in the VOC "
                        f"palette (expected a palette or single-channel index PNG)")
    return np.array([table[k] for k in keys.tolist()], np.uint8)[inverse].reshape(rgb.shape[:2])


def read_index_png(path: Path) -> np.ndarray:
    """A VOC label PNG -> (H, W) uint8 indices (palette indices, not colours)."""
    if not path.is_file():
        raise DataError(f"{path}: file missing")
    try:
        from PIL import Image
    except ImportError:  # no PIL: cv2 gives palette PNGs as BGR colours; map them back
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise DataError(f"{path}: not a readable PNG") from None
        return img.astype(np.uint8) if img.ndim == 2 else colours_to_indices(img[..., 2::-1], path)
    try:
        with Image.open(path) as im:
            if im.mode in ("P", "L"):
                return np.array(im, np.uint8)
            if im.mode in ("I", "I;16"):
                return np.array(im).astype(np.uint8)
            return colours_to_indices(np.array(im.convert("RGB")), path)
    except OSError as e:
        raise DataError(f"{path}: not a readable PNG ({e})") from None


def image_size(path: Path) -> tuple[int, int]:
    """(h, w) of an image file without decoding the pixels when PIL is there."""
    try:
        from PIL import Image
        with Image.open(path) as im:
            return im.height, im.width
    except ImportError:
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    except OSError as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
    if img is None:
        raise DataError(f"{path}: not a readable image")
    return img.shape[:2]


def instances_from_maps(objects: np.ndarray, classes: np.ndarray, where: str = ""
                        ) -> Iterator[tuple[int, int, np.ndarray]]:
    """(instance index, VOC class 1..20, bool mask (H, W)) per instance of an index map pair;
    void pixels are not part of any mask; an instance with no class pixel is skipped."""
    for k in np.unique(objects).tolist():
        if k in (0, VOID):
            continue
        mask = objects == k
        cls = classes[mask]
        cls = cls[(cls > 0) & (cls <= len(VOC_CLASSES))]
        if cls.size == 0:
            log.warning("%s: instance %d has no class pixels; skipped", where, k)
            continue
        yield k, int(np.bincount(cls).argmax()), mask


def coco_annotation(ann_id: int, image_id: int, cls: int, mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"id": ann_id, "image_id": image_id, "category_id": cls,
            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()},
            "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": 0}


# -- layouts -----------------------------------------------------------------------------------
def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: image list missing")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _names(root: Path, split: str | Path | None, label_dir: Path, lists: Path, ext: str) -> list[str]:
    """Image names: every label file, or those of a split name / list file."""
    if split is None:
        return sorted(p.stem for p in label_dir.glob(f"*{ext}"))
    if Path(split).is_file():
        return _read_list(Path(split))
    if str(split) in ("train", "val", "trainval", "test"):
        return _read_list(lists / f"{split}.txt")
    raise DataError(f"split {split!r}: expected train, val, trainval or a list file")


def _find_image(image_dir: Path, name: str, label: Path) -> Path:
    for ext in IMAGE_EXTS:
        if (image_dir / f"{name}{ext}").is_file():
            return image_dir / f"{name}{ext}"
    raise DataError(f"{label}: no image {name}.jpg for this mask in {image_dir}")


def _voc_maps(root: Path, name: str) -> tuple[Path, np.ndarray, np.ndarray]:
    obj_path = root / "SegmentationObject" / f"{name}.png"
    cls_path = root / "SegmentationClass" / f"{name}.png"
    objects, classes = read_index_png(obj_path), read_index_png(cls_path)
    if objects.shape != classes.shape:
        raise DataError(f"{obj_path}: size {objects.shape[::-1]} differs from {cls_path} "
                        f"{classes.shape[::-1]}")
    return obj_path, objects, classes


def _sbd_maps(root: Path, name: str) -> tuple[Path, np.ndarray, np.ndarray]:
    """SBD inst/<name>.mat: instance map + per-instance categories -> (objects, classes) maps."""
    from scipy.io import loadmat
    path = root / "inst" / f"{name}.mat"
    if not path.is_file():
        raise DataError(f"{path}: file missing")
    try:
        gt = loadmat(str(path))["GTinst"][0, 0]
        objects = np.asarray(gt["Segmentation"], np.uint8)
        cats = np.asarray(gt["Categories"]).reshape(-1).astype(np.uint8)
    except (KeyError, IndexError, ValueError, OSError) as e:
        raise DataError(f"{path}: not an SBD instance file ({e})") from None
    lut = np.zeros(256, np.uint8)
    lut[1 : len(cats) + 1] = cats
    lut[VOID] = VOID
    return path, objects, lut[objects]


def voc_to_coco(voc_root: str | Path, out_json: str | Path, split: str | Path | None = None,
                image_dir: str | Path | None = None) -> Path:
    """Convert VOC (or SBD) instance masks under `voc_root` to a COCO json at `out_json`.

    split: None = every mask file; "train" / "val" / "trainval" = ImageSets/Segmentation/<split>.txt
    (SBD: <split>.txt at the root); or a path to a list file. image_dir: where the images are
    (default JPEGImages/, SBD img/); the json's file_names are relative to it. Returns out_json."""
    root = Path(voc_root)
    if not root.is_dir():
        raise DataError(f"{root}: VOC root folder missing")
    sbd = (root / "inst").is_dir() and not (root / "SegmentationObject").is_dir()
    if sbd:
        label_dir, lists, maps = root / "inst", root, _sbd_maps
        image_dir = Path(image_dir) if image_dir else root / "img"
        names = _names(root, split, label_dir, lists, ".mat")
    else:
        for sub in ("SegmentationObject", "SegmentationClass"):
            if not (root / sub).is_dir():
                raise DataError(f"{root}: no {sub}/ folder (expected a VOC layout: JPEGImages/, "
                                f"SegmentationObject/, SegmentationClass/)")
        label_dir, lists, maps = root / "SegmentationObject", root / "ImageSets" / "Segmentation", _voc_maps
        image_dir = Path(image_dir) if image_dir else root / "JPEGImages"
        names = _names(root, split, label_dir, lists, ".png")
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder missing")
    if not names:
        raise DataError(f"{label_dir}: no instance masks found")

    images, anns = [], []
    for image_id, name in enumerate(names, 1):
        label_path, objects, classes = maps(root, name)
        img_path = _find_image(image_dir, name, label_path)
        if image_size(img_path) != objects.shape:
            raise DataError(f"{label_path}: mask is {objects.shape[1]}x{objects.shape[0]} but "
                            f"{img_path} is {image_size(img_path)[1]}x{image_size(img_path)[0]}")
        h, w = objects.shape
        images.append({"id": image_id, "file_name": img_path.relative_to(image_dir).as_posix(),
                       "height": int(h), "width": int(w)})
        for _, cls, mask in instances_from_maps(objects, classes, str(label_path)):
            anns.append(coco_annotation(len(anns) + 1, image_id, cls, mask))
    cats = [{"id": i + 1, "name": n, "supercategory": "voc"} for i, n in enumerate(VOC_CLASSES)]
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": {"description": f"converted from {root} by mobileinst"},
                               "images": images, "annotations": anns, "categories": cats}))
    log.info("%s: %d images, %d instances", out, len(images), len(anns))
    return out
