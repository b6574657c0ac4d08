"""A synthetic YouTube-VIS-format video set: moving, occluding, textured shapes.

The objects are those of the synthetic image set (`data.synthetic`): the same four classes, shapes,
class hue families, textures and noisy low-saturation background, at the same scale (20%-40% of the
short side across), so a model trained on the synthetic IMAGES (the demo) also works on these frames.
Per clip: 1-4 objects, each moving at a constant velocity (1.5-5 px per frame, bouncing off the
borders) and rotating; drawn back to front in a fixed depth order, so objects pass in front of each
other and the annotation is the VISIBLE part (null in a frame where fewer than MIN_PIXELS show).
A quarter of the objects enter after the first frame and a quarter leave before the last (null
outside their interval), so tracks start and end inside clips. A texture moves with its object.

Layout (YouTube-VIS 2019/2021):
    out/train/JPEGImages/<video>/00000.jpg ...     out/annotations/train.json
    out/val/JPEGImages/<video>/00000.jpg ...       out/annotations/val.json
    out/data.yaml                                  (video: true; the DATA format)
Segmentations alternate compressed (string counts) and uncompressed (list counts) RLE. Each clip is
drawn from its own generator, seeded by (seed, split, index): deterministic, val independent of n_train.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from pycocotools import mask as mask_utils

from ..utils import write_image
from .synthetic import (CLASSES, JPEG_Q95, MIN_PIXELS, background_colour, class_colour, rasterise,
                        shape_polygons, texture, uncompressed_rle)

SIZES = ((240, 320), (256, 352), (288, 384))  # (h, w) of the clips


@dataclass
class MovingObject:
    cls: int
    r: float  # radius
    cx: float
    cy: float
    vx: float
    vy: float
    angle: float
    spin: float
    hole: float
    tex: np.ndarray  # (S, S, 3) float texture centred on the object
    t0: int  # first frame drawn
    t1: int  # one past the last frame drawn

    @property
    def margin(self) -> float:
        return self.r * (1.25 if self.cls == 2 else 1.2 if self.cls == 1 else 1.0) + 1

    def move(self, h: int, w: int) -> None:
        """One frame of motion, bouncing off the borders (the shape stays inside the frame)."""
        self.cx, self.cy, self.angle = self.cx + self.vx, self.cy + self.vy, self.angle + self.spin
        for pos, vel, side in (("cx", "vx", w), ("cy", "vy", h)):
            lo, hi = self.margin, side - self.margin
            v = getattr(self, pos)
            if v < lo or v > hi:
                setattr(self, pos, float(np.clip(v, lo, hi)))
                setattr(self, vel, -getattr(self, vel))

    def mask(self, h: int, w: int) -> np.ndarray:
        return rasterise(shape_polygons(self.cls, self.cx, self.cy, self.r, self.angle, self.hole), h, w)


def new_object(h: int, w: int, length: int, rng: np.random.Generator) -> MovingObject:
    cls = int(rng.integers(len(CLASSES)))
    r = rng.uniform(0.2, 0.4) * min(h, w) / 2
    s = int(np.ceil(2 * 1.3 * r)) + 4
    speed, direction = rng.uniform(1.5, 5.0), rng.uniform(0, 2 * np.pi)
    t0 = int(rng.integers(1, max(2, length // 2))) if rng.random() < 0.25 else 0
    t1 = int(rng.integers(length // 2 + 1, length)) if rng.random() < 0.25 and length > 3 else length
    obj = MovingObject(cls, r, 0.0, 0.0, speed * np.cos(direction), speed * np.sin(direction),
                       rng.uniform(0, 2 * np.pi), rng.uniform(-0.08, 0.08), rng.uniform(0.45, 0.65),
                       texture(s, s, class_colour(cls, rng), rng), t0, max(t1, t0 + 1))
    obj.cx, obj.cy = rng.uniform(obj.margin, w - obj.margin), rng.uniform(obj.margin, h - obj.margin)
    return obj


def paint(img: np.ndarray, obj: MovingObject, m: np.ndarray) -> None:
    """Paint obj's texture (centred on it) into img where m is set."""
    s = obj.tex.shape[0]
    oy, ox = int(round(obj.cy)) - s // 2, int(round(obj.cx)) - s // 2
    ys, xs = np.nonzero(m)
    img[ys, xs] = obj.tex[np.clip(ys - oy, 0, s - 1), np.clip(xs - ox, 0, s - 1)]


