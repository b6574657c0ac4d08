"""COCO mask AP with pycocotools (or faster-coco-eval when installed: identical numbers, faster).

Results records follow detectron2's box-free writer (detectron2 `evaluation/coco_evaluation.py`,
`instances_to_coco_json`, as hustvl/SparseInst uses it):
``{image_id, category_id (the dataset's own id), score, segmentation}``, the segmentation a
compressed RLE whose ``counts`` is a str. Polygons and uncompressed RLEs are accepted too and are
converted to compressed RLE with the ground-truth image size.

Conventions, as COCOeval and detectron2:
- A metric is -1 where the ground truth has no object in that area range (a GT without any
  annotation gives -1 everywhere); the per-category AP is NaN for a category without ground truth.
- An empty results list scores 0 wherever there is ground truth (pycocotools' own ``loadRes``
  crashes on ``[]``; here the detections are simply an empty set), with a warning.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable

import numpy as np
from pycocotools import mask as mask_utils

from ..data.rle import encode_mask
from ..data.validate import (check_annotation, check_categories, check_images, check_segmentation,
                             rle_string_counts)
from ..errors import DataError, MobileInstError

log = logging.getLogger("mobileinst.eval")
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BACKENDS = ("auto", "pycocotools", "faster")


# -- encoding -----------------------------------------------------------------------------------
def instances_to_coco_json(image_id: int, labels: Iterable, scores: Iterable, masks: Iterable,
                           cat_ids: list[int]) -> list[dict]:
    """One image's instances -> COCO results records; contiguous label ``l`` -> ``cat_ids[l]``."""
    records = []
    for label, score, mask in zip(labels, scores, masks):
        label = int(label)
        if not 0 <= label < len(cat_ids):
            raise ValueError(f"label {label} is out of range for {len(cat_ids)} categories")
        records.append({"image_id": int(image_id), "category_id": int(cat_ids[label]),
                        "score": float(score), "segmentation": encode_mask(mask)})
    return records


