"""Peak resident memory of `mobileinst predict`, `train` and `val` at the sizes of issue 23.

    python benchmarks/peak_rss.py                          # the four rows below
    python benchmarks/peak_rss.py --rows val --out peak_rss.md
    python benchmarks/peak_rss.py --rows predict train --imgsz 1024 2048 4096 --mem-cap 12
    python benchmarks/peak_rss.py --rows train --batch 16 --imgsz 640 --mem-cap 20   # the default recipe

Rows (each the CLI a user runs, `python -m mobileinst.cli VERB ...`, in a fresh process that
reports its own peak RSS: VmHWM at exit, `predict_memory.peak_rss_mib`, imports and model
included):
- predict: one 4000x3000 photo at `--imgsz S` (S = 4096: a 4096 x 5461 input), default conf 0.3;
- train: `--iters N --batch B --workers 0 --imgsz S` on a generated max(2, B)-image set (`data
  synth`-style, 4 classes): SparseInst's multi-scale draws (short side up to S) and the
  evaluation at S that ends the run; its row also gives the peak per input pixel of a batch
  (B x S x round(S * 853 / 640), the size `train`'s memory check assumes), to compare with
  `mobileinst.utils.TRAIN_BYTES_PER_PIXEL` (docs/reliability.md: 1210-1370 at 640 x 16 by /usr/bin/time);
- val: one 6000x6000 photo at the checkpoint's size (640): 100 kept instances, whose full-size
  masks were 3.6 GB at once before they were made a few at a time (issue 23);
- predict-conf0: the same 6000x6000 photo through `predict --conf 0` (every query with a mask is
  kept, encoded and drawn on the overlay: 4.4 GB before `predict` made its masks a few at a time,
  1.2 GB after; docs/reliability.md, "Fourth round").
predict and val run MobileInst-TopFormer-T with random weights, 80 classes (predict_memory's
checkpoint; random weights keep no instance at conf 0.3 and 100 at val's 0.005, almost all
covering the photo: val's worst case). A run refused up front (exit 2, e.g. `--imgsz` beyond the
available memory) is a row with its one-line message. Images are generated, nothing downloaded.

Every child runs under an address-space limit (`--mem-cap` GiB, RLIMIT_AS, default 10) so that a
run that would take the machine's memory (train at 4096 passed 15 GB here, on a shared machine)
fails instead: its row then says "over the cap" (the address space also counts what is not
resident, libraries and thread stacks: ~1 GiB here, so such a run's peak RSS was near the cap).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from predict_memory import make_checkpoint, make_image  # benchmarks/ is on sys.path
from recipe_seeds import cpu_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = ("predict", "train", "val", "predict-conf0")
# Caps its address space at argv[2] bytes, runs `mobileinst.cli.main` on the rest and prints
# its exit code and this process's VmHWM (MiB).
CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]), int(sys.argv[2])))
sys.path.insert(0, sys.argv[1])
from predict_memory import peak_rss_mib
from mobileinst.cli import main
code = main(sys.argv[3:])
print("PEAK", code, peak_rss_mib())
"""
OVER_CAP = ("can't allocate memory", "MemoryError", "Cannot allocate memory", "std::bad_alloc")


def val_set(root: Path, side: int, names: list[str]) -> Path:
    """root/data.yaml: one side x side photo in val (and train), one square instance of class 0."""
    (root / "images").mkdir(parents=True)
    make_image(root / "images" / "photo.jpg", side, side)
    s = side // 4
    gt = {"images": [{"id": 1, "file_name": "photo.jpg", "height": side, "width": side}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": s * s,
                           "bbox": [s, s, s, s], "segmentation": [[s, s, 2 * s, s, 2 * s, 2 * s, s, 2 * s]]}],
          "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}
    (root / "val.json").write_text(json.dumps(gt))
    split = {"json": str(root / "val.json"), "images": str(root / "images")}
    (root / "data.yaml").write_text(json.dumps({"train": split, "val": split, "names": names}))
    return root / "data.yaml"


