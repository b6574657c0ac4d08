"""A synthetic COCO-format instance-segmentation set that runs everything offline.

Textured shapes of four classes (circle, square, triangle, ring - the ring has a hole) on a
textured background, 1-6 per image, drawn back to front so later shapes occlude earlier ones;
the annotation is the VISIBLE part. Image sides vary (256..448). Colour and texture are drawn
independently of the class, so the class is the shape. Masks are stored as polygons where the
visible part is one simple region, otherwise as compressed or uncompressed RLE, so every
annotation path of the reader is exercised.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import yaml
from pycocotools import mask as mask_utils

CLASSES = ["circle", "square", "triangle", "ring"]


def texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w, 3) float texture: stripes, checks or blotchy noise around a random colour."""
    base = rng.uniform(30, 225, 3)
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # stripes at a random angle
        a, period = rng.uniform(0, np.pi), rng.uniform(6, 18)
        pattern = np.sin((xx * np.cos(a) + yy * np.sin(a)) * 2 * np.pi / period)
    elif kind == 1:  # checks
        s = rng.uniform(6, 16)
        pattern = np.sign(np.sin(xx * np.pi / s) * np.sin(yy * np.pi / s))
    else:  # blotches: upsampled noise
        small = rng.normal(size=(max(2, h // 12), max(2, w // 12))).astype(np.float32)
        pattern = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    contrast = rng.uniform(15, 45, 3)
    return base + pattern[..., None] * contrast


def shape_mask(cls: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A (h, w) uint8 mask of one shape, 20%..45% of the short side across."""
    size = rng.uniform(0.2, 0.45) * min(h, w)
    cx, cy = rng.uniform(size / 2, w - size / 2), rng.uniform(size / 2, h - size / 2)
    m = np.zeros((h, w), np.uint8)
    r = size / 2
    if cls in (0, 3):  # circle / ring
        cv2.circle(m, (int(cx), int(cy)), int(r), 1, -1)
        if cls == 3:
            cv2.circle(m, (int(cx), int(cy)), int(r * rng.uniform(0.45, 0.65)), 0, -1)
    else:  # square / triangle, rotated
        n = 4 if cls == 1 else 3
        a0 = rng.uniform(0, 2 * np.pi)
        ang = a0 + np.arange(n) * 2 * np.pi / n
        pts = np.stack([cx + r * 1.2 * np.cos(ang), cy + r * 1.2 * np.sin(ang)], 1)
        cv2.fillPoly(m, [pts.round().astype(np.int32)], 1)
    return m


def make_image(h: int, w: int, rng: np.random.Generator, max_objects: int = 6):
    """One image (h, w, 3) uint8 and its visible instances [(class, mask)]."""
    img = texture(h, w, rng) * 0.6 + rng.normal(0, 6, (h, w, 3))
    shapes = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(len(CLASSES)))
        m = shape_mask(cls, h, w, rng)
        img[m > 0] = texture(h, w, rng)[m > 0]
        shapes.append((cls, m))
    visible = []
    covered = np.zeros((h, w), bool)
    for cls, m in reversed(shapes):  # front to back
        vis = (m > 0) & ~covered
        covered |= m > 0
        if vis.sum() >= 0.35 * m.sum() and vis.sum() > 64:
            visible.append((cls, vis.astype(np.uint8)))
    return img.clip(0, 255).astype(np.uint8), visible[::-1]


def encode(mask: np.ndarray, i: int) -> dict | list:
    """Polygons where the visible part is one region without holes, else RLE (alternating forms)."""
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    simple = len(contours) == 1 and hierarchy is not None and hierarchy[0][0][2] < 0
    if simple and len(contours[0]) >= 3 and i % 3 != 0:
        return [contours[0].reshape(-1).astype(float).tolist()]
    rle = mask_utils.encode(np.asfortranarray(mask))
    if i % 2:  # uncompressed RLE: run lengths, column-major
        flat = mask.flatten(order="F")
        change = np.flatnonzero(np.diff(flat)) + 1
        runs = np.diff(np.concatenate([[0], change, [flat.size]]))
        counts = runs.tolist() if flat[0] == 0 else [0, *runs.tolist()]
        return {"size": list(mask.shape), "counts": counts}
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def write_split(root: Path, split: str, n: int, rng: np.random.Generator) -> Path:
    (root / split).mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        h, w = int(rng.integers(256, 449)), int(rng.integers(256, 449))
        img, instances = make_image(h, w, rng)
        name = f"{split}_{i:05d}.png" if i % 2 else f"{split}_{i:05d}.jpg"
        params = [cv2.IMWRITE_JPEG_QUALITY, 95] if name.endswith(".jpg") else []
        cv2.imwrite(str(root / split / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), params)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        for cls, m in instances:
            rle = mask_utils.encode(np.asfortranarray(m))
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cls + 1,
                         "segmentation": encode(m, len(anns)), "area": float(m.sum()),
                         "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0})
    cats = [{"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(CLASSES)]
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def make_synthetic_coco(out_dir: str | Path, n_train: int = 400, n_val: int = 50,
                        seed: int = 0) -> Path:
    """Write train/, val/, annotations/instances_{train,val}.json and data.yaml; return the yaml."""
    root = Path(out_dir)
    rng = np.random.default_rng(seed)
    write_split(root, "train", n_train, rng)
    write_split(root, "val", n_val, rng)
    data = {"train": {"json": "annotations/instances_train.json", "images": "train"},
            "val": {"json": "annotations/instances_val.json", "images": "val"},
            "names": CLASSES}
    (root / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return root / "data.yaml"