def segmentation_to_rle(segm: Any, height: int, width: int, where: str) -> dict | None:
    """A COCO segmentation (compressed or uncompressed RLE, polygons) -> compressed RLE.

    ``None`` stays ``None`` (a frame without the object in YouTube-VIS). Anything else, or an RLE
    of another size than (height, width), raises DataError naming ``where``.
    """
    if segm is None:
        return None
    try:
        if isinstance(segm, dict) and "counts" in segm and "size" in segm:
            if [int(s) for s in segm["size"]] != [height, width]:
                raise DataError(f"{where}: mask size {list(segm['size'])} is not the image size "
                                f"{[height, width]}")
            if isinstance(segm["counts"], list):  # uncompressed RLE
                check_before_c(segm, height, width, where)
                return mask_utils.frPyObjects(segm, height, width)
            if isinstance(segm["counts"], (str, bytes)):  # compressed: runs must cover the image
                counts = segm["counts"]
                text = counts.decode("ascii") if isinstance(counts, bytes) else counts
                total = sum(rle_string_counts(text))
                if total != height * width:
                    raise DataError(f"{where}: compressed RLE counts sum to {total}, not "
                                    f"{height} x {width} (pycocotools would read past the mask)")
                return segm
        elif isinstance(segm, list) and segm and all(isinstance(p, list) for p in segm):
            check_before_c(segm, height, width, where)
            return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))  # polygons
    except DataError:
        raise
    except (TypeError, ValueError, IndexError, KeyError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: unreadable segmentation ({e})") from None
    raise DataError(f"{where}: segmentation must be an RLE {{size, counts}} or a list of polygons, "
                    f"got {type(segm).__name__}")


def check_before_c(segm: list | dict, height: int, width: int, where: str) -> None:
    """The dataset validator's check of polygons (numbers, coordinates within one image size of
    the image) or an uncompressed RLE (runs covering the image) before pycocotools' C code reads
    them: far-off coordinates crashed it (SIGSEGV). DataError naming `where`."""
    problem, _ = check_segmentation(segm, (height, width), "the image")
    if problem:
        raise DataError(f"{where}: {problem}")


# -- metrics ------------------------------------------------------------------------------------
def _fmt(v: float) -> str:
    return "    n/a" if _missing(v) else f"{v:7.4f}"


def _missing(v: float) -> bool:
    """COCOeval's -1 (no ground truth in the range) or detectron2's NaN (category without GT)."""
    return v is None or math.isnan(v) or v < 0


@dataclass
class APMetrics:
    """The 12 standard COCOeval numbers (fractions in [0, 1]; -1 = no ground truth in that range),
    per-category AP (name -> AP, NaN = no ground truth) and the backend that computed them."""

    AP: float
    AP50: float
    AP75: float
    APs: float
    APm: float
    APl: float
    AR1: float
    AR10: float
    AR100: float
    ARs: float
    ARm: float
    ARl: float
    per_category: dict[str, float] = field(default_factory=dict)
    backend: str = "pycocotools"

    title: ClassVar[str] = "mask AP"
    area_note: ClassVar[str] = "areas: small < 32², medium 32²..96², large > 96² pixels"

    @classmethod
    def from_stats(cls, stats: Iterable[float], **kwargs) -> "APMetrics":
        """Build from COCOeval's ``stats`` array (the first 12 entries, in COCO order)."""
        values = [float(v) for v in stats][:len(STAT_NAMES)]
        return cls(**dict(zip(STAT_NAMES, values)), **kwargs)

    @property
    def stats(self) -> dict[str, float]:
        """The 12 numbers by name, in COCOeval's order."""
        return {k: getattr(self, k) for k in STAT_NAMES}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format_table(self) -> str:
        """The 12 metrics (plus any extra rows, e.g. boundary AP) and a per-category AP table."""
        rows = [("mask", self.stats)] + self._extra_rows()
        lines = [f"{self.title} ({self.backend})"]
        for names in (STAT_NAMES[:6], STAT_NAMES[6:]):
            lines.append(" " * 11 + " ".join(f"{n:>7}" for n in names))
            lines += [f"  {label:<9}" + " ".join(_fmt(stats[n]) for n in names) for label, stats in rows]
        if self.per_category:
            lines.append(self._category_table())
        lines.append(f"  {self.area_note}")
        values = [v for _, st in rows for v in st.values()] + list(self.per_category.values())
        if any(_missing(v) for v in values):
            lines.append("  n/a: no ground truth there (COCOeval reports -1, detectron2 NaN)")
        return "\n".join(lines)

    def _extra_rows(self) -> list[tuple[str, dict[str, float]]]:
        return []

    def _category_table(self, columns: int = 3) -> str:
        items = list(self.per_category.items())
        width = max(8, max(len(n) for n, _ in items))
        head = "  " + "   ".join(f"{'category':<{width}} {'AP':>7}" for _ in range(min(columns, len(items))))
        rows = [head]
        for i in range(0, len(items), columns):
            rows.append("  " + "   ".join(f"{n:<{width}} {_fmt(ap)}" for n, ap in items[i:i + columns]))
        return "\n".join(rows)


@dataclass
class CocoMetrics(APMetrics):
    """COCO segm metrics; ``boundary`` holds the 12 boundary-AP numbers when asked for."""

    boundary: dict[str, float] | None = None

    title: ClassVar[str] = "COCO mask AP"

    def _extra_rows(self) -> list[tuple[str, dict[str, float]]]:
        return [("boundary", self.boundary)] if self.boundary else []


def per_category_ap(ev, cats: dict[int, dict]) -> dict[str, float]:
    """AP per category from ``eval["precision"]`` (T x R x K x A x M) at area 'all' and the
    largest maxDets, averaging the entries > -1, NaN where none: detectron2's computation."""
    precision = ev.eval["precision"]
    out: dict[str, float] = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        name = str(cats[int(cat_id)].get("name", cat_id))
        if name in out:  # two categories with one name: keep both
            name = f"{name} (id {int(cat_id)})"
        out[name] = float(p.mean()) if p.size else float("nan")
    return out


# -- inputs -------------------------------------------------------------------------------------
def read_json(path: str | Path, what: str) -> Any:
    """json.load with DataError naming the file on every failure."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a {what} file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: {what} file is not valid json ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read {what} file ({e})") from None


def check_ground_truth(path: str | Path) -> None:
    """Everything evaluation needs of a val json (annotation ids included), checked when training
    starts rather than at its first evaluation."""
    _load_gt(path)


def _load_gt(gt):
    """A COCO api object for ``gt`` (a path or an object), checked for segm evaluation."""
    from pycocotools.coco import COCO

    if isinstance(gt, (str, Path)):
        name, data = str(gt), read_json(gt, "ground-truth")
        _check_gt(data, name)
        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco, name
    if not hasattr(gt, "dataset") or not hasattr(gt, "imgs"):
        raise TypeError(f"gt must be a path or a pycocotools COCO object, got {type(gt).__name__}")
    _check_gt(gt.dataset, "ground truth")
    return gt, "ground truth"


def _check_gt(data: Any, name: str) -> None:
    """The dataset validator's checks (data/validate.py, as training's: types, ranges, ids, sizes,
    segmentations) and what evaluation needs (annotation ids, masks); fills COCO's defaults
    (iscrowd 0, area from the mask)."""
    if not isinstance(data, dict):
        raise DataError(f"{name}: a COCO annotation file is a json object, got {type(data).__name__}")
    for key in ("images", "categories", "annotations"):
        if not isinstance(data.get(key), list):
            hint = " (an image-info file without labels cannot be evaluated)" if key == "annotations" else ""
            raise DataError(f"{name}: no '{key}' list{hint}")
    check_categories(name, data["categories"])
    sizes = check_images(name, data["images"])
    cat_ids, seen = {c["id"] for c in data["categories"]}, set()
    for i, ann in enumerate(data["annotations"]):
        where = f"{name}: annotation {ann.get('id') if isinstance(ann, dict) else ann!r}"
        if not isinstance(ann, dict) or "id" not in ann:
            raise DataError(f"{where}: not an object with an 'id'")
        check_annotation(name, i, ann, sizes, cat_ids, seen)
        segm = ann.get("segmentation")
        if not segm or not isinstance(segm, (dict, list)):
            raise DataError(f"{where}: no 'segmentation' polygons or RLE (mask AP needs masks)")
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            rle = segmentation_to_rle(segm, *sizes[ann["image_id"]], where)
            ann["area"] = float(mask_utils.area(rle))


def _load_results(results, coco, name: str = "results") -> tuple[list[dict], str]:
    """Records (a json path or a list), checked against ``coco`` and copied for ``loadRes``."""
    if isinstance(results, (str, Path)):
        name, results = str(results), read_json(results, "results")
    if not isinstance(results, list):
        hint = " (a COCO annotation file is not a results file)" if isinstance(results, dict) else ""
        raise DataError(f"{name}: COCO results must be a json list of records{hint}")
    return [_check_record(r, i, coco, name) for i, r in enumerate(results)], name


def _check_record(r: Any, i: int, coco, name: str) -> dict:
    where = f"{name}: record {i}"
    if not isinstance(r, dict):
        raise DataError(f"{where}: not an object")
    if "segmentation" not in r:
        raise DataError(f"{where} has no 'segmentation' (mask results needed)")
    image_id, cat_id = as_id(r.get("image_id")), as_id(r.get("category_id"))
    img = coco.imgs.get(image_id) if image_id is not None else None
    if img is None:
        raise DataError(f"{where} refers to image id {r.get('image_id')!r}, "
                        "which is not in the ground truth")
    if cat_id is None or cat_id not in coco.cats:
        raise DataError(f"{where} has category id {r.get('category_id')!r}, "
                        "which is not in the ground truth")
    score = check_score(r.get("score"), where)
    segm = segmentation_to_rle(r["segmentation"], int(img["height"]), int(img["width"]), where)
    if segm is None:
        raise DataError(f"{where}: 'segmentation' is null")
    # bbox dropped so that areas come from the masks (detectron2 does the same for segm)
    return {"image_id": image_id, "category_id": cat_id, "score": score, "segmentation": segm}


def check_score(score: Any, where: str) -> float:
    """A finite number, else DataError."""
    if isinstance(score, bool) or not isinstance(score, (int, float, np.number)) or not math.isfinite(score):
        raise DataError(f"{where}: 'score' must be a finite number, got {score!r}")
    return float(score)


def as_id(x: Any) -> int | str | None:
    """An id usable as a key (numpy ints become int); None for anything else (lists, floats)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, np.integer):
        return int(x)
    return x if isinstance(x, (int, str)) else None


