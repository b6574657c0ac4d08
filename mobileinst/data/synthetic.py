"""A synthetic COCO-format instance-segmentation set that runs everything offline.

Four classes: circle, square (rotated), triangle (rotated) and ring (an annulus: its hole shows
what lies beneath). A class is its shape AND a hue family (each instance's colour is drawn around
its class hue, with random saturation, brightness and texture: stripes, checks or blotchy noise),
on a textured, low-saturation noisy background. Shape alone was too hard for the demo's budget: a
from-scratch model reads colour from the decoder's coarse (1/64) tokens within minutes, shape
takes far longer (docs/design.md). 1-3 objects per image, each 30%-55% of the short side across,
drawn back to front: later objects occlude earlier ones and the annotation is the VISIBLE part.
Placement is re-drawn while an object would hide more than half of an earlier one, so no object
is nearly hidden (and none is left visible but unannotated). Image sides vary in [256, 448].

Every shape is a polygon (a circle has 48 vertices) rasterised with pycocotools, so a stored
polygon decodes to exactly the pixels that were painted. Storage: a polygon where the visible part
is the whole shape and has no hole, otherwise RLE, alternately compressed (string counts) and
uncompressed (list counts), so every annotation path of the reader is exercised. Images are JPEG
(quality 95), every fifth one PNG.

Each image is drawn from its own generator, seeded by (seed, split, index): the set is
deterministic under the seed, and the val split does not change with n_train.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import yaml
from pycocotools import mask as mask_utils

from ..utils import write_image

CLASSES = ["circle", "square", "triangle", "ring"]
MIN_VISIBLE = 0.5  # an earlier object keeps at least this fraction of its area visible
MIN_PIXELS = 64  # smaller visible parts are not annotated (they do not happen with the defaults)
# Object diameters as a fraction of the short side, and the most objects per image. The demo's
# 10-minute training from scratch reached mask AP 0.33 with 20-45% and up to 6 objects, 0.43 with
# 30-55% and up to 4, more with up to 3 (docs/design.md): fewer, larger objects, still
# occluding each other (same-class neighbours that overlap were the commonest merged masks).
# `benchmarks/demo_sweep.py --max-objects 6 --object-size 0.2 0.45` trains on the previous set.
OBJECT_SIZE = (0.3, 0.55)
MAX_OBJECTS = 3
JPEG_Q95 = (cv2.IMWRITE_JPEG_QUALITY, 95)  # the synthetic sets' JPEG quality


# -- drawing ---------------------------------------------------------------------------------------
def texture(h: int, w: int, base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(h, w, 3) float texture around colour `base`: stripes, checks or blotchy noise."""
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # stripes at a random angle
        a, period = rng.uniform(0, np.pi), rng.uniform(6, 18)
        pattern = np.sin((xx * np.cos(a) + yy * np.sin(a)) * 2 * np.pi / period)
    elif kind == 1:  # checks
        s = rng.uniform(6, 16)
        pattern = np.sign(np.sin((xx + 0.5) * np.pi / s) * np.sin((yy + 0.5) * np.pi / s))
    else:  # blotches: upsampled noise
        small = rng.normal(size=(max(2, h // 12), max(2, w // 12))).astype(np.float32)
        pattern = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    contrast = rng.uniform(15, 40, 3)
    return base + pattern[..., None] * contrast


def class_colour(cls: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB base colour in class `cls`'s hue family (hues spread evenly over the circle)."""
    hue = (cls * 180 / len(CLASSES) + rng.uniform(-10, 10)) % 180  # OpenCV hue: 0..180
    hsv = np.uint8([[[hue, rng.uniform(150, 255), rng.uniform(130, 240)]]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float64)


def background_colour(rng: np.random.Generator) -> np.ndarray:
    """A greyish base colour (saturation <= 60), unlike every class colour."""
    hsv = np.uint8([[[rng.uniform(0, 180), rng.uniform(0, 60), rng.uniform(60, 200)]]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float64)


def colour_unlike(avoid: np.ndarray, rng: np.random.Generator, min_dist: float = 90) -> np.ndarray:
    """A random RGB base colour at least `min_dist` away from `avoid` (best of 20 draws)."""
    best = rng.uniform(30, 225, 3)
    for _ in range(20):
        if np.linalg.norm(best - avoid) >= min_dist:
            break
        c = rng.uniform(30, 225, 3)
        best = c if np.linalg.norm(c - avoid) > np.linalg.norm(best - avoid) else best
    return best


def shape_polygons(cls: int, cx: float, cy: float, r: float, angle: float,
                   hole: float) -> list[np.ndarray]:
    """Outline(s) of one shape as (K, 2) xy arrays: [outer] or, for the ring, [outer, inner]."""
    def ngon(n: int, radius: float) -> np.ndarray:
        a = angle + np.arange(n) * 2 * np.pi / n
        xy = np.stack([cx + radius * np.cos(a), cy + radius * np.sin(a)], 1)
        return np.round(xy, 2)  # what is rasterised is exactly what the json stores

    if cls == 0:
        return [ngon(48, r)]
    if cls == 1:
        return [ngon(4, r * 1.2)]
    if cls == 2:
        return [ngon(3, r * 1.25)]
    return [ngon(48, r), ngon(48, r * hole)]


def rasterise(polys: list[np.ndarray], h: int, w: int) -> np.ndarray:
    """pycocotools rasterisation: the first polygon minus the others -> (h, w) bool."""
    rles = mask_utils.frPyObjects([p.reshape(-1).tolist() for p in polys], h, w)
    m = mask_utils.decode(rles).astype(bool)  # (h, w, K)
    return m[..., 0] & ~m[..., 1:].any(-1)


def place_shape(cls: int, h: int, w: int, visible: list[np.ndarray], full: list[np.ndarray],
                rng: np.random.Generator, tries: int = 30, object_size: tuple[float, float] = OBJECT_SIZE
                ) -> tuple[list[np.ndarray], np.ndarray] | None:
    """A shape fully inside the image that leaves every earlier object >= MIN_VISIBLE visible."""
    for _ in range(tries):
        r = rng.uniform(*object_size) * min(h, w) / 2
        margin = r * (1.25 if cls == 2 else 1.2 if cls == 1 else 1.0) + 1
        cx, cy = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
        polys = shape_polygons(cls, cx, cy, r, rng.uniform(0, 2 * np.pi), rng.uniform(0.45, 0.65))
        m = rasterise(polys, h, w)
        if all((v & ~m).sum() >= MIN_VISIBLE * f.sum() for v, f in zip(visible, full)):
            return polys, m
    return None


def make_image(h: int, w: int, rng: np.random.Generator, max_objects: int = MAX_OBJECTS,
               object_size: tuple[float, float] = OBJECT_SIZE
               ) -> tuple[np.ndarray, list[tuple[int, np.ndarray, list[np.ndarray] | None]]]:
    """One image (h, w, 3) uint8 and its visible instances [(class, mask (h, w) uint8, polygon
    outline if the visible part is the whole hole-free shape else None)], back to front."""
    bg = background_colour(rng)
    img = texture(h, w, bg, rng)
    classes, visible, full, outlines = [], [], [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(len(CLASSES)))
        placed = place_shape(cls, h, w, visible, full, rng, object_size=object_size)
        if placed is None:
            continue
        polys, m = placed
        ys, xs = np.nonzero(m)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        tex = texture(y1 - y0, x1 - x0, class_colour(cls, rng), rng)
        box = m[y0:y1, x0:x1]
        img[y0:y1, x0:x1][box] = tex[box]
        visible = [v & ~m for v in visible] + [m]
        full.append(m)
        classes.append(cls)
        outlines.append(polys)
    img = img + rng.normal(0, 4, img.shape)  # sensor noise
    instances = []
    for cls, v, f, polys in zip(classes, visible, full, outlines):
        if v.sum() < MIN_PIXELS:
            continue
        whole = len(polys) == 1 and v.sum() == f.sum()
        instances.append((cls, v.astype(np.uint8), polys[0] if whole else None))
    return img.clip(0, 255).astype(np.uint8), instances


# -- annotations -----------------------------------------------------------------------------------
def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: column-major run lengths starting with a background run."""
    flat = mask.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    return {"size": list(mask.shape), "counts": runs if flat[0] == 0 else [0, *runs]}


def annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray,
               outline: np.ndarray | None, iscrowd: int = 0) -> dict:
    """A COCO annotation; area and bbox from the mask (identical to the decoded segmentation).
    Crowd regions are always stored as (compressed) RLE, as COCO does."""
    rle = mask_utils.encode(np.asfortranarray(mask))
    if outline is not None:
        seg = [outline.reshape(-1).tolist()]
    elif ann_id % 2 and not iscrowd:
        seg = uncompressed_rle(mask)
    else:
        seg = {"size": list(rle["size"]), "counts": rle["counts"].decode()}
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": seg,
            "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": iscrowd}


def write_split(root: Path, split: str, n: int, seed: int, size_range: tuple[int, int] = (256, 448),
                max_objects: int = MAX_OBJECTS, object_size: tuple[float, float] = OBJECT_SIZE) -> Path:
    """Write root/split/*.jpg|png and root/annotations/instances_{split}.json; return the json."""
    (root / split).mkdir(parents=True, exist_ok=True)
    split_key = {"train": 0, "val": 1}.get(split, sum(map(ord, split)))
    images, anns = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, split_key, i])
        h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
        img, instances = make_image(h, w, rng, max_objects, object_size)
        images.append({"id": i + 1, "file_name": save_image(root / split, split, i, img), "height": h, "width": w})
        for cls, m, outline in instances:
            anns.append(annotation(len(anns) + 1, i + 1, cls + 1, m, outline))
    cats = [{"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(CLASSES)]
    return write_coco_json(root / "annotations" / f"instances_{split}.json",
                           f"mobileinst synthetic shapes, seed {seed}", images, anns, cats)


def save_image(folder: Path, split: str, i: int, img: np.ndarray) -> str:
    """Write RGB image i of a split as JPEG (every fifth as PNG) into folder; return its file name
    (a failed write is a MobileInstError naming the file: the json is written after its images,
    so it never names one that was not written)."""
    name = f"{split}_{i:05d}.png" if i % 5 == 4 else f"{split}_{i:05d}.jpg"
    write_image(folder / name, img, JPEG_Q95 if name.endswith(".jpg") else ())  # checked: issue 23
    return name


def write_coco_json(path: Path, description: str, images: list[dict], anns: list[dict],
                    cats: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": {"description": description},
                                "images": images, "annotations": anns, "categories": cats}))
    return path


def write_data_yaml(root: Path, names: list[str]) -> Path:
    """root/data.yaml pointing at the train/val splits written by write_split."""
    data = {"train": {"json": "annotations/instances_train.json", "images": "train"},
            "val": {"json": "annotations/instances_val.json", "images": "val"},
            "names": names}
    (root / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return root / "data.yaml"


def make_synthetic_coco(out_dir: str | Path, n_train: int = 400, n_val: int = 50, seed: int = 0,
                        size_range: tuple[int, int] = (256, 448), max_objects: int = MAX_OBJECTS,
                        object_size: tuple[float, float] = OBJECT_SIZE) -> Path:
    """Write train/, val/, annotations/instances_{train,val}.json and data.yaml (the DATA format);
    return the yaml's path. Deterministic under `seed`."""
    root = Path(out_dir)
    for split, n in (("train", n_train), ("val", n_val)):
        write_split(root, split, n, seed, size_range, max_objects, object_size)
    return write_data_yaml(root, CLASSES)
