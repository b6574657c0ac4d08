"""The mask AP a model could reach at best with masks on a stride-s grid: the ceiling of its mask
resolution, whatever the training does.

    .venv/bin/python benchmarks/mask_ceiling.py [--data DATA.yaml] [--imgsz 256] [--strides 8 4]

Every ground-truth mask of the val split goes the way a predicted mask does: resized with its
image to the evaluation size (short side --imgsz, long side capped as `val` does), area-averaged
down to the stride-s grid (what the best per-cell logit could say), bilinearly upsampled back,
thresholded at 0.5, resized to the original image and scored as a detection with score 1.0 and
the right class. Reported: mask AP, AP50, AP75, APs, APm, APl of those "perfect" predictions
(pycocotools, the evaluator of `mobileinst val`). Crowd regions are not predicted. A learned
logit map can be a little sharper than an area average, but not much.
By default the hard synthetic set (seed 0) is written under --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_seeds import ensure_data  # noqa: E402


def through_grid(mask: np.ndarray, size: tuple[int, int], stride: int) -> np.ndarray:
    """(H0, W0) {0,1} -> the same mask after the eval resize to size (h, w) and a stride grid."""
    h, w = size
    m = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    gh, gw = -(-h // stride), -(-w // stride)
    padded = np.zeros((gh * stride, gw * stride), np.float32)
    padded[:h, :w] = m
    grid = cv2.resize(padded, (gw, gh), interpolation=cv2.INTER_AREA)  # area average per cell
    up = cv2.resize(grid, (gw * stride, gh * stride), interpolation=cv2.INTER_LINEAR)[:h, :w]
    back = cv2.resize(up, (mask.shape[1], mask.shape[0]), interpolation=cv2.INTER_LINEAR)
    return (back > 0.5).astype(np.uint8)


def ceiling(gt_json: Path, imgsz: int, stride: int) -> dict[str, float]:
    from mobileinst.data.transforms import max_size_for, resized_size
    from mobileinst.evaluate.coco_eval import evaluate_coco
    coco = COCO(str(gt_json))
    results = []
    for ann in coco.loadAnns(coco.getAnnIds(iscrowd=False)):
        img = coco.imgs[ann["image_id"]]
        size = resized_size(img["height"], img["width"], imgsz, max_size_for(imgsz))
        m = through_grid(coco.annToMask(ann), size, stride)
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode()
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                        "segmentation": rle, "score": 1.0})
    metrics = evaluate_coco(coco, results)
    return {k: getattr(metrics, k) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="DATA yaml (default: the hard set under --out)")
    p.add_argument("--imgsz", type=int, default=256, help="evaluation short side (default 256)")
    p.add_argument("--strides", type=int, nargs="+", default=[8, 4])
    p.add_argument("--out", default="runs/mask_ceiling")
    args = p.parse_args()
    from mobileinst.data.config import load_data_config
    data = ensure_data(args.data, Path(args.out))
    gt = load_data_config(data).val.json
    rows = {s: ceiling(Path(gt), args.imgsz, s) for s in args.strides}
    print(f"mask AP ceiling of {gt} at short side {args.imgsz}")
    print("| mask stride | AP | AP50 | AP75 | APs | APm | APl |\n|---:|---:|---:|---:|---:|---:|---:|")
    for s, r in rows.items():
        print(f"| {s} | " + " | ".join(f"{r[k]:.3f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")) + " |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "mask_ceiling.json").write_text(json.dumps(
        {"gt": str(gt), "imgsz": args.imgsz, "strides": rows}, indent=1))


if __name__ == "__main__":
    main()
