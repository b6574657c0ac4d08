"""Accuracy per wall-clock minute on this CPU: MobileInst vs YOLO-seg, same data, same cores.

    make bench-peers && .venv/bin/python benchmarks/learning_curve.py --minutes 5 10 15
    .venv/bin/python benchmarks/learning_curve.py --models mobileinst-topformer-t-scratch \
        --n-train 16 --n-val 4 --minutes 0.2 0.4                      # a smoke run
    .venv/bin/python benchmarks/learning_curve.py --self-check           # the YOLO labels' AP

Method. Each model trains once, in its own process (torch.set_num_threads and OMP_NUM_THREADS
at --threads, DataLoader --workers), for the largest budget of wall-clock training time; a
checkpoint is written each time the training clock passes a budget (writing it is not counted)
and every checkpoint is scored afterwards (prediction and scoring are not counted either). The
clock starts after the set-up (model, data sets) and counts data loading and optimisation steps.

- mobileinst-mnv2-imagenet: MobileNetV2 with ImageNet weights; mobileinst-topformer-t-scratch:
  TopFormer-T from random weights; both with the --mobileinst-cfg preset (default `hard_cpu`),
  trained by `mobileinst.train.engine.Trainer` with `time` = the largest budget (`mobileinst train
  --time`): its lr schedule (the preset's: warm-up, then linear decay to zero) runs on the
  training clock's progress, so it ends where the run does, as ultralytics' `time` refits YOLO's
  after every epoch (below); no in-run evaluation. A step callback saves the checkpoint of each
  smaller budget when the clock passes it (saving is off the clock).
  Scored with `mobileinst.evaluate.evaluator.validate` (the checkpoint's EMA weights if any).
- yolo11n-seg, yolo26n-seg: built from their YAML (random weights: nothing is downloaded),
  trained by ultralytics' own trainer with `time` = the largest budget: it re-estimates the
  number of epochs after every epoch to fill the time, and rebuilds its lr schedule, warm-up and
  close_mosaic on that estimate. pretrained=False, amp=False, plots=False, val=False; the run is
  ended after the last snapshot (before its closing validations). Data: the COCO set converted
  to YOLO-seg labels (`yolo_peer.write_yolo_dataset`: one polygon per instance from its mask,
  holes and parts joined by zero-width bridges, crowds skipped, class k = the k-th smallest
  category id). Predictions on every val image at conf 0.001, max_det 100, masks at the original
  image size (retina_masks), written as COCO RLE records with the real category ids.
- Every results file is scored by the same call, `mobileinst.evaluate.coco_eval.evaluate_coco`:
  mask AP and AP50, and class-agnostic AP (every category id set to one, in the ground truth and
  in the results).

Image size: --imgsz (default 256) for every model. For MobileInst it is the short side (it
replaces the preset's `imgsz`; long side capped at 4/3 of it); ultralytics letterboxes the LONG side to its
imgsz, so at the same number a YOLO model sees each image at a smaller scale: 0.75-1x MobileInst's
(0.85x on average on the hard set's 256-448 px sides). --yolo-imgsz sets YOLO's alone.
Data: --data DATA.yaml (COCO json + image folders, `train`/`val`), or by default the hard
synthetic set (`mobileinst.data.synthetic_hard`, seed 0) generated into --out.
Output: a table (model, budget, training seconds, iterations, images seen, epochs, AP, AP50,
agnostic AP), and learning_curve.csv / learning_curve.json (with the machine) in --out.
Iterations are forward/backward passes of one batch: MobileInst's preset batch (an optimiser step
each), YOLO's --yolo-batch (ultralytics steps its optimiser every 64 / batch of them, `nbs`).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MOBILEINST = {"mobileinst-mnv2-imagenet": ("mobileinst-mobilenetv2", "imagenet"),
              "mobileinst-topformer-t-scratch": ("mobileinst-topformer-t", "")}
YOLO = {"yolo11n-seg": "yolo11n-seg.yaml", "yolo26n-seg": "yolo26n-seg.yaml"}
AGNOSTIC_ID = 1
FIELDS = ["model", "minutes", "train_s", "iterations", "batch", "images", "epochs", "torch_threads",
          "AP", "AP50", "AP_agnostic", "AP50_agnostic"]


# -- MobileInst, in the worker -------------------------------------------------------------------
def mobileinst_config(job: dict):
    from mobileinst.train.config import TrainConfig
    model, weights = MOBILEINST[job["model"]]
    return TrainConfig.from_yaml(job["cfg"], data=job["data"], out_dir=job["out"], model=model,
                                 backbone_weights=weights, imgsz=job["imgsz"], seed=job["seed"],
                                 workers=job["workers"], device="cpu", exist_ok=True,  # a rerun replaces
                                 time=max(job["minutes"]), eval_interval=0)


def train_to_budgets(trainer, minutes: list[float]) -> list[dict]:
    """One run of the largest budget (`time` in the config: the trainer fits its lr schedule to
    it and stops there); a checkpoint is saved each time the training clock passes a budget, from
    the trainer's step callback (off the clock)."""
    import torch
    pending, points = sorted(minutes), []

    def snapshot(t) -> None:
        while pending and t.elapsed >= 60 * pending[0] - 1e-6:
            m = pending.pop(0)
            t.save(f"budget-{m:g}min.pt")
            points.append({"minutes": m, "seconds": round(t.elapsed, 1), "iterations": t.iteration,
                           "epochs": round(t.iteration / t.bpe, 3),
                           "torch_threads": torch.get_num_threads(),
                           "weights": str(t.out / "weights" / f"budget-{m:g}min.pt")})

    trainer.add_callback("on_step_end", snapshot)
    trainer.train()
    return points


