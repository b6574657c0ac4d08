"""The offline demo behind `make demo`: hard synthetic data -> train -> val -> predict -> track a video.

The model is what a user gets on their own small set: the paper's MobileNetV2 variant from
torchvision's ImageNet weights (installed by `make setup`), trained with the CPU recipe
(configs/hard_cpu.yaml) on the hard synthetic set (data/synthetic_hard.py), which no recipe was
tuned on before it was written. Everything runs on the CPU; nothing is downloaded.

The demo folder may be the user's (issue 23): it is locked while the demo runs (a second demo into
it is refused), and before step 1 it is checked that no step would replace a file mobileinst did
not write: data/, predict/ and video_data/ are written through `utils.write_new_files` (staged,
then moved in and recorded in each folder's manifest), val_results.json and the track's files are
claimed in their folder's manifest (`utils.claim_files`), train/ is a run folder (`train`'s own
check: only a run's own files are replaced). A rerun replaces the demo's own files.
"""
from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from .data.synthetic_hard import make_hard_coco
from .data.synthetic_video import make_synthetic_ytvis
from .evaluate.coco_eval import evaluate_coco
from .evaluate.evaluator import validate
from .predict import predict_source
from .train.config import TrainConfig
from .track.run import output_names, track_source
from .train.engine import train
from .utils import claim_files, folder_lock, refuse_foreign_files, write_new_files

DEMO_OUT = "demo folder (--out)"
STAGED = ("data", "predict", "video_data")  # written by write_new_files
CLIP = "val_0000"  # the tracked clip: track_demo's


def demo_config(data_yaml: Path, out_dir: Path, fast: bool, seed: int = 0) -> TrainConfig:
    preset = resources.files("mobileinst") / "configs" / "hard_cpu.yaml"
    # exist_ok: the demo owns its folder, so running it again replaces its previous run
    cfg = TrainConfig.from_yaml(preset, data=str(data_yaml), out_dir=str(out_dir), seed=seed,
                                exist_ok=True)
    if fast:  # a smoke test of every step, not a model worth anything
        cfg.time, cfg.iters, cfg.eval_interval = 0.0, 4, 4
    return cfg


def run_demo(out: str | Path = "runs/demo", fast: bool = False, seed: int = 0) -> dict:
    """The five steps; `seed` seeds the training (the data set is always the same). `out` is
    locked and checked first (module docstring): a refusal comes before any work."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, DEMO_OUT):
        for sub in STAGED:  # checked here too: their refusal would come after minutes of work
            refuse_foreign_files(out / sub, f"demo's {sub} folder")
        claim_files(out, ["val_results.json"], DEMO_OUT)
        claim_files(out / "track", output_names(CLIP, True), "demo's track folder")
        return _run_demo(out, fast, seed)


def _run_demo(out: Path, fast: bool, seed: int) -> dict:
    t0 = time.time()
    step = lambda msg: print(f"\n[{time.time() - t0:6.1f} s] {msg}", flush=True)  # noqa: E731

    step("1/5 writing the hard synthetic COCO-format set (data synth --preset hard)")
    n = (16, 8) if fast else (400, 100)
    data = write_new_files(out / "data", lambda d: make_hard_coco(d, n_train=n[0], n_val=n[1], seed=0),
                           what="demo's data folder")
    print(f"wrote {data}")

    cfg = demo_config(data, out / "train", fast, seed)
    length = f"{cfg.time:g} minutes" if cfg.time else f"{cfg.iters} iterations"
    step(f"2/5 training {cfg.model} from ImageNet weights for {length} at {cfg.imgsz} px")
    train(cfg)
    weights = out / "train" / "weights" / "best.pt"

    step("3/5 evaluating best.pt on the val split")
    results = out / "val_results.json"
    metrics = validate(str(weights), str(data), out=str(results), workers=cfg.workers)
    print(metrics.format_table())
    gt = data.parent / "annotations" / "instances_val.json"
    ap = evaluate_coco(gt, results).AP  # pycocotools on the saved json, as a user would

    step("4/5 predicting on the val images")
    preds = write_new_files(out / "predict", lambda d: predict_into(weights, data.parent / "val", d),
                            what="demo's predict folder")

    step("5/5 tracking a synthetic video with the image model (kernel association, reuse K=1)")
    video = track_demo(weights, out)

    step("done")
    print(f"mask AP on the hard synthetic val split (pycocotools, {results}): {ap:.4f}")
    print(f"overlays: {preds.parent / 'overlays'}  predictions: {preds}")
    print(f"tracked overlay video: {video} (video AP of the tracker: benchmarks/track_eval.py)")
    print(f"run folder: {out / 'train'} (weights, results.csv, loss.png, ap.png, train.log)")
    return {"AP": ap, "seconds": time.time() - t0, "out": str(out)}


def predict_into(weights: Path, source: Path, out: Path) -> Path:
    """predict_source into `out` (write_new_files' staging folder); its predictions.json."""
    return Path(predict_source(weights, source, out)["out_dir"]) / "predictions.json"


def track_demo(weights: Path, out: Path) -> str:
    """Track one synthetic clip of moving shapes and write its overlay mp4 (seconds on a CPU).
    The clip's shapes are the video set's (data/synthetic_video.py), not the hard set's classes,
    so no video AP is scored here."""

    data = write_new_files(out / "video_data", lambda d: make_synthetic_ytvis(d, n_train=0, n_val=1, seed=0),
                           what="demo's video_data folder")
    return str(track_source(weights, data.parent / "val" / "JPEGImages" / CLIP, out / "track")["video"])
