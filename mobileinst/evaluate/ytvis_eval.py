"""YouTube-VIS video mask AP: COCOeval over videos, one video = one "image", one track = one
"annotation".

The metric is the one of the official ``ytvoseval`` (youtubevos/cocoapi,
``PythonAPI/pycocotools/ytvoseval.py``, Simplified BSD License, Copyright (c) 2014 Piotr Dollar
and Tsung-Yi Lin; YouTube-VOS changes by its authors). Nothing of it is copied: this module only
overrides pycocotools' ``COCOeval.computeIoU`` and its area ranges, and reuses its matching,
accumulation and summary unchanged.

- IoU of a detected track D and a ground-truth track G: sum_t |D_t ∩ G_t| / sum_t |D_t ∪ G_t|.
  A frame where one side is missing (``null`` segmentation) adds only the other side's area to
  the union; a frame where both are missing adds nothing. (As in ytvoseval, ``iscrowd`` tracks
  are ignored in the matching but their IoU is the plain IoU.)
- A track's area is the mean of its non-empty frame areas (the GT's ``areas`` field when it has
  one entry per frame, as ytvoseval; the masks otherwise). Area ranges: small < 128²,
  medium 128²..256², large > 256² pixels. maxDets 1, 10, 100; IoU thresholds .50:.05:.95.

Ground truth: YouTube-VIS 2019/2021 json (``videos`` with id/width/height/length/file_names,
``annotations`` with id/video_id/category_id/segmentations/areas/iscrowd, ``categories``).
Results: a list of ``{video_id, category_id, score, segmentations: [RLE or null per frame]}``.
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..data.ytvis_json import validate_ytvis, video_name
from ..errors import DataError
from .coco_eval import (APMetrics, as_id, check_score, per_category_ap, read_json,
                        segmentation_to_rle)

log = logging.getLogger("mobileinst.eval")
VIS_AREA_RANGES = {"all": [0, 1e5 ** 2], "small": [0, 128 ** 2], "medium": [128 ** 2, 256 ** 2],
                   "large": [256 ** 2, 1e5 ** 2]}


# -- ground truth -------------------------------------------------------------------------------
def load_ytvis_json(path: str | Path) -> dict:
    """Read and check a YouTube-VIS json (see ``validate_ytvis``); DataError names the file."""
    return validate_ytvis(read_json(path, "YouTube-VIS annotation"), str(path))


# -- tracks -------------------------------------------------------------------------------------
def _track(ann: dict, video: dict, where: str, areas: Any = None) -> dict:
    """A track for COCOeval: compressed RLE per frame, per-frame areas, ``area`` = mean non-empty."""
    h, w = int(video["height"]), int(video["width"])
    # null, [] and {} all mean "not in this frame" (ytvoseval tests `if segmentation`)
    segs = [segmentation_to_rle(s, h, w, f"{where}, frame {t}") if s else None
            for t, s in enumerate(ann["segmentations"])]
    frame_areas = np.array([float(mask_utils.area(s)) if s is not None else 0.0 for s in segs])
    nonempty = [a for a in frame_areas if a]
    if isinstance(areas, list) and len(areas) == len(segs):  # ytvoseval takes the GT's 'areas'
        try:
            nonempty = [float(a) for a in areas if a]
        except (TypeError, ValueError):
            raise DataError(f"{where}: 'areas' must hold numbers or null") from None
    track = {"id": ann["id"], "image_id": ann["video_id"], "category_id": ann["category_id"],
             "iscrowd": int(ann.get("iscrowd", 0)), "segmentations": segs, "frame_areas": frame_areas,
             "area": float(np.mean(nonempty)) if nonempty else 0.0}
    if "score" in ann:
        track["score"] = ann["score"]
    return track


def _gt_tracks(gt: dict, name: str) -> list[dict]:
    videos = {v["id"]: v for v in gt["videos"]}
    return [_track(a, videos[a["video_id"]], f"{name}: annotation {a['id']}", a.get("areas"))
            for a in gt["annotations"]]


def _dt_tracks(gt: dict, results: list, name: str) -> list[dict]:
    """Check the results against ``gt`` and turn them into tracks with ids 1..N."""
    videos = {v["id"]: v for v in gt["videos"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    tracks = []
    for i, r in enumerate(results):
        where = f"{name}: record {i}"
        if not isinstance(r, dict):
            raise DataError(f"{where}: not an object")
        vid, cat_id = as_id(r.get("video_id")), as_id(r.get("category_id"))
        video = videos.get(vid) if vid is not None else None
        if video is None:
            raise DataError(f"{where} refers to video id {r.get('video_id')!r}, "
                            "which is not in the ground truth")
        if cat_id is None or cat_id not in cat_ids:
            raise DataError(f"{where} has category id {r.get('category_id')!r}, "
                            "which is not in the ground truth")
        score = check_score(r.get("score"), where)
        segs = r.get("segmentations")
        if not isinstance(segs, list):
            raise DataError(f"{where} has no 'segmentations' list (one RLE or null per frame)")
        if len(segs) != video["length"]:
            raise DataError(f"{where} has {len(segs)} segmentations but {video_name(video)} has "
                            f"{video['length']} frames")
        ann = {"id": i + 1, "video_id": video["id"], "category_id": cat_id, "score": score,
               "segmentations": segs}
        tracks.append(_track(ann, video, where))
    return tracks


def _video_api(gt: dict, tracks: list[dict]) -> COCO:
    """A pycocotools COCO whose images are the videos and whose annotations are the tracks."""
    api = COCO()
    api.dataset = {"images": [{"id": v["id"], "height": v["height"], "width": v["width"],
                               "length": v["length"]} for v in gt["videos"]],
                   "categories": list(gt["categories"]), "annotations": tracks}
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


# -- evaluation ---------------------------------------------------------------------------------
def track_iou(dts: list[dict], gts: list[dict]) -> np.ndarray:
    """(D, G) spatio-temporal IoU: sum_t |D_t ∩ G_t| / sum_t |D_t ∪ G_t|, 0 where the union is 0.

    The union is sum_t |D_t| + sum_t |G_t| - sum_t |D_t ∩ G_t|, so a frame with one side missing
    adds only the other side's area. Per frame, one batched ``mask.iou`` call gives the IoUs of
    the present tracks; the intersection is recovered exactly as I = iou * (a_d + a_g) / (1 + iou)
    (rounded: areas are integer pixel counts).
    """
    inter = np.zeros((len(dts), len(gts)))
    if not dts or not gts:
        return inter
    for t in range(len(gts[0]["segmentations"])):
        di = [i for i, d in enumerate(dts) if d["segmentations"][t] is not None]
        gi = [j for j, g in enumerate(gts) if g["segmentations"][t] is not None]
        if not di or not gi:
            continue
        iou = np.asarray(mask_utils.iou([dts[i]["segmentations"][t] for i in di],
                                        [gts[j]["segmentations"][t] for j in gi], [0] * len(gi)))
        a_d = np.array([dts[i]["frame_areas"][t] for i in di])[:, None]
        a_g = np.array([gts[j]["frame_areas"][t] for j in gi])[None, :]
        inter[np.ix_(di, gi)] += np.rint(iou * (a_d + a_g) / (1.0 + iou))
    union = (np.array([d["frame_areas"].sum() for d in dts])[:, None]
             + np.array([g["frame_areas"].sum() for g in gts])[None, :] - inter)
    return np.where(union > 0, inter / np.maximum(union, 1.0), 0.0)


class YTVISeval(COCOeval):
    """COCOeval with videos as images and tracks as annotations (see the module docstring).

    ``gt`` must have passed ``validate_ytvis`` and have ``annotations``; ``results`` are checked
    here (DataError naming ``results_name``). Use as COCOeval: evaluate(), accumulate(),
    summarize(); ``stats`` and ``eval["precision"]`` have COCO's layout.
    """

    def __init__(self, gt: dict, results: list, *, gt_name: str = "ground truth",
                 results_name: str = "results"):
        cocoGt = _video_api(gt, _gt_tracks(gt, gt_name))
        cocoDt = _video_api(gt, _dt_tracks(gt, results, results_name))
        # iouType "bbox" only so that COCOeval._prepare leaves the tracks alone (no per-image RLE)
        super().__init__(cocoGt, cocoDt, iouType="bbox")
        self.params.areaRng = [list(r) for r in VIS_AREA_RANGES.values()]
        self.params.areaRngLbl = list(VIS_AREA_RANGES)
        self.params.maxDets = [1, 10, 100]

    def computeIoU(self, vidId, catId) -> np.ndarray | list:
        """Track IoUs (D sorted by score, at most maxDets[-1]) x G for one video and category."""
        p = self.params
        if p.useCats:
            gts, dts = self._gts[vidId, catId], self._dts[vidId, catId]
        else:
            gts = [g for c in p.catIds for g in self._gts[vidId, c]]
            dts = [d for c in p.catIds for d in self._dts[vidId, c]]
        if not gts or not dts:
            return []
        order = np.argsort([-d["score"] for d in dts], kind="mergesort")
        dts = [dts[i] for i in order][:p.maxDets[-1]]
        return track_iou(dts, gts)


@dataclass
class VisMetrics(APMetrics):
    """YouTube-VIS metrics: COCO's 12 numbers over videos, with the 128²/256² area ranges."""

    title: ClassVar[str] = "YouTube-VIS video mask AP"
    area_note: ClassVar[str] = ("track area = mean frame area: small < 128², medium 128²..256², "
                                "large > 256² pixels")