def commands(rows: list[str], tmp: Path, args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(verb, what it measures, the CLI arguments) per row, their inputs written under tmp."""
    weights = make_checkpoint(tmp / "random.pt") if {"predict", "val", "predict-conf0"} & set(rows) else None
    threads, out = ["--threads", str(args.threads)], []
    if "predict" in rows:
        photo = make_image(tmp / "photo_4000x3000.jpg", 4000, 3000)
        out += [("predict", f"4000x3000 photo, --imgsz {s}, conf 0.3",
                 ["predict", "--weights", str(weights), "--source", str(photo), "--imgsz", str(s),
                  "--out-dir", str(tmp / f"predict{s}"), *threads]) for s in args.imgsz]
    if "train" in rows:
        from mobileinst.data.synthetic import make_synthetic_coco
        data = make_synthetic_coco(tmp / "synth", n_train=max(2, args.batch), n_val=1, seed=0)
        out += [("train", f"{args.iters} iterations, batch {args.batch}, --imgsz {s}, final evaluation",
                 ["train", "--data", str(data), "--model", "mobileinst-topformer-t", "--imgsz", str(s),
                  "--iters", str(args.iters), "--batch", str(args.batch), "--workers", "0",
                  "--out-dir", str(tmp / f"train{s}")]) for s in args.imgsz]
    if "val" in rows:
        data = val_set(tmp / "val", args.val_side, [f"class{i}" for i in range(80)])
        out.append(("val", f"one {args.val_side}x{args.val_side} photo, imgsz 640, batch 1",
                    ["val", "--weights", str(weights), "--data", str(data), "--workers", "0",
                     "--batch", "1", *threads]))
    if "predict-conf0" in rows:
        photo = make_image(tmp / "photo_conf0.jpg", args.val_side, args.val_side)
        out.append(("predict", f"one {args.val_side}x{args.val_side} photo, imgsz 640, --conf 0 (every query kept)",
                    ["predict", "--weights", str(weights), "--source", str(photo), "--conf", "0",
                     "--out-dir", str(tmp / "predict_conf0"), *threads]))
    return out


def train_pixels(argv: list[str]) -> int | None:
    """Input pixels of a training batch (`train`'s memory check: B x S x round(S * 853 / 640));
    None for the other verbs."""
    if argv[0] != "train":
        return None
    s, b = (int(argv[argv.index(k) + 1]) for k in ("--imgsz", "--batch"))
    return b * s * round(s * 853 / 640)


def run_row(argv: list[str], threads: int, cap_gib: float) -> dict:
    """The CLI in a fresh, capped process -> exit code, peak MiB, wall seconds (or the error)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, str(Path(__file__).parent),
                        str(int(cap_gib * 2**30)), *argv], capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    peak = [ln.split() for ln in p.stdout.splitlines() if ln.startswith("PEAK ")]
    row = {"code": p.returncode, "wall_s": wall}
    if peak:
        row.update(code=int(peak[-1][1]), peak_mib=float(peak[-1][2]))
        pixels = train_pixels(argv)
        if pixels:  # bytes per input pixel, as TRAIN_BYTES_PER_PIXEL counts them
            row["bytes_per_px"] = row["peak_mib"] * 2**20 / pixels
    if row["code"]:
        err = p.stderr.strip()
        over = any(k in err for k in OVER_CAP)
        row["error"] = f"over the {cap_gib:g} GiB cap" if over else (err.splitlines() or ["?"])[-1][:300]
    return row


def table(rows: list[dict], threads: int, cap_gib: float) -> str:
    lines = [f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {threads} thread(s) per run, "
             f"each capped at {cap_gib:g} GiB of address space; python {platform.python_version()}.", "",
             "| verb | run | exit | peak RSS (MiB) | bytes / input px | wall (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        peak = f"{r['peak_mib']:.0f}" if "peak_mib" in r else "-"
        per_px = f"{r['bytes_per_px']:.0f}" if "bytes_per_px" in r else "-"
        note = f" ({r['error']})" if r.get("error") else ""
        lines.append(f"| {r['verb']} | {r['what']}{note} | {r['code']} | {peak} | {per_px} | "
                     f"{r['wall_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--imgsz", type=int, nargs="+", default=[4096],
                   help="predict's and train's --imgsz (a row each)")
    p.add_argument("--mem-cap", type=float, default=10.0,
                   help="each run's address-space limit in GiB (default 10)")
    p.add_argument("--iters", type=int, default=2, help="training iterations")
    p.add_argument("--batch", type=int, default=1, help="training batch (the recipes': 16)")
    p.add_argument("--val-side", type=int, default=6000,
                   help="the square photo of val and predict-conf0, pixels a side")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="peak_rss_") as tmp:
        for verb, what, cli in commands(args.rows, Path(tmp), args):
            results.append({"verb": verb, "what": what, **run_row(cli, args.threads, args.mem_cap)})
            print(results[-1], file=sys.stderr, flush=True)
    text = table(results, args.threads, args.mem_cap)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
