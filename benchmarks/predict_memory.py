"""Peak memory and wall time of `mobileinst predict` on very large photos.

    python benchmarks/predict_memory.py                        # 6000x6000 and 4000x3000, both backends
    python benchmarks/predict_memory.py --sizes 4000x3000 --confs 0.3 --backends torch
    python benchmarks/predict_memory.py --threads 2 --out predict_memory.md

Every (backend, image, conf) runs `mobileinst.predict.predict_source` (what the CLI runs: json and
overlays written) in a fresh Python process, which reports its own peak RSS (VmHWM at exit, see
`peak_rss_mib`: startup, imports and model included), the wall time of the predict_source call
and the instances kept. The model is MobileInst-TopFormer-T
with random weights (80 classes, checkpoint written by `save_checkpoint` as training does, imgsz
640); its near-constant mask logits make almost every kept mask cover most of the image, the worst
case for memory. At the default conf (0.3) random weights keep no instance: the run measures what
a photo costs when nothing is found. At conf 0.0 every query with a non-empty mask is kept (up to
max_det = 100): the run measures the cost per kept full-resolution instance. The images are
generated (a gradient and filled shapes, JPEG) so nothing is downloaded. onnxruntime rows need
onnxruntime; the .pt is exported to its cached .onnx once, before the timed runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recipe_seeds import cpu_model  # benchmarks/ is on sys.path when a script in it runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_SIZES = ("6000x6000", "4000x3000")  # W x H: a huge square and a 12 MP photo
DEFAULT_CONFS = (0.3, 0.0)


def parse_size(s: str) -> tuple[int, int]:
    """'WxH' -> (W, H)."""
    w, h = (int(v) for v in s.lower().split("x"))
    return w, h


def make_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A natural-looking RGB JPEG (gradient + filled ellipses and rectangles), built in uint8
    row bands so that the generator itself stays small for 6000x6000."""
    import cv2
    import numpy as np
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), np.uint8)
    c0, c1 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    xs = np.linspace(0, 0.5, width, dtype=np.float32)[None, :, None]
    for y in range(0, height, 256):
        t = xs + np.linspace(y, min(y + 256, height) - 1, min(256, height - y),
                             dtype=np.float32)[:, None, None] / (2 * max(height - 1, 1))
        img[y:y + 256] = np.clip(c0 + (c1 - c0) * t, 0, 255).astype(np.uint8)
    for _ in range(8):
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        ax, ay = int(rng.uniform(0.05, 0.25) * width), int(rng.uniform(0.05, 0.25) * height)
        if rng.random() < 0.5:
            cv2.ellipse(img, (cx, cy), (ax, ay), 0, 0, 360, color, -1)
        else:
            cv2.rectangle(img, (cx - ax, cy - ay), (cx + ax, cy + ay), color, -1)
    cv2.imwrite(str(path), img[..., ::-1])
    return path


def make_checkpoint(path: Path) -> Path:
    """A random-weight MobileInst-TopFormer-T checkpoint, as training writes one."""
    import torch

    from mobileinst import build_model
    from mobileinst.checkpoint import save_checkpoint
    torch.manual_seed(0)
    model = build_model("mobileinst-topformer-t", num_classes=80)
    names = [f"class{i}" for i in range(80)]
    save_checkpoint({"model": model.state_dict(), "model_config": model.cfg.to_dict(),
                     "class_names": names, "cat_ids": list(range(1, 81)),
                     "train_config": {"imgsz": 640}}, path)
    return path


def child(args: argparse.Namespace) -> None:
    """One timed predict_source call in this (fresh) process; prints a JSON line."""
    from mobileinst.predict import predict_source
    t0 = time.perf_counter()
    summary = predict_source(args.weights, args.image, args.out_dir, conf=args.conf,
                             backend=args.backend, threads=args.threads)
    wall = time.perf_counter() - t0
    print(json.dumps({"instances": summary["instances"], "wall_s": wall, "peak_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM of /proc/self/status (the high-water mark of this
    program's own address space), else getrusage's ru_maxrss. On Linux ru_maxrss (and so
    RUSAGE_CHILDREN in the parent) starts at the parent's RSS when it forked / vforked us, which
    here (a parent that exported the ONNX file and drew the 6000x6000 photo) hid every smaller
    peak; VmHWM is reset by exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_one(weights: Path, image: Path, out_dir: Path, conf: float, backend: str,
            threads: int) -> dict:
    """predict_source in a fresh subprocess -> its JSON line (or the error)."""
    cmd = [sys.executable, __file__, "--child", "--weights", str(weights), "--image", str(image),
           "--out-dir", str(out_dir), "--conf", str(conf), "--backend", backend,
           "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {p.returncode}: {tail[:200]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def backends_available(wanted: list[str]) -> list[str]:
    out = []
    for b in wanted:
        if b == "onnxruntime":
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                print("onnxruntime is not installed: skipping its rows", file=sys.stderr)
                continue
        out.append(b)
    return out


def table(rows: list[dict], threads: int) -> str:
    lines = [f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {threads} thread(s) per run; "
             f"python {platform.python_version()}.", "",
             "| backend | image | conf | kept instances | peak RSS (MiB) | wall (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['size']} | {r['conf']} | - | - | {r['error']} |")
        else:
            lines.append(f"| {r['backend']} | {r['size']} | {r['conf']} | {r['instances']} | "
                         f"{r['peak_mib']:.0f} | {r['wall_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), help="WxH images")
    p.add_argument("--confs", nargs="+", type=float, default=list(DEFAULT_CONFS))
    p.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"],
                   choices=["torch", "onnxruntime"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--image", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    p.add_argument("--conf", type=float, help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    backends = backends_available(args.backends)
    rows = []
    with tempfile.TemporaryDirectory(prefix="predict_memory_") as tmp:
        tmp = Path(tmp)
        weights = make_checkpoint(tmp / "random.pt")
        if "onnxruntime" in backends:  # export once, outside the timed runs
            from mobileinst.infer.factory import cached_onnx
            cached_onnx(weights)
        for size in args.sizes:
            w, h = parse_size(size)
            image = make_image(tmp / f"photo_{w}x{h}.jpg", w, h)
            for backend in backends:
                for conf in args.confs:
                    out_dir = tmp / f"run_{backend}_{size}_{conf}"
                    r = run_one(weights, image, out_dir, conf, backend, args.threads)
                    rows.append({"backend": backend, "size": f"{w}x{h}", "conf": conf, **r})
                    print(rows[-1], file=sys.stderr, flush=True)
    text = table(rows, args.threads)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
