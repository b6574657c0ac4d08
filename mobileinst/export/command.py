"""`mobileinst export`, and the `--backend` option of `mobileinst predict`.

    mobileinst export --weights best.pt --out best.onnx                   # 640x640, uint8 in
    mobileinst export --weights best.pt --dynamic --postprocess --max-det 20
    mobileinst export --model mobileinst-topformer-t --imgsz 512 512       # random weights
    mobileinst export --weights best.pt --int8 --calib data.yaml --calib-n 64
    mobileinst export --weights best.pt --format ncnn                     # needs mobileinst[ncnn]

    mobileinst predict --weights best.onnx --backend onnxruntime --source img.jpg
    mobileinst predict --weights best.pt --backend onnxruntime ...  # exports once, cached as
                                                                    # best.cache.onnx beside it
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from ..errors import MobileInstError
from ..utils import resolve_device

log = logging.getLogger("mobileinst.export")
FORMATS = ("onnx", "openvino", "ncnn", "executorch", "litert", "coreml")
RUNTIME_BACKENDS = ("openvino", "ncnn", "executorch", "litert")  # export/backends.py: ready files only
BACKENDS = ("torch", "onnxruntime", *RUNTIME_BACKENDS)


# -- mobileinst export -------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    """Register the `export` verb on the CLI's subparsers."""
    p = subparsers.add_parser("export", help="export to ONNX (optionally int8) or a mobile format",
                              description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="a mobileinst .pt checkpoint")
    src.add_argument("--model", help="a variant name with random weights (for benchmarking)")
    p.add_argument("--num-classes", type=int, default=80, help="classes of --model (default 80)")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="file format (default onnx)")
    p.add_argument("--out", help="file to write (default: beside --weights, or ./MODEL.onnx)")
    p.add_argument("--imgsz", type=int, nargs="+", default=None,
                   help="S or H W: the fixed input size (default 640 640); with --dynamic, the "
                        "default short side stored for predictors")
    p.add_argument("--dynamic", action=argparse.BooleanOptionalAction, default=False,
                   help="any batch and any H, W multiple of 32 (ONNX only)")
    p.add_argument("--batch", type=int, default=1, help="fixed batch size (default 1)")
    p.add_argument("--simplify", action=argparse.BooleanOptionalAction, default=True,
                   help="onnxslim the graph (default on)")
    p.add_argument("--part", choices=("full", "features"), default="full",
                   help="full: the whole network (default); features: backbone + mask decoder only "
                        "(images -> mask_features), the graph `track --reuse` runs between key frames")
    p.add_argument("--postprocess", action=argparse.BooleanOptionalAction, default=False,
                   help="scores, top-k, mask upsampling and thresholding inside the graph")
    p.add_argument("--max-det", type=int, default=None,
                   help="instances a --postprocess graph returns (default 100; each costs "
                        "~1 ms at 640x640 on one CPU thread)")
    p.add_argument("--input-dtype", choices=("uint8", "float32"), default="uint8",
                   help="dtype of the RGB 0..255 input (default uint8)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--int8", action=argparse.BooleanOptionalAction, default=False,
                   help="also write an int8 (static QDQ) copy, OUT-int8.onnx")
    p.add_argument("--calib", help="calibration images for --int8: a folder, a glob or a DATA yaml "
                                   "(its train images)")
    p.add_argument("--calib-n", type=int, default=64, help="calibration images to use (default 64)")
    p.set_defaults(func=run)


def load_model(args: argparse.Namespace):
    """(model, class names, default imgsz, extra metadata) from --weights or --model."""
    if args.weights:
        from ..checkpoint import model_from_checkpoint
        model, ckpt = model_from_checkpoint(args.weights)
        imgsz = (ckpt.get("train_config") or {}).get("imgsz", 640)
        meta = {"source": Path(args.weights).name, "source_sha256": file_sha256(args.weights)}
        return model, model.class_names, imgsz, meta
    from ..registry import build_model, get_config
    get_config(args.model)  # a clear error for an unknown name
    log.warning("exporting %s with random weights (no --weights given)", args.model)
    model = build_model(args.model, num_classes=args.num_classes).eval()
    return model, None, 640, {"source": "random init"}