# -- evaluation ---------------------------------------------------------------------------------
def _backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise MobileInstError(f"unknown evaluation backend {backend!r}; "
                              f"choose one of {', '.join(BACKENDS)}")
    if backend == "pycocotools":
        return backend
    try:
        import faster_coco_eval  # noqa: F401
        return "faster-coco-eval"
    except ImportError:
        if backend == "faster":
            raise MobileInstError("backend 'faster' needs faster-coco-eval: "
                                  "pip install faster-coco-eval") from None
        return "pycocotools"


def _run_cocoeval(coco, records: list[dict], iou_type: str, backend: str, verbose: bool):
    """Run evaluate/accumulate/summarize; returns the evaluator (``.stats``, ``.eval``)."""
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        if backend == "faster-coco-eval":
            from faster_coco_eval import COCO as FasterCOCO, COCOeval_faster

            say = print if verbose else (lambda *args, **kwargs: None)
            gt = FasterCOCO(coco.dataset, print_function=say)
            dt = gt.loadRes([dict(r) for r in records]) if records else _empty_results(FasterCOCO, coco)
            ev = COCOeval_faster(gt, dt, iou_type, print_function=say)
        else:
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval
            dt = coco.loadRes([dict(r) for r in records]) if records else _empty_results(COCO, coco)
            ev = COCOeval(coco, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _empty_results(api_cls, coco):
    """A results api with no detections (what ``loadRes([])`` should give)."""
    res = api_cls()
    res.dataset = {"images": list(coco.dataset["images"]), "categories": list(coco.dataset["categories"]),
                   "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def evaluate_coco(gt, results, *, backend: str = "auto", boundary: bool = False,
                  verbose: bool = False) -> CocoMetrics:
    """Mask AP of ``results`` against ``gt``.

    Args:
        gt: a COCO annotation json path, or a pycocotools ``COCO`` object.
        results: a results json path, or the list of records (see the module docstring).
        backend: "auto" (faster-coco-eval when installed, else pycocotools), "pycocotools" or
            "faster" (faster-coco-eval, required). Both give the same numbers.
        boundary: also compute boundary AP (needs faster-coco-eval), stored in ``.boundary``.
        verbose: let the COCO tools print their usual summary.
    Raises:
        DataError: naming the file, for unreadable/invalid ground truth or results.
    """
    coco, _ = _load_gt(gt)
    records, name = _load_results(results, coco)
    used = _backend(backend)
    if boundary:
        _backend("faster")  # boundary AP exists only in faster-coco-eval: an install hint if missing
    if not records:
        log.warning("%s: no detections; AP and AR are 0 wherever there is ground truth", name)
    ev = _run_cocoeval(coco, records, "segm", used, verbose)
    metrics = CocoMetrics.from_stats(ev.stats, per_category=per_category_ap(ev, coco.cats), backend=used)
    if boundary:
        ev_b = _run_cocoeval(coco, records, "boundary", "faster-coco-eval", verbose)
        metrics.boundary = {k: float(v) for k, v in zip(STAT_NAMES, ev_b.stats)}
    return metrics


__all__ = ["APMetrics", "CocoMetrics", "STAT_NAMES", "evaluate_coco",
           "instances_to_coco_json", "per_category_ap", "read_json", "segmentation_to_rle"]