def run_mobileinst(job: dict) -> list[dict]:
    from mobileinst.evaluate.evaluator import validate
    from mobileinst.train.engine import Trainer
    trainer = Trainer(mobileinst_config(job))
    points = train_to_budgets(trainer, job["minutes"])
    for p in points:
        p.update(batch=trainer.cfg.batch)
        p["results"] = str(Path(job["out"]) / f"results-{p['minutes']:g}min.json")
        validate(p["weights"], job["data"], out=p["results"], workers=0, device="cpu")
    return points


# -- YOLO, in the worker -------------------------------------------------------------------------
def run_yolo(job: dict) -> list[dict]:
    import yolo_peer
    from mobileinst.utils import write_json
    yolo_peer.prepare_ultralytics(job["threads"], Path(job["out"]) / "ultralytics-settings")
    points = yolo_peer.train(job)
    for p in points:
        p.update(batch=job["batch"])
        p["results"] = str(Path(job["out"]) / f"results-{p['minutes']:g}min.json")
        write_json(p["results"], yolo_peer.predict_records(p["weights"], job["data"], job["imgsz"]))
    return points


def worker(job: dict) -> list[dict]:
    import torch
    torch.set_num_threads(job["threads"])
    return run_yolo(job) if job["model"] in YOLO else run_mobileinst(job)


def spawn(job: dict) -> list[dict]:
    """One model's training and predictions in a fresh process; its output goes to worker.log."""
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "MKL_NUM_THREADS": str(job["threads"]),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(out / "worker.log", "w") as log:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = (out / "worker.log").read_text().strip().splitlines()[-1:] or ["?"]
        raise RuntimeError(f"{job['model']} failed ({out / 'worker.log'}): {tail[0][:300]}")
    return json.loads((out / "points.json").read_text())