def default_out(args: argparse.Namespace) -> Path:
    suffix = {"onnx": ".onnx", "openvino": ".xml", "ncnn": "_ncnn", "executorch": ".pte", "litert": ".tflite",
              "coreml": ".mlpackage"}[args.format]
    if args.weights:
        w = Path(args.weights)
        return w.with_name(w.stem + suffix)
    return Path(args.model + suffix)


def run(args: argparse.Namespace) -> None:
    """Run `mobileinst export`."""
    from .onnx import export_onnx, parse_imgsz
    check_export_options(args)
    if args.int8 and not args.calib:
        raise MobileInstError("--int8 needs --calib: a folder of real images or a DATA yaml")
    if args.int8 and args.format != "onnx":
        raise MobileInstError("--int8 is for --format onnx")
    if args.part != "full" and args.format != "onnx":
        raise MobileInstError("--part features is for --format onnx")
    model, names, train_imgsz, meta = load_model(args)
    hw = parse_imgsz(args.imgsz)
    out = Path(args.out) if args.out else default_out(args)
    t0 = time.perf_counter()
    if args.format != "onnx":
        from .formats import export_format
        if args.dynamic or args.postprocess:
            raise MobileInstError(f"--dynamic and --postprocess are for --format onnx "
                                  f"({args.format} graphs are fixed-size, raw outputs)")
        path = export_format(args.format, model, out, hw or (640, 640), class_names=names, metadata=meta)
        print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")
        return
    if args.dynamic and hw is None:
        hw = (train_imgsz, train_imgsz)
    path = export_onnx(model, out, imgsz=hw, dynamic=args.dynamic, simplify=args.simplify,
                       postprocess=args.postprocess, input_dtype=args.input_dtype,
                       opset=args.opset, class_names=names, max_det=args.max_det,
                       batch=args.batch, metadata=meta, part=args.part)
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s): {describe(path)}")
    if args.int8:
        from .quantize import quantize_int8
        q = quantize_int8(path, path.with_name(path.stem + "-int8.onnx"), args.calib, n=args.calib_n)
        print(f"wrote {q} (int8, calibrated on up to {args.calib_n} images of {args.calib})")


def check_export_options(args: argparse.Namespace) -> None:
    """Sizes, counts and the output path, before a model is loaded."""
    from ..utils import IMGSZ_RANGE, check_output_dir, check_output_file, check_range
    for v in args.imgsz or []:
        check_range("--imgsz", v, *IMGSZ_RANGE)
    check_range("--batch", args.batch, 1, 1024)
    check_range("--max-det", args.max_det, 1, 1000)
    check_range("--calib-n", args.calib_n, 1, 100000)
    check_range("--num-classes", args.num_classes, 1, 100000)
    if args.out:  # ncnn writes a folder, the others a file
        (check_output_dir if args.format == "ncnn" else check_output_file)(args.out, "export output (--out)")


def describe(path: str | Path) -> str:
    """One line: input and outputs of a graph from its metadata."""
    import json

    from .onnx import read_metadata
    meta = read_metadata(path)
    size = "HxW multiple of 32" if meta["dynamic"] == "true" else "x".join(map(str, json.loads(meta["input_size"])))
    outs = ", ".join(json.loads(meta["outputs"]))
    return f"input images (B={meta['batch']}, 3, {size}) {meta['input_dtype']} RGB 0..255; outputs {outs}"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- predict --backend ---------------------------------------------------------------------------
