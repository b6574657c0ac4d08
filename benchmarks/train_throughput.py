"""Training throughput (images/s) and peak memory on this machine's CPU.

    python benchmarks/train_throughput.py [--models mobileinst-topformer-t mobileinst-seaformer-t]
        [--imgsz 640] [--batch 4] [--iters 8] [--warmup 2] [--threads 2] [--amp] [--no-channels-last]

Each model runs in a fresh process: full training steps (forward, matcher, losses, backward,
AdamW) on batches of the synthetic set at imgsz x imgsz, data loading excluded (the batch is
prepared once). Peak memory is the process's max RSS (resource.getrusage).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, resource, statistics, sys, time, torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"]); torch.set_num_interop_threads(1)
from mobileinst import build_model
from mobileinst.data.coco import CocoInstances
from mobileinst.data.loader import collate
from mobileinst.data.transforms import EvalTransform
from mobileinst.train.losses import MobileInstCriterion
ds = CocoInstances(args["json"], args["images"], EvalTransform(args["imgsz"]))
images, targets = collate([ds[i] for i in range(args["batch"])])
images = torch.nn.functional.interpolate(images, size=(args["imgsz"], args["imgsz"]))  # fixed size
targets = [dict(t, masks=torch.nn.functional.interpolate(t["masks"][None].float(),
           size=(args["imgsz"], args["imgsz"]))[0].to(torch.uint8)) for t in targets]
fmt = torch.channels_last if args["channels_last"] else torch.contiguous_format  # as the trainer
model = build_model(args["model"], num_classes=len(ds.class_names)).train().to(memory_format=fmt)
images = images.contiguous(memory_format=fmt)
crit = MobileInstCriterion(num_classes=len(ds.class_names))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
times = []
for i in range(args["warmup"] + args["iters"]):
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args["amp"]):
        out = model(images)
    loss = crit(out, targets)["loss"]
    opt.zero_grad(); loss.backward(); opt.step()
    if i >= args["warmup"]:
        times.append(time.perf_counter() - t)
med = statistics.median(times)
print(json.dumps({"s_per_iter": med, "images_per_s": args["batch"] / med,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mobileinst-topformer-t", "mobileinst-seaformer-t"])
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                    help="NCHW batches and weights (the trainer's default is channels-last)")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from mobileinst.data.synthetic import make_synthetic_coco
    tmp = Path(tempfile.mkdtemp(prefix="mi-bench-"))
    data = make_synthetic_coco(tmp, n_train=2, n_val=max(args.batch, 2), seed=0).parent
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT),
           "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
    print("| model | imgsz | batch | threads | amp | channels-last | s/iter | images/s | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        job = {"model": name, "imgsz": args.imgsz, "batch": args.batch, "iters": args.iters,
               "warmup": args.warmup, "threads": args.threads, "amp": args.amp,
               "channels_last": args.channels_last,
               "json": str(data / "annotations" / "instances_val.json"), "images": str(data / "val")}
        out = subprocess.run([sys.executable, "-c", WORKER, json.dumps(job)], env=env,
                             capture_output=True, text=True)
        if out.returncode:
            print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {name} | {args.imgsz} | {args.batch} | {args.threads} | {args.amp} | {args.channels_last} | "
              f"{r['s_per_iter']:.2f} | {r['images_per_s']:.2f} | {r['peak_rss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