# -- scoring -------------------------------------------------------------------------------------
def agnostic_gt(gt_json: Path, out: Path) -> Path:
    """A copy of the ground truth with every category merged into one (id AGNOSTIC_ID)."""
    data = json.loads(gt_json.read_text())
    data["categories"] = [{"id": AGNOSTIC_ID, "name": "object"}]
    data["annotations"] = [{**a, "category_id": AGNOSTIC_ID} for a in data["annotations"]]
    out.write_text(json.dumps(data))
    return out


def score(gt_json: Path, gt_agnostic: Path, results: str | Path | list) -> dict[str, float]:
    """The shared scorer: mask AP/AP50, and the same class-agnostic."""
    from mobileinst.evaluate.coco_eval import evaluate_coco, read_json
    records = read_json(results, "results") if isinstance(results, (str, Path)) else results
    m = evaluate_coco(gt_json, records)
    a = evaluate_coco(gt_agnostic, [{**r, "category_id": AGNOSTIC_ID} for r in records])
    return {"AP": m.AP, "AP50": m.AP50, "AP_agnostic": a.AP, "AP50_agnostic": a.AP50}


# -- main ----------------------------------------------------------------------------------------
def machine(threads: int) -> dict[str, str | int]:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        ultralytics = metadata.version("ultralytics")
    except metadata.PackageNotFoundError:
        ultralytics = "not installed"
    return {"cpu": cpu, "cores": os.cpu_count() or 0, "threads": threads, "torch": torch.__version__,
            "ultralytics": ultralytics, "python": platform.python_version()}


def dataset(args, out: Path) -> Path:
    """--data, or the hard synthetic set generated (once) into out."""
    if args.data:
        return Path(args.data).resolve()
    root = out / f"hard-{args.n_train}-{args.n_val}"
    if not (root / "data.yaml").is_file():
        from mobileinst.data.synthetic_hard import make_hard_coco
        make_hard_coco(root, n_train=args.n_train, n_val=args.n_val, seed=0)
    return (root / "data.yaml").resolve()


def jobs(args, data: Path, yolo_data: Path | None, out: Path) -> list[dict]:
    common = {"data": str(data), "minutes": args.minutes, "threads": args.threads,
              "workers": args.workers, "seed": args.seed}
    result = []
    for name in args.models:
        job = {**common, "model": name, "out": str((out / name).resolve())}
        if name in YOLO:
            job.update(cfg=YOLO[name], yolo_data=str(yolo_data), batch=args.yolo_batch,
                       imgsz=args.yolo_imgsz or args.imgsz)
        else:
            job.update(cfg=str(args.mobileinst_cfg), imgsz=args.imgsz)
        result.append(job)
    return result


def table_row(r: dict) -> str:
    cells = [r["model"], f"{r['minutes']:g}", f"{r['train_s']:.0f}", r["iterations"], r["batch"],
             r["images"], f"{r['epochs']:.2f}", f"{r['AP']:.4f}", f"{r['AP50']:.4f}",
             f"{r['AP_agnostic']:.4f}", f"{r['AP50_agnostic']:.4f}"]
    return "| " + " | ".join(map(str, cells)) + " |"


def self_check(data: Path, out: Path) -> None:
    """Score the YOLO val labels, read back as predictions of score 1: ~1.0 when they are right."""
    import yolo_peer
    from mobileinst.data.config import load_data_config
    yolo_root = out / "yolo-data"
    yolo_peer.write_yolo_dataset(data, yolo_root)
    gt = load_data_config(data).val.json
    s = score(gt, agnostic_gt(gt, out / "val_agnostic.json"), yolo_peer.labels_as_records(data, yolo_root))
    print("YOLO labels as predictions: " + ", ".join(f"{k} {v:.4f}" for k, v in s.items()))


