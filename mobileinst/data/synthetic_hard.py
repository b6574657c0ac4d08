"""The hard synthetic COCO-format set (`mobileinst data synth --preset hard`): one nobody tuned for.

The demo's first set (synthetic.py) codes each class by a hue and holds 1-3 large objects; a recipe
tuned on it learnt nothing here (issue "Learning that transfers"). This set is built so that only
what a real segmenter must learn helps:

- five classes told apart by SHAPE ALONE: circle, square, triangle, ring (an annulus: a hole that
  shows what lies beneath) and cross. Every object's colour is drawn uniformly at random,
  independently of its class, and textured (stripes, checks or blotches);
- textured, fully coloured backgrounds, with 0-4 unannotated distractor blobs (irregular smooth
  shapes, textured like objects) per image;
- 0-8 objects per image (about 5% of the images are empty), diameters log-uniform in 6%-40% of the
  short side, so many objects are small (COCO "small": under 32x32 px) next to large ones;
- occlusion: objects are drawn back to front and an earlier object keeps at least 35% of its area
  visible; the annotation is the visible part (rings and occluded objects are stored as RLE);
- crowd regions: about 15% of the images hold a cluster of 6-14 tiny same-class shapes annotated
  as one `iscrowd: 1` region (not a training target; detections on it are ignored by COCO AP);
- non-contiguous category ids (3, 7, 8, 15, 42), so the id mapping is exercised;
- image sides in [256, 448], JPEG (every fifth PNG), sensor noise; 400 train / 100 val images.

Deterministic under the seed (one generator per image, seeded by (seed, split, index)); the val
split does not change with n_train. Not made easier to meet any target: its parameters were fixed
before any recipe was trained on it.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .synthetic import (annotation, colour_unlike, rasterise, save_image, texture, write_coco_json,
                        write_data_yaml)

CLASSES = ["circle", "square", "triangle", "ring", "cross"]
CATEGORY_IDS = [3, 7, 8, 15, 42]
OBJECT_SIZE = (0.06, 0.40)  # diameter / short side, log-uniform
MAX_OBJECTS = 8
EMPTY_FRACTION = 0.05
CROWD_FRACTION = 0.15
MIN_VISIBLE = 0.35  # an earlier object keeps at least this fraction of its area visible
MIN_PIXELS = 20  # smaller visible parts are not annotated (and not drawn over a crowd)


def polygons(cls: int, cx: float, cy: float, r: float, angle: float, rng: np.random.Generator
             ) -> list[np.ndarray]:
    """Outline(s) of one shape of class `cls` with circumradius ~r: [outer] or [outer, hole]."""
    def pts(a: np.ndarray, radius: np.ndarray | float) -> np.ndarray:
        xy = np.stack([cx + radius * np.cos(a + angle), cy + radius * np.sin(a + angle)], 1)
        return np.round(xy, 2)  # what is rasterised is exactly what the json stores

    circle = np.arange(48) * 2 * np.pi / 48
    if cls == 0:
        return [pts(circle, r)]
    if cls == 1:
        return [pts(np.arange(4) * np.pi / 2, r * 1.15)]
    if cls == 2:
        return [pts(np.arange(3) * 2 * np.pi / 3, r * 1.2)]
    if cls == 3:
        return [pts(circle, r), pts(circle, r * rng.uniform(0.45, 0.65))]
    # cross: a plus sign with arms of half-width t
    t = r * rng.uniform(0.28, 0.4)
    xy = np.array([(t, t), (r, t), (r, -t), (t, -t), (t, -r), (-t, -r), (-t, -t), (-r, -t),
                   (-r, t), (-t, t), (-t, r), (t, r)])
    a, rad = np.arctan2(xy[:, 1], xy[:, 0]), np.hypot(xy[:, 0], xy[:, 1])
    return [pts(a, rad)]


def blob(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """An irregular smooth distractor region (h, w) bool: thresholded low-frequency noise."""
    size = rng.uniform(0.1, 0.35) * min(h, w)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    noise = cv2.resize(rng.normal(size=(6, 6)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    d = np.hypot(yy - cy, xx - cx) / size
    return (d + 0.35 * noise) < 1.0


def random_colour(rng: np.random.Generator) -> np.ndarray:
    """Any RGB base colour (hue, saturation and brightness all random)."""
    hsv = np.uint8([[[rng.uniform(0, 180), rng.uniform(0, 255), rng.uniform(50, 235)]]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float64)


def paint(img: np.ndarray, m: np.ndarray, base: np.ndarray, rng: np.random.Generator) -> None:
    """Fill mask m of img with a texture around colour `base` (in place)."""
    ys, xs = np.nonzero(m)
    if len(ys) == 0:
        return
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    tex = texture(y1 - y0, x1 - x0, base, rng)
    box = m[y0:y1, x0:x1]
    img[y0:y1, x0:x1][box] = tex[box]


def diameter(h: int, w: int, rng: np.random.Generator, size: tuple[float, float]) -> float:
    lo, hi = np.log(size[0]), np.log(size[1])
    return float(np.exp(rng.uniform(lo, hi))) * min(h, w)


def place(cls: int, h: int, w: int, r: float, visible: list[np.ndarray], full: list[np.ndarray],
          rng: np.random.Generator, tries: int = 30) -> np.ndarray | None:
    """A shape of radius r fully inside the image leaving every earlier object >= MIN_VISIBLE."""
    margin = r * 1.2 + 1
    if 2 * margin >= min(h, w):
        return None
    for _ in range(tries):
        cx, cy = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
        m = rasterise(polygons(cls, cx, cy, r, rng.uniform(0, 2 * np.pi), rng), h, w)
        if all((v & ~m).sum() >= MIN_VISIBLE * f.sum() for v, f in zip(visible, full)):
            return m
    return None


def crowd(h: int, w: int, rng: np.random.Generator) -> tuple[int, np.ndarray, list[np.ndarray]]:
    """A cluster of 6-14 tiny same-class shapes: (class, union mask, [each shape's mask])."""
    cls = int(rng.integers(len(CLASSES)))
    s = min(h, w)
    spread = rng.uniform(0.12, 0.2) * s
    cx, cy = rng.uniform(spread, w - spread), rng.uniform(spread, h - spread)
    parts = []
    for _ in range(int(rng.integers(6, 15))):
        r = rng.uniform(0.015, 0.03) * s
        x, y = cx + rng.uniform(-spread, spread), cy + rng.uniform(-spread, spread)
        parts.append(rasterise(polygons(cls, x, y, r, rng.uniform(0, 2 * np.pi), rng), h, w))
    return cls, np.any(parts, 0), parts


def make_image(h: int, w: int, rng: np.random.Generator, max_objects: int = MAX_OBJECTS,
               object_size: tuple[float, float] = OBJECT_SIZE
               ) -> tuple[np.ndarray, list[tuple[int, np.ndarray, int]]]:
    """One image (h, w, 3) uint8 and its annotations [(class, visible mask (h, w) uint8, iscrowd)]."""
    bg = random_colour(rng)
    img = texture(h, w, bg, rng)
    for _ in range(int(rng.integers(0, 5))):  # unannotated clutter
        paint(img, blob(h, w, rng), colour_unlike(bg, rng, 60), rng)
    n = 0 if rng.random() < EMPTY_FRACTION else int(rng.integers(1, max_objects + 1))
    classes, visible, full, crowds = [], [], [], []
    if rng.random() < CROWD_FRACTION:  # drawn first: objects may cover part of it
        cls, union, parts = crowd(h, w, rng)
        for part in parts:
            paint(img, part, colour_unlike(bg, rng, 60), rng)
        classes.append(cls)
        visible.append(union)
        full.append(union)
        crowds.append(1)
    # big objects first (behind), so small ones are not all hidden
    radii = sorted((diameter(h, w, rng, object_size) / 2 for _ in range(n)), reverse=True)
    for r in radii:
        cls = int(rng.integers(len(CLASSES)))
        m = place(cls, h, w, r, visible, full, rng)
        if m is None:
            continue
        paint(img, m, colour_unlike(bg, rng, 60), rng)
        visible = [v & ~m for v in visible] + [m]
        full.append(m)
        classes.append(cls)
        crowds.append(0)
    img = img + rng.normal(0, 4, img.shape)  # sensor noise
    instances = [(c, v.astype(np.uint8), k) for c, v, k in zip(classes, visible, crowds)
                 if v.sum() >= MIN_PIXELS]
    return img.clip(0, 255).astype(np.uint8), instances


def write_split(root: Path, split: str, n: int, seed: int, size_range: tuple[int, int] = (256, 448),
                max_objects: int = MAX_OBJECTS, object_size: tuple[float, float] = OBJECT_SIZE) -> Path:
    """Write root/split/*.jpg|png and root/annotations/instances_{split}.json; return the json."""
    (root / split).mkdir(parents=True, exist_ok=True)
    split_key = {"train": 0, "val": 1}.get(split, sum(map(ord, split)))
    images, anns = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, 7, split_key, i])  # 7: never the first set's draws
        h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
        img, instances = make_image(h, w, rng, max_objects, object_size)
        images.append({"id": 1000 + i, "file_name": save_image(root / split, split, i, img), "height": h, "width": w})
        for cls, m, iscrowd in instances:
            anns.append(annotation(len(anns) + 1, 1000 + i, CATEGORY_IDS[cls], m, None, iscrowd))
    cats = [{"id": k, "name": c, "supercategory": "shape"} for k, c in zip(CATEGORY_IDS, CLASSES)]
    return write_coco_json(root / "annotations" / f"instances_{split}.json",
                           f"mobileinst hard synthetic shapes, seed {seed}", images, anns, cats)


def make_hard_coco(out_dir: str | Path, n_train: int = 400, n_val: int = 100, seed: int = 0,
                   size_range: tuple[int, int] = (256, 448), max_objects: int = MAX_OBJECTS,
                   object_size: tuple[float, float] = OBJECT_SIZE) -> Path:
    """Write the hard set (train/, val/, annotations/, data.yaml); return the yaml's path."""
    root = Path(out_dir)
    for split, n in (("train", n_train), ("val", n_val)):
        write_split(root, split, n, seed, size_range, max_objects, object_size)
    return write_data_yaml(root, CLASSES)
