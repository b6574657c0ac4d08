"""Mask AP and speed of one checkpoint in float32 and int8, per runtime.

    python benchmarks/int8_accuracy.py [--weights runs/demo/train/weights/best.pt]
        [--data runs/demo/data/data.yaml] [--calib-n 64] [--threads 1] [--out-dir runs/int8]
        [--runtimes onnxruntime openvino executorch litert] [--imgsz S]

onnxruntime (the default, and what it measured first): the checkpoint is exported to a dynamic
float32 ONNX graph with raw outputs, and quantized to int8 (static QDQ, U8S8, per-channel weights)
calibrated on --calib-n images of the DATA file's TRAIN split; a PyTorch eager row is the
reference. openvino / executorch / litert: `export_format` (float32) and `export_int8` (NNCF /
PT2E + XNNPACKQuantizer / PT2E + litert-torch's quantizer, calibrated on the same train images)
at the fixed size S x S (default: the checkpoint's training size; images are letterboxed into
it, so these rows are not the dynamic rows' resize), both run by `RuntimePredictor` as
`predict --backend F` runs them. A runtime whose package is missing is skipped with a note.

Each backend predicts every val image (score threshold 0.005, as `mobileinst val`) and
pycocotools scores the results against the val json. "ΔAP" is int8 AP - the same runtime's fp32
AP. "ms/img" is the median wall time of the predictor call per image (pre + network + post) with
--threads threads. "MB" is the exported file (OpenVINO: .xml + .bin).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe_seeds import cpu_model  # noqa: E402 - after the path

from mobileinst.benchmark import file_size_mb  # noqa: E402

SUFFIX = {"openvino": ".xml", "executorch": ".pte", "litert": ".tflite"}
PACKAGES = {"onnxruntime": ["onnxruntime"], "openvino": ["openvino", "nncf"],
            "executorch": ["executorch"], "litert": ["litert_torch", "ai_edge_litert"]}


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
    ap.add_argument("--runtimes", nargs="+", default=["onnxruntime"],
                    choices=["onnxruntime", "openvino", "executorch", "litert"])
    ap.add_argument("--imgsz", type=int, default=None,
                    help="fixed S x S of the runtime exports (default: the training size)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager row")
    args = ap.parse_args()

    import torch

    from mobileinst.checkpoint import model_from_checkpoint
    from mobileinst.data.coco import CocoInstances
    from mobileinst.data.config import load_data_config
    from mobileinst.evaluate.coco_eval import evaluate_coco
    from mobileinst.evaluate.evaluator import predict_images

    torch.set_num_threads(args.threads)
    data = load_data_config(args.data)
    val = CocoInstances(data.val.json, data.val.images)
    model, ckpt = model_from_checkpoint(args.weights)
    imgsz = int((ckpt.get("train_config") or {}).get("imgsz", 640))
    fixed = args.imgsz or imgsz
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    conf = 0.005  # the evaluation threshold (SparseInst), as `mobileinst val`
    rows, notes = [], []

    def score(name: str, runtime: str, input_desc: str, predictor, path: Path | None,
              ref_ap: float | None, export_s: float | None) -> float:
        timed = Timed(predictor)
        records = predict_images(timed, val, progress=False)
        metrics = evaluate_coco(data.val.json, records, backend="pycocotools")
        rows.append((name, input_desc, metrics.AP, metrics.AP50,
                     None if ref_ap is None else metrics.AP - ref_ap,
                     1000 * statistics.median(timed.times), file_size_mb(path) if path else None, export_s))
        print(f"{name}: AP {metrics.AP:.4f}", flush=True)
        return metrics.AP

    if not args.no_torch:
        from mobileinst.infer.predictor import TorchPredictor
        eager = TorchPredictor.from_checkpoint(args.weights, imgsz=imgsz, conf=conf)
        score("PyTorch eager", "torch", f"short side {imgsz}", eager, None, None, None)

    for runtime in args.runtimes:
        missing = [m for m in PACKAGES[runtime] if importlib.util.find_spec(m) is None]
        if missing:
            notes.append(f"{runtime}: skipped, {', '.join(missing)} not installed")
            continue
        if runtime == "onnxruntime":
            from mobileinst.export.onnx import export_onnx
            from mobileinst.export.quantize import quantize_int8
            from mobileinst.infer.ort import OnnxPredictor
            t0 = time.perf_counter()
            fp32 = export_onnx(model, out / "fp32.onnx", imgsz=(imgsz, imgsz), dynamic=True,
                               input_dtype="float32", class_names=model.class_names)
            t1 = time.perf_counter()
            int8 = quantize_int8(fp32, out / "int8.onnx", data.train.images, n=args.calib_n)
            t2 = time.perf_counter()
            desc = f"short side {imgsz} (dynamic)"
            ref = score("onnxruntime fp32", runtime, desc,
                        OnnxPredictor(fp32, imgsz=imgsz, conf=conf, threads=args.threads), fp32, None, t1 - t0)
            score("onnxruntime int8", runtime, desc,
                  OnnxPredictor(int8, imgsz=imgsz, conf=conf, threads=args.threads), int8, ref, t2 - t1)
            continue
        from mobileinst.infer.runtimes import RuntimePredictor
        from mobileinst.export.formats import export_format
        from mobileinst.export.quantize_runtimes import export_int8
        hw = (fixed, fixed)
        t0 = time.perf_counter()
        fp32 = export_format(runtime, model, out / f"{runtime}-fp32{SUFFIX[runtime]}", hw,
                             class_names=model.class_names)
        t1 = time.perf_counter()
        try:
            int8 = export_int8(runtime, model, out / f"{runtime}-int8{SUFFIX[runtime]}", hw,
                               args.data, n=args.calib_n, class_names=model.class_names)
        except Exception as e:  # noqa: BLE001 - report and go on with the other runtimes
            notes.append(f"{runtime} int8 failed: {e}")
            int8 = None
        t2 = time.perf_counter()
        desc = f"{fixed}x{fixed} letterbox"
        ref = score(f"{runtime} fp32", runtime, desc,
                    RuntimePredictor(fp32, runtime, conf=conf, threads=args.threads), fp32, None, t1 - t0)
        if int8 is not None:
            score(f"{runtime} int8", runtime, desc,
                  RuntimePredictor(int8, runtime, conf=conf, threads=args.threads), int8, ref, t2 - t1)

    print(f"\n`{' '.join(['python', *sys.argv])}`\n")
    print(f"{args.weights} on {len(val)} val images of {args.data}, training size {imgsz}, "
          f"{args.threads} thread(s); int8 calibrated on {args.calib_n} train images; "
          f"{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}\n")
    print("| backend | input | mask AP | AP50 | ΔAP int8 - fp32 | ms / image | MB | export s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, desc, a, a50, d, ms, mb, es in rows:
        print(f"| {name} | {desc} | {a:.4f} | {a50:.4f} | {'' if d is None else f'{d:+.4f}'} | "
              f"{ms:.1f} | {'' if mb is None else f'{mb:.1f}'} | {'' if es is None else f'{es:.0f}'} |")
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
