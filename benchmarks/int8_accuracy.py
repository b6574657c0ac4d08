"""Mask AP and speed of one checkpoint in PyTorch, onnxruntime fp32 and onnxruntime int8.

    python benchmarks/int8_accuracy.py [--weights runs/demo/train/weights/best.pt]
        [--data runs/demo/data/data.yaml] [--calib-n 64] [--threads 1] [--out-dir runs/int8]

The checkpoint is exported to a dynamic float32 ONNX graph with raw outputs, and quantized to int8
(static QDQ, U8S8, per-channel weights) calibrated on --calib-n images of the DATA file's TRAIN
split. Each backend predicts every val image (same resize as `mobileinst val`, score threshold
0.005) and pycocotools scores the results against the val json. "ms/img" is the median wall time
of the predictor call per image (pre + network + post) with --threads threads.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Timed:
    """A predictor that records the wall time of each call (pre + network + post)."""

    def __init__(self, predictor) -> None:
        self.predictor, self.times = predictor, []

    def __call__(self, image):
        t0 = time.perf_counter()
        result = self.predictor(image)
        self.times.append(time.perf_counter() - t0)
        return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="runs/demo/train/weights/best.pt")
    ap.add_argument("--data", default="runs/demo/data/data.yaml")
    ap.add_argument("--calib-n", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default="runs/int8")
    args = ap.parse_args()

    import torch

    from mobileinst.checkpoint import model_from_checkpoint
    from mobileinst.data.coco import CocoInstances
    from mobileinst.data.config import load_data_config
    from mobileinst.evaluate.coco_eval import evaluate_coco
    from mobileinst.evaluate.evaluator import predict_images
    from mobileinst.export.onnx import export_onnx
    from mobileinst.export.quantize import quantize_int8
    from mobileinst.export.runtime import OnnxPredictor
    from mobileinst.predict import Predictor

    torch.set_num_threads(args.threads)
    data = load_data_config(args.data)
    val = CocoInstances(data.val.json, data.val.images)

    model, ckpt = model_from_checkpoint(args.weights)
    imgsz = int((ckpt.get("train_config") or {}).get("imgsz", 640))
    out = Path(args.out_dir)
    fp32 = export_onnx(model, out / "fp32.onnx", imgsz=(imgsz, imgsz), dynamic=True,
                       input_dtype="float32", class_names=model.class_names)
    int8 = quantize_int8(fp32, out / "int8.onnx", data.train.images, n=args.calib_n)

    conf = 0.005  # the evaluation threshold (SparseInst), as `mobileinst val`
    predictors = {
        "PyTorch eager": Predictor(model, model.class_names, imgsz=imgsz, conf=conf),
        "onnxruntime fp32": OnnxPredictor(fp32, imgsz=imgsz, conf=conf, threads=args.threads),
        "onnxruntime int8": OnnxPredictor(int8, imgsz=imgsz, conf=conf, threads=args.threads),
    }
    rows = []
    for name, predictor in predictors.items():
        timed = Timed(predictor)
        records = predict_images(timed, val, progress=False)
        metrics = evaluate_coco(data.val.json, records, backend="pycocotools")
        rows.append((name, metrics.AP, metrics.AP50, 1000 * statistics.median(timed.times)))
        print(f"{name}: AP {metrics.AP:.4f}", flush=True)

    print(f"\n{args.weights} on {len(val)} val images of {args.data}, imgsz {imgsz}, "
          f"{args.threads} thread(s); int8 calibrated on {args.calib_n} train images\n")
    print("| backend | mask AP | AP50 | ms / image |\n|---|---:|---:|---:|")
    for name, a, a50, ms in rows:
        print(f"| {name} | {a:.4f} | {a50:.4f} | {ms:.1f} |")


if __name__ == "__main__":
    main()
