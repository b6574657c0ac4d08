"""The offline demo behind `make demo`: synthetic data -> train -> val -> predict -> track videos.

Everything runs on the CPU from data the project generates; nothing is downloaded.
"""
from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from .data.synthetic import make_synthetic_coco
from .evaluate.coco_eval import evaluate_coco
from .evaluate.evaluator import validate
from .predict import predict_source
from .train.config import TrainConfig
from .train.engine import train


def demo_config(data_yaml: Path, out_dir: Path, fast: bool) -> TrainConfig:
    preset = resources.files("mobileinst") / "configs" / "demo.yaml"
    cfg = TrainConfig.from_yaml(preset, data=str(data_yaml), out_dir=str(out_dir))
    if fast:  # a smoke test of every step, not a model worth anything
        cfg.iters, cfg.eval_interval = 4, 4
    return cfg


def run_demo(out: str | Path = "runs/demo", fast: bool = False) -> dict:
    out = Path(out)
    t0 = time.time()
    step = lambda msg: print(f"\n[{time.time() - t0:6.1f} s] {msg}", flush=True)  # noqa: E731

    step("1/5 writing the synthetic COCO-format set")
    n = (16, 8) if fast else (400, 50)
    data = make_synthetic_coco(out / "data", n_train=n[0], n_val=n[1], seed=0)
    print(f"wrote {data}")

    cfg = demo_config(data, out / "train", fast)
    step(f"2/5 training {cfg.model} from scratch for {cfg.iters} iterations at {cfg.imgsz} px")
    train(cfg)
    weights = out / "train" / "weights" / "best.pt"

    step("3/5 evaluating best.pt on the val split")
    results = out / "val_results.json"
    metrics = validate(str(weights), str(data), out=str(results), workers=cfg.workers)
    print(metrics.format_table())
    gt = data.parent / "annotations" / "instances_val.json"
    ap = evaluate_coco(gt, results).AP  # pycocotools on the saved json, as a user would

    step("4/5 predicting on the val images")
    summary = predict_source(weights, data.parent / "val", out / "predict")

    step("5/5 tracking synthetic videos with the image model (kernel association, reuse K=1)")
    video = track_demo(weights, out, fast)

    step("done")
    print(f"mask AP on the synthetic val split (pycocotools, {results}): {ap:.4f}")
    print(f"overlays: {summary['out_dir']}/overlays  predictions: {summary['out_dir']}/predictions.json")
    print(f"video mask AP on {video['videos']} synthetic val clips (YouTube-VIS, {video['results']}): "
          f"{video['AP']:.4f}")
    print(f"tracked overlay video: {video['overlay']}")
    print(f"run folder: {out / 'train'} (weights, results.csv, loss.png, ap.png, train.log)")
    return {"AP": ap, "video_AP": video["AP"], "seconds": time.time() - t0, "out": str(out)}


def track_demo(weights: Path, out: Path, fast: bool) -> dict:
    """Write a few synthetic YouTube-VIS val clips (the image set's shapes, moving), score the
    tracker's video AP on them and write one clip's overlay mp4 (seconds on a CPU)."""
    from .data.synthetic_video import make_synthetic_ytvis
    from .track.run import track_source

    n = 2 if fast else 4
    data = make_synthetic_ytvis(out / "video_data", n_train=0, n_val=n, seed=0)
    results = out / "video_results.json"
    metrics = validate(str(weights), str(data), out=str(results), workers=0)
    print(metrics.format_table())
    summary = track_source(weights, data.parent / "val" / "JPEGImages" / "val_0000", out / "track")
    return {"AP": metrics.AP, "videos": n, "results": str(results), "overlay": summary["video"]}