def add_backend_option(parser: argparse.ArgumentParser, backends: tuple[str, ...] = BACKENDS) -> None:
    """--backend and --threads, for verbs that run a network."""
    others = [b for b in backends if b in RUNTIME_BACKENDS]
    parser.add_argument("--backend", choices=backends, default="torch",
                        help="torch (a .pt) or onnxruntime (an .onnx from `mobileinst export`, or a "
                             ".pt exported once to a cached .onnx beside it)"
                             + (f"; {', '.join(others)}: a file from `mobileinst export --format ...`"
                                if others else "") + "; default torch")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the network (default: torch's / 1 for onnxruntime)")


def make_predictor(args: argparse.Namespace):
    """A Predictor (torch) or OnnxPredictor from parsed --weights/--backend/--imgsz/--conf/
    --device/--threads options (missing ones take their defaults)."""
    return load_predictor(args.weights, backend=getattr(args, "backend", "torch"),
                          imgsz=getattr(args, "imgsz", None), conf=getattr(args, "conf", 0.3),
                          device=getattr(args, "device", "cpu"), threads=getattr(args, "threads", None))


def load_predictor(weights: str | Path, backend: str = "torch", imgsz: int | None = None,
                   conf: float = 0.3, device: str = "cpu", threads: int | None = None):
    """A predictor for `weights`: a .pt checkpoint (torch or onnxruntime backend) or an .onnx
    file (onnxruntime). For onnxruntime, a .pt is exported once to a dynamic float32 graph with
    raw outputs (so results equal the torch backend's), cached beside it as NAME.cache.onnx and
    re-exported when the checkpoint changes."""
    weights = Path(weights)
    if backend not in BACKENDS:
        raise MobileInstError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    is_onnx = weights.suffix.lower() == ".onnx"
    if backend == "torch":
        if is_onnx:
            raise MobileInstError(f"{weights}: an ONNX file needs --backend onnxruntime")
        import torch

        from ..predict import Predictor
        if threads:
            torch.set_num_threads(threads)
        kwargs: dict[str, Any] = {"conf": conf, "device": resolve_device(device)}
        if imgsz:
            kwargs["imgsz"] = imgsz
        return Predictor.from_checkpoint(weights, **kwargs)
    if resolve_device(device).type != "cpu" and device != "auto":
        log.warning("the %s backend runs on the CPU (ignoring --device %s)", backend, device)
    if backend in RUNTIME_BACKENDS:
        if weights.suffix.lower() == ".pt":
            raise MobileInstError(f"{weights}: --backend {backend} runs an exported file; first: "
                                  f"mobileinst export --weights {weights} --format {backend}")
        from .backends import RuntimePredictor
        return RuntimePredictor(weights, backend=backend, imgsz=imgsz, conf=conf, threads=threads or 1)
    from .runtime import OnnxPredictor
    path = weights if is_onnx else cached_onnx(weights)
    return OnnxPredictor(path, imgsz=imgsz, conf=conf, threads=threads or 1)


def cached_onnx(weights: str | Path, part: str = "full") -> Path:
    """The cached ONNX export of a checkpoint (dynamic, float32 input), reused when its recorded
    sha256 matches the checkpoint, else (re-)exported (~20 s). part "full": the raw-output graph,
    NAME.cache.onnx; part "features" (backbone + mask decoder, for video kernel reuse):
    NAME.cache-features.onnx. A read-only folder falls back to ~/.cache/mobileinst/."""
    from ..checkpoint import model_from_checkpoint
    from .onnx import PARTS, export_onnx
    weights = Path(weights)
    if part not in PARTS:
        raise MobileInstError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    if not weights.is_file():
        from ..errors import CheckpointError
        raise CheckpointError(f"{weights}: no such checkpoint file")
    sha = file_sha256(weights)
    suffix = "" if part == "full" else f"-{part}"
    cache = weights.with_name(f"{weights.stem}.cache{suffix}.onnx")
    if _cache_valid(cache, sha):
        return cache
    model, ckpt = model_from_checkpoint(weights)
    imgsz = (ckpt.get("train_config") or {}).get("imgsz", 640)
    log.warning("exporting %s to ONNX once for onnxruntime (cached in %s)", weights, cache)
    kwargs = dict(imgsz=(imgsz, imgsz), dynamic=True, input_dtype="float32", part=part,
                  class_names=model.class_names, metadata={"source": weights.name, "source_sha256": sha})
    try:
        return export_onnx(model, cache, **kwargs)
    except PermissionError:  # read-only folder: a per-user cache
        cache = Path.home() / ".cache" / "mobileinst" / f"{sha[:16]}{suffix}.onnx"
        return cache if _cache_valid(cache, sha) else export_onnx(model, cache, **kwargs)


def _cache_valid(cache: Path, sha: str) -> bool:
    """The cache file exists and records the checkpoint's sha256 (a broken file is rebuilt)."""
    from .onnx import read_metadata
    try:
        return cache.is_file() and read_metadata(cache).get("source_sha256") == sha
    except Exception:  # noqa: BLE001 - a broken cache file is simply rebuilt
        return False
