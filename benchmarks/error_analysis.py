"""Where a checkpoint's mask AP goes: class, mask quality or ranking.

    .venv/bin/python benchmarks/error_analysis.py --weights RUN/weights/best.pt --data DATA.yaml \
        [--imgsz 256 288 ...] [--score-exponents 0.5,0.5 1,1 0.5,1]

On the DATA file's val split (`mobileinst val`'s records, every class of a query scored):
- AP per class (as `val`) and class-agnostic (every category id set to one): how much is lost to
  the wrong class;
- for every ground-truth instance (crowds skipped), the best mask IoU of any detection of any class:
  the share reaching 0.5 / 0.75 / 0.9 and the median, by COCO size range: how good the best mask
  the model made for it is, whatever its score;
- AP with each detection's score multiplied by its true IoU with the best ground truth of its class
  (an oracle no model has): how much a score that knew the mask's quality would add by ranking
  the same masks better;
- with --imgsz, `val` of the same checkpoint at other evaluation sizes;
- with --score-exponents a,b ..., `val` with the query score p_cls^a * p_obj^b (the model's is
  0.5,0.5: sqrt(p_cls * p_obj)) times maskness, to see whether the objectness ranks better
  weighted differently;
- with --oracle-objectness, the model's own decode with each query's objectness replaced by its
  mask's true IoU with the best ground truth (any class): what a perfect quality head could add
  through the score the decode already uses (sqrt(p_cls * p_obj) x maskness);
- with --precise-bn N, `val` after the trained (non-backbone) BatchNorms' running statistics are
  recomputed over N training batches in training mode (detectron2's PreciseBN): whether the
  statistics gathered over batches of 4 cost AP.
Prints one table per part. Every AP is `mobileinst val`'s evaluator (`evaluate_coco`: ground-truth
areas from the masks) on the records `val` writes.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning_curve import AGNOSTIC_ID, agnostic_gt  # noqa: E402

from mobileinst.checkpoint import model_from_checkpoint, save_checkpoint  # noqa: E402
from mobileinst.data.coco import CocoInstances  # noqa: E402
from mobileinst.data.config import load_data_config  # noqa: E402
from mobileinst.data.loader import collate  # noqa: E402
from mobileinst.data.transforms import EvalTransform  # noqa: E402
from mobileinst.evaluate.coco_eval import evaluate_coco, instances_to_coco_json  # noqa: E402
from mobileinst.models.postprocess import (InferenceConfig, binary_masks, decode_instances,  # noqa: E402
                                           evaluation_config, select_instances)
from mobileinst.train.config import TrainConfig  # noqa: E402
from mobileinst.train.data import build_train_loader  # noqa: E402
from mobileinst.evaluate.evaluator import validate  # noqa: E402

SIZES = {"small": (0, 32 ** 2), "medium": (32 ** 2, 96 ** 2), "large": (96 ** 2, float("inf"))}


def coco_stats(gt_json: Path, records: list[dict]) -> list[float]:
    """AP, AP50, AP75, APs, APm, APl of `records` by the evaluator of `mobileinst val`."""
    m = evaluate_coco(gt_json, copy.deepcopy(records))
    return [m.AP, m.AP50, m.AP75, m.APs, m.APm, m.APl]


def best_iou_per_instance(gt: COCO, records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(best IoU of any detection, area) of every non-crowd ground-truth instance."""
    by_image: dict[int, list[dict]] = {}
    for r in records:
        by_image.setdefault(r["image_id"], []).append(r)
    best, areas = [], []
    for ann in gt.dataset["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        dets = by_image.get(ann["image_id"], [])
        ious = mask_utils.iou([d["segmentation"] for d in dets], [gt.annToRLE(ann)], [0]) if dets else []
        best.append(float(np.max(ious)) if len(ious) else 0.0)
        areas.append(float(mask_utils.area(gt.annToRLE(ann))))  # as the evaluator: from the mask
    return np.array(best), np.array(areas)


def oracle_scored(gt: COCO, records: list[dict]) -> list[dict]:
    """The records with score x (IoU with the best ground truth of the record's class)."""
    anns: dict[tuple[int, int], list] = {}
    for a in gt.dataset["annotations"]:
        if not a.get("iscrowd", 0):
            anns.setdefault((a["image_id"], a["category_id"]), []).append(gt.annToRLE(a))
    out = []
    for r in records:
        rles = anns.get((r["image_id"], r["category_id"]), [])
        iou = float(np.max(mask_utils.iou([r["segmentation"]], rles, [0] * len(rles)))) if rles else 0.0
        out.append({**r, "score": r["score"] * iou})
    return out


def val_records(weights: str, data: str, imgsz: int | None = None) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        out = Path(tmp) / "results.json"
        validate(weights, data, out=str(out), imgsz=imgsz, workers=0, device="cpu")
        return json.loads(out.read_text())


def with_score_exponents(a: float, b: float):
    """A context in which the decode scores a query p_cls^a * p_obj^b (postprocess.class_scores)."""
    import mobileinst.models.postprocess as post

    @contextlib.contextmanager
    def patched():
        original = post.class_scores
        post.class_scores = lambda logits, obj: logits.sigmoid() ** a * obj.sigmoid() ** b
        try:
            yield
        finally:
            post.class_scores = original
    return patched()


@torch.no_grad()
def oracle_objectness_records(weights: str, data: str) -> list[dict]:
    """`val`'s records (every class of a query) from the model's own decode, with each query's
    objectness logit set to logit(its mask's best true IoU with any non-crowd ground truth)."""
    model, ckpt = model_from_checkpoint(weights)
    split = load_data_config(data).val
    dataset = CocoInstances(split.json, split.images, EvalTransform(ckpt["train_config"]["imgsz"]))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(split.json))
    ranking, up = evaluation_config(model.inference), model.cfg.mask_upsample
    every = InferenceConfig(score_threshold=-1.0, max_detections=10 ** 6)  # all N queries, in order
    records: list[dict] = []
    for images, targets in DataLoader(dataset, batch_size=4, collate_fn=collate):
        logits, obj, kernels, feats = model.inference_outputs(images)
        padded = tuple(images.shape[-2:])
        for i, t in enumerate(targets):
            size, orig = tuple(t["size"]), tuple(t["orig_size"])
            picked = select_instances(logits[i:i + 1], obj[i:i + 1], kernels[i:i + 1], feats[i:i + 1], every, up)
            masks = binary_masks(picked["mask_prob"][0], padded, size, orig, every.mask_threshold)
            anns = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=int(t["image_id"]))) if not a.get("iscrowd", 0)]
            iou = torch.zeros(obj.shape[1])
            if anns:
                rles = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
                best = mask_utils.iou(rles, [gt.annToRLE(a) for a in anns], [0] * len(anns)).max(1)
                iou[picked["index"][0]] = torch.from_numpy(np.asarray(best, dtype=np.float32))
            oracle = torch.logit(iou.clamp(1e-4, 1 - 1e-4))[:, None]  # (N, 1)
            out = decode_instances(logits[i], oracle, kernels[i], feats[i], padded, size, orig, ranking, up)
            records += instances_to_coco_json(int(t["image_id"]), out["labels"].numpy(), out["scores"].numpy(),
                                              out["masks"].numpy(), dataset.cat_ids)
    return records


