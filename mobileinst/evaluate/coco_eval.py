"""COCO mask AP with pycocotools (or faster-coco-eval when installed: identical numbers, faster).

Results records follow detectron2's box-free writer (/shared/spec/training.md §6):
{image_id, category_id (the dataset's own id), score, segmentation: compressed RLE with str counts}.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from ..errors import DataError

log = logging.getLogger("mobileinst.eval")
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def encode_mask(mask: np.ndarray) -> dict:
    """(H, W) bool -> COCO compressed RLE with `counts` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle


def instances_to_coco_json(image_id: int, labels, scores, masks, cat_ids: list[int]) -> list[dict]:
    """One image's instances -> COCO results records, labels mapped back through cat_ids."""
    return [{"image_id": int(image_id), "category_id": int(cat_ids[int(l)]), "score": float(s),
             "segmentation": encode_mask(m)} for l, s, m in zip(labels, scores, masks)]


@dataclass
class CocoMetrics:
    stats: dict[str, float]  # the 12 standard COCO numbers, by name
    per_category: dict[str, float] = field(default_factory=dict)  # class name -> AP
    backend: str = "pycocotools"

    def __getattr__(self, name: str) -> float:
        stats = self.__dict__.get("stats", {})
        if name in stats:
            return stats[name]
        raise AttributeError(name)

    def format_table(self) -> str:
        lines = [f"COCO segm metrics ({self.backend})"]
        lines += [f"  {k:<6} {v:7.4f}" for k, v in self.stats.items()]
        if self.per_category:
            width = max(len(n) for n in self.per_category) + 2
            lines.append(f"  {'category':<{width}}{'AP':>7}")
            lines += [f"  {n:<{width}}{ap:7.4f}" for n, ap in self.per_category.items()]
        return "\n".join(lines)


def _load_gt(gt):
    from pycocotools.coco import COCO
    if not isinstance(gt, (str, Path)):
        return gt, "<gt>"
    path = Path(gt)
    if not path.is_file():
        raise DataError(f"{path}: no such ground-truth file")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path)), str(path)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a COCO annotation file: {e}") from None


def _load_results(results, name: str = "<results>") -> tuple[list[dict], str]:
    if isinstance(results, (str, Path)):
        name = str(results)
        try:
            results = json.loads(Path(results).read_text())
        except FileNotFoundError:
            raise DataError(f"{name}: no such results file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{name}: broken json: {e}") from None
    if not isinstance(results, list):
        raise DataError(f"{name}: COCO results must be a list of records")
    return results, name


def _check_results(results: list[dict], coco, name: str) -> None:
    img_ids, cat_ids = set(coco.getImgIds()), set(coco.getCatIds())
    for i, r in enumerate(results):
        if not isinstance(r, dict) or "segmentation" not in r:
            raise DataError(f"{name}: record {i} has no 'segmentation' (mask results needed)")
        if r.get("image_id") not in img_ids:
            raise DataError(f"{name}: record {i} refers to image id {r.get('image_id')}, "
                            "which is not in the ground truth")
        if r.get("category_id") not in cat_ids:
            raise DataError(f"{name}: record {i} has category id {r.get('category_id')}, "
                            "which is not in the ground truth")


def _cocoeval(backend: str):
    if backend in ("auto", "faster"):
        try:
            from faster_coco_eval import COCOeval_faster
            return COCOeval_faster, "faster-coco-eval"
        except ImportError:
            if backend == "faster":
                raise DataError("faster-coco-eval is not installed (pip install faster-coco-eval)")
    from pycocotools.cocoeval import COCOeval
    return COCOeval, "pycocotools"


def evaluate_coco(gt, results, backend: str = "auto") -> CocoMetrics:
    """Mask AP of `results` (records or a json path) against `gt` (a json path or a COCO)."""
    coco, _ = _load_gt(gt)
    records, name = _load_results(results)
    _check_results(records, coco, name)
    if not records:  # pycocotools' loadRes fails on an empty list: nothing detected scores 0
        log.warning("%s: no detections; every metric is 0", name)
        return CocoMetrics({k: 0.0 for k in STAT_NAMES}, {}, "none")
    records = [{k: v for k, v in r.items() if k != "bbox"} for r in records]  # areas from masks
    evaluator_cls, used = _cocoeval(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco.loadRes(records)
        ev = evaluator_cls(coco, dt, "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {k: float(v) for k, v in zip(STAT_NAMES, ev.stats)}
    return CocoMetrics(stats, per_category_ap(ev, coco), used)


def per_category_ap(ev, coco) -> dict[str, float]:
    """AP per category from eval['precision'] (IoU x recall x cat x area x maxDets), as detectron2."""
    precision = ev.eval["precision"]  # (T, R, K, A, M)
    out = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[coco.cats[int(cat_id)]["name"]] = float(p.mean()) if p.size else float("nan")
    return out
