"""Sweep of the demo's training recipe on the synthetic set: mask AP, and where it is lost.

    python benchmarks/demo_sweep.py [--runs preset pool8 ...] [--jobs 2] [--iters N] [--out-dir runs/demo_sweep]
        [--max-objects M] [--object-size LO HI]

Each named run below is the demo preset (mobileinst/configs/demo.yaml) with a few options changed,
trained from scratch on `mobileinst data synth` (400 train / 50 val images, seed 0). --jobs runs
that many at once, each on one thread (two one-thread runs finish sooner than two two-thread runs
in a row on two cores). For every run it prints:
- mask AP (pycocotools on `mobileinst val`'s results json), AP50, AP75;
- class-agnostic mask AP (COCOeval with useCats = 0): what AP would be with every label right;
- "found": the fraction of ground-truth instances whose best-overlapping prediction has mask
  IoU > 0.5, and "label right": the fraction whose best-overlapping prediction (any IoU) has the
  right class.
Numbers vary from run to run by several AP points (the same recipe with another seed moved AP
from 0.28 to 0.15 here), so compare recipes over more than one seed before choosing.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> TrainConfig options over the demo preset
MC = {"mask_pooled_cls": True}  # the preset's model options: local_pool 4 + this
RUNS = {
    "preset": {},
    "no-maskcls": {"model_overrides": {"local_pool": 4}},
    "batch8-pool8": {"batch": 8, "iters": 450, "model_overrides": {"local_pool": 8, **MC}},
    "pool8": {"model_overrides": {"local_pool": 8, **MC}},
    "pool2": {"model_overrides": {"local_pool": 2, **MC}},
    "coords": {"model_overrides": {"local_pool": 4, "mask_coords": True, **MC}},
    "lr1e-3": {"lr": 1e-3},
    "queries100": {"num_queries": 100},
    "seed1": {"seed": 1},
    "ema": {"ema": True, "ema_decay": 0.995},
    "imgsz320": {"imgsz": 320, "iters": 600, "eval_interval": 300},
}


def train_one(name: str, options: dict, data: Path, out: Path, threads: int) -> Path:
    """Train one run in its own process (its own thread count); return its best.pt."""
    run_dir = out / name
    cfg = {"data": str(data), "out_dir": str(run_dir), "exist_ok": True, **options}  # a rerun replaces
    code = ("import json, sys; from importlib import resources; from mobileinst.train.config import TrainConfig; "
            "from mobileinst.train.engine import train; "
            "preset = resources.files('mobileinst') / 'configs' / 'demo.yaml'; "
            "train(TrainConfig.from_yaml(preset, **json.loads(sys.argv[1])))")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    with open(out / f"{name}.log", "w") as log:
        subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], env=env, stdout=log,
                       stderr=subprocess.STDOUT, check=True)
    return run_dir / "weights" / "best.pt"


def diagnose(gt_json: Path, results_json: Path) -> dict:
    """Mask AP, class-agnostic AP, and per-GT 'found' / 'label right' rates."""
    import numpy as np
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
        dt = gt.loadRes(str(results_json))
        stats = {}
        for use_cats in (1, 0):
            ev = COCOeval(gt, dt, "segm")
            ev.params.useCats = use_cats
            ev.evaluate(), ev.accumulate(), ev.summarize()
            stats[use_cats] = ev.stats
    by_image = collections.defaultdict(list)
    for r in json.loads(results_json.read_text()):
        by_image[r["image_id"]].append(r)
    found, right = [], []
    for ann in gt.dataset["annotations"]:
        dets = by_image[ann["image_id"]]
        if not dets:
            found.append(False)
            continue
        ious = mask_utils.iou([d["segmentation"] for d in dets], [gt.annToRLE(ann)], [0])[:, 0]
        best = int(np.argmax(ious))
        found.append(ious[best] > 0.5)
        right.append(dets[best]["category_id"] == ann["category_id"])
    return {"AP": stats[1][0], "AP50": stats[1][1], "AP75": stats[1][2], "AP_agnostic": stats[0][0],
            "found": float(np.mean(found)), "label_right": float(np.mean(right)) if right else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out-dir", default="runs/demo_sweep")
    ap.add_argument("--iters", type=int, default=None, help="override every run's iterations")
    ap.add_argument("--max-objects", type=int, default=None, help="synthetic set: objects per image "
                    "(default: the generator's)")
    ap.add_argument("--object-size", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                    help="synthetic set: object diameters as fractions of the short side")
    args = ap.parse_args()

    from mobileinst.data.synthetic import make_synthetic_coco
    from mobileinst.evaluate.evaluator import validate
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = {}  # the synthetic set's difficulty, the generator's defaults unless given
    if args.max_objects:
        shape["max_objects"] = args.max_objects
    if args.object_size:
        shape["object_size"] = tuple(args.object_size)
    data = make_synthetic_coco(out / "data", n_train=400, n_val=50, seed=0, **shape)
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    runs = {n: {**o, **({"iters": args.iters, "eval_interval": args.iters} if args.iters else {})}
            for n, o in RUNS.items()}
    with ThreadPoolExecutor(args.jobs) as pool:
        weights = dict(zip(args.runs, pool.map(
            lambda n: train_one(n, runs[n], data, out, threads), args.runs)))
    print("| run | options | AP | AP50 | AP75 | class-agnostic AP | found | label right |")
    print("|---|---|---|---|---|---|---|---|")
    for name, w in weights.items():
        results = out / f"{name}_val.json"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            validate(str(w), str(data), out=str(results), workers=0)
        d = diagnose(data.parent / "annotations" / "instances_val.json", results)
        print(f"| {name} | {json.dumps(runs[name]) if runs[name] else 'demo.yaml'} | {d['AP']:.3f} | "
              f"{d['AP50']:.3f} | {d['AP75']:.3f} | {d['AP_agnostic']:.3f} | {d['found']:.2f} | "
              f"{d['label_right']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