@torch.no_grad()
def precise_bn_weights(weights: str, data: str, batches: int, out: Path) -> Path:
    """A copy of `weights` (its EMA model) whose trained BatchNorms (outside the backbone, whose
    BatchNorms the recipes freeze) hold statistics averaged over `batches` training batches of
    the run's own loader, the network in training mode; written to `out`."""
    model, ckpt = model_from_checkpoint(weights)
    cfg = TrainConfig.from_dict({**ckpt["train_config"], "data": data, "workers": 0})
    loader, _ = build_train_loader(cfg, 0, 1)
    norms = [m for name, m in model.named_modules()
             if isinstance(m, torch.nn.BatchNorm2d) and not name.startswith("backbone.")]
    model.train()
    for m in model.backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    for i, (images, _) in enumerate(loader):
        if i == batches:
            break
        model.forward_raw(images)
    state = ckpt["ema"]["module"] if ckpt.get("ema") else ckpt["model"]
    state.update(model.state_dict())
    save_checkpoint(ckpt, out)
    return out


def row(name: str, stats: list[float]) -> str:
    return f"| {name} | " + " | ".join(f"{v:.3f}" for v in stats) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--imgsz", type=int, nargs="*", default=[], help="other evaluation sizes")
    ap.add_argument("--score-exponents", nargs="*", default=[], help="a,b pairs: p_cls^a * p_obj^b")
    ap.add_argument("--oracle-objectness", action="store_true", help="objectness = the true mask IoU")
    ap.add_argument("--precise-bn", type=int, default=0, metavar="N", help="recompute BN stats over N batches")
    args = ap.parse_args()
    gt_json = load_data_config(args.data).val.json
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
    records = val_records(args.weights, args.data)
    tmp = Path(tempfile.mkdtemp(prefix="error_analysis_"))
    gt_agnostic = agnostic_gt(gt_json, tmp / "val_agnostic.json")

    head = "| records | AP | AP50 | AP75 | APs | APm | APl |\n|---|---:|---:|---:|---:|---:|---:|"
    print(f"{args.weights} on {args.data} (val split, {len(records)} records)\n\n{head}")
    print(row("as `val` scores them", coco_stats(gt_json, records)))
    print(row("class-agnostic", coco_stats(gt_agnostic, [{**r, "category_id": AGNOSTIC_ID} for r in records])))
    print(row("score x true IoU (oracle)", coco_stats(gt_json, oracle_scored(gt, records))))
    for a_b in args.score_exponents:
        a, b = (float(x) for x in a_b.split(","))
        with with_score_exponents(a, b):
            print(row(f"p_cls^{a:g} * p_obj^{b:g}", coco_stats(gt_json, val_records(args.weights, args.data))))
    for size in args.imgsz:
        print(row(f"val at imgsz {size}", coco_stats(gt_json, val_records(args.weights, args.data, size))))
    if args.oracle_objectness:
        print(row("objectness = true mask IoU (oracle, model's decode)",
                  coco_stats(gt_json, oracle_objectness_records(args.weights, args.data))))
    if args.precise_bn:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            pbn = precise_bn_weights(args.weights, args.data, args.precise_bn, tmp / "precise_bn.pt")
        print(row(f"BN statistics recomputed over {args.precise_bn} batches",
                  coco_stats(gt_json, val_records(str(pbn), args.data))))

    best, areas = best_iou_per_instance(gt, records)
    print("\n| instances | n | best IoU >= 0.5 | >= 0.75 | >= 0.9 | median |\n|---|---:|---:|---:|---:|---:|")
    for name, (lo, hi) in {"all": (0, float("inf")), **SIZES}.items():
        b = best[(areas >= lo) & (areas < hi)]
        if len(b):
            print(f"| {name} | {len(b)} | {(b >= 0.5).mean():.3f} | {(b >= 0.75).mean():.3f} | "
                  f"{(b >= 0.9).mean():.3f} | {np.median(b):.3f} |")


if __name__ == "__main__":
    main()