def evaluate_ytvis(gt: str | Path | dict, results: str | Path | list, *,
                   verbose: bool = False) -> VisMetrics:
    """Video mask AP of ``results`` (a json path or a list of records) against a YouTube-VIS
    ground truth (a json path or the loaded dict). An empty results list scores 0 (with a
    warning); ground truth with an empty ``annotations`` list gives -1, as COCOeval does.
    """
    if isinstance(gt, (str, Path)):
        gt_name, gt = str(gt), load_ytvis_json(gt)
    else:
        gt_name, gt = "ground truth", validate_ytvis(gt)
    if "annotations" not in gt:
        raise DataError(f"{gt_name}: no 'annotations' (the YouTube-VIS valid/test files carry no "
                        "labels); evaluate against a labelled split")
    results_name = "results"
    if isinstance(results, (str, Path)):
        results_name, results = str(results), read_json(results, "results")
    if not isinstance(results, list):
        raise DataError(f"{results_name}: YouTube-VIS results must be a json list of records")
    if not results:
        log.warning("%s: no detections; AP and AR are 0 wherever there is ground truth", results_name)
    ev = YTVISeval(gt, results, gt_name=gt_name, results_name=results_name)
    with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    cats = {c["id"]: c for c in gt["categories"]}
    return VisMetrics.from_stats(ev.stats, per_category=per_category_ap(ev, cats), backend="pycocotools")


__all__ = ["VIS_AREA_RANGES", "VisMetrics", "YTVISeval", "evaluate_ytvis", "load_ytvis_json",
           "track_iou"]