def make_clip(h: int, w: int, length: int, rng: np.random.Generator, max_objects: int = 4
              ) -> tuple[list[np.ndarray], list[tuple[int, list[np.ndarray | None]]]]:
    """Frames [(h, w, 3) uint8] and instances [(class, [visible mask (h, w) uint8 or None per frame])]."""
    bg = texture(h, w, background_colour(rng), rng)
    objects = [new_object(h, w, length, rng) for _ in range(int(rng.integers(1, max_objects + 1)))]
    frames, visible = [], [[] for _ in objects]
    for t in range(length):
        img, shown = bg.copy(), []
        for k, obj in enumerate(objects):  # back to front
            m = obj.mask(h, w) if obj.t0 <= t < obj.t1 else np.zeros((h, w), bool)
            paint(img, obj, m)
            shown = [v & ~m for v in shown] + [m]
            obj.move(h, w)
        for k, v in enumerate(shown):
            visible[k].append(v.astype(np.uint8) if v.sum() >= MIN_PIXELS else None)
        frames.append((img + rng.normal(0, 4, img.shape)).clip(0, 255).astype(np.uint8))
    instances = [(o.cls, v) for o, v in zip(objects, visible) if any(m is not None for m in v)]
    return frames, instances


def _segmentation(mask: np.ndarray | None, ann_id: int) -> tuple[dict | None, float | None, list | None]:
    if mask is None:
        return None, None, None
    rle = mask_utils.encode(np.asfortranarray(mask))
    seg = uncompressed_rle(mask) if ann_id % 2 else {"size": list(rle["size"]),
                                                     "counts": rle["counts"].decode()}
    return seg, float(mask_utils.area(rle)), [float(v) for v in mask_utils.toBbox(rle)]


def write_split(root: Path, split: str, n: int, seed: int, length: int, max_objects: int) -> Path:
    """Write root/split/JPEGImages/<video>/*.jpg and root/annotations/<split>.json; return the json."""
    split_key = {"train": 0, "val": 1}.get(split, sum(map(ord, split)))
    videos, anns = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, split_key, 1000 + i])
        h, w = SIZES[int(rng.integers(len(SIZES)))]
        frames, instances = make_clip(h, w, length, rng, max_objects)
        name = f"{split}_{i:04d}"
        folder = root / split / "JPEGImages" / name
        folder.mkdir(parents=True, exist_ok=True)
        for t, f in enumerate(frames):
            write_image(folder / f"{t:05d}.jpg", f, JPEG_Q95)  # a failure names the file
        videos.append({"id": i + 1, "width": w, "height": h, "length": length,
                       "file_names": [f"{name}/{t:05d}.jpg" for t in range(length)]})
        for cls, masks in instances:
            ann_id = len(anns) + 1
            segs, areas, boxes = zip(*(_segmentation(m, ann_id) for m in masks))
            anns.append({"id": ann_id, "video_id": i + 1, "category_id": cls + 1, "iscrowd": 0,
                         "segmentations": list(segs), "areas": list(areas), "bboxes": list(boxes),
                         "width": w, "height": h, "length": 1})
    cats = [{"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(CLASSES)]
    path = root / "annotations" / f"{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    (root / split / "JPEGImages").mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": {"description": f"mobileinst synthetic videos, seed {seed}"},
                                "videos": videos, "annotations": anns, "categories": cats}))
    return path


def make_synthetic_ytvis(out_dir: str | Path, seed: int = 0, n_train: int = 32, n_val: int = 8,
                         length: int = 12, max_objects: int = 4) -> Path:
    """Write both splits and data.yaml (the DATA format, `video: true`); return the yaml's path."""
    root = Path(out_dir)
    for split, n in (("train", n_train), ("val", n_val)):
        write_split(root, split, n, seed, length, max_objects)
    data = {"video": True,
            "train": {"json": "annotations/train.json", "images": "train/JPEGImages"},
            "val": {"json": "annotations/val.json", "images": "val/JPEGImages"},
            "names": CLASSES}
    (root / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return root / "data.yaml"