def parse_args() -> argparse.Namespace:
    from mobileinst.train.config import preset_path
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="COCO-format DATA yaml (default: the hard synthetic set)")
    ap.add_argument("--minutes", type=float, nargs="+", default=[5, 10, 15], help="training budgets")
    ap.add_argument("--models", nargs="+", choices=[*MOBILEINST, *YOLO], default=[*MOBILEINST, *YOLO])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader processes, every model")
    ap.add_argument("--imgsz", type=int, default=256, help="MobileInst short side; YOLO imgsz")
    ap.add_argument("--yolo-imgsz", type=int, default=None, help="YOLO imgsz (default --imgsz)")
    ap.add_argument("--yolo-batch", type=int, default=16)
    ap.add_argument("--mobileinst-cfg", type=preset_path, default="hard_cpu",
                    help="training preset, a name or a YAML path (default hard_cpu)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=400, help="generated set only")
    ap.add_argument("--n-val", type=int, default=100, help="generated set only")
    ap.add_argument("--out", default="runs/learning_curve")
    ap.add_argument("--self-check", action="store_true", help="only score the YOLO labels as predictions")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args()


def preflight(args) -> None:
    """Fail in one line before any training: a missing preset or a missing ultralytics."""
    if any(m in MOBILEINST for m in args.models) and not args.mobileinst_cfg.is_file():
        sys.exit(f"{args.mobileinst_cfg}: no such training preset (--mobileinst-cfg)")
    if any(m in YOLO for m in args.models):
        from latency import peers_available
        if not peers_available():
            sys.exit("ultralytics is not installed: run `make bench-peers`")


def run(args, data: Path, out: Path) -> None:
    from mobileinst.data.config import load_data_config
    gt = load_data_config(data).val.json
    gt_agnostic = agnostic_gt(gt, out / "val_agnostic.json")
    yolo_data = None
    if any(m in YOLO for m in args.models):
        import yolo_peer
        yolo_data = yolo_peer.write_yolo_dataset(data, out / "yolo-data")
    info = machine(args.threads)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + f"; data {data}", flush=True)
    rows = []
    for job in jobs(args, data, yolo_data, out):
        print(f"{job['model']}: training {max(args.minutes):g} min ...", flush=True)
        try:
            points = spawn(job)
        except RuntimeError as e:  # one failing model, not the table
            print(e, flush=True)
            continue
        rows += [row(job["model"], p, score(gt, gt_agnostic, p["results"])) for p in points]
    report(rows, info, args, out)


def row(model: str, p: dict, scores: dict[str, float]) -> dict:
    return {"model": model, "minutes": p["minutes"], "train_s": p["seconds"], "iterations": p["iterations"],
            "batch": p["batch"], "images": p["iterations"] * p["batch"], "epochs": p["epochs"],
            "torch_threads": p["torch_threads"], **scores}


def report(rows: list[dict], info: dict, args, out: Path) -> None:
    header = "| model | min | train s | iters | batch | images | epochs | AP | AP50 | AP agn. | AP50 agn. |"
    print("\n" + header + "\n|" + "---|" * 11)
    print("\n".join(table_row(r) for r in rows))
    print(f"\nmask AP on {args.data or 'the hard synthetic set'} val; agn. = class-agnostic; train s = "
          "training seconds at the snapshot (set-up, snapshots and scoring not counted)")
    with open(out / "learning_curve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(rows)
    settings = {**{k: v for k, v in vars(args).items() if k != "worker"},
                "mobileinst_cfg": str(args.mobileinst_cfg), "yolo_imgsz": args.yolo_imgsz or args.imgsz}
    (out / "learning_curve.json").write_text(json.dumps(
        {"machine": info, "settings": settings, "rows": rows}, indent=1))
    print(f"written: {out / 'learning_curve.csv'}, {out / 'learning_curve.json'}")


def main() -> None:
    args = parse_args()
    if args.worker:
        job = json.loads(args.worker)
        points = worker(job)
        Path(job["out"], "points.json").write_text(json.dumps(points, indent=1))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = dataset(args, out)
    if args.self_check:
        self_check(data, out)
        return
    preflight(args)
    run(args, data, out)


if __name__ == "__main__":
    main()
