"""`mobileinst export`, and the `--backend` option of the verbs that run a network.

    mobileinst export --weights best.pt --out best.onnx                   # 640x640, uint8 in
    mobileinst export --weights best.pt --dynamic --postprocess --max-det 20
    mobileinst export --model mobileinst-topformer-t --imgsz 512 512       # random weights
    mobileinst export --weights best.pt --int8 --calib data.yaml --calib-n 64
    mobileinst export --weights best.pt --format ncnn                     # needs mobileinst[ncnn]
    mobileinst export --weights best.pt --format web --out best_web        # a browser app (web.py)

    mobileinst predict --weights best.onnx --backend onnxruntime --source img.jpg
    mobileinst predict --weights best.pt --backend onnxruntime ...  # exports once, cached as
                                                                    # best.cache.onnx beside it
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ..errors import MobileInstError
from ..utils import file_sha256
from ..verb_config import add_cfg_option, as_namespace, config_from_args

# The heavy modules (torch, the exporters, the runtimes) are imported inside the functions that
# use them, so that `mobileinst --help` and option errors answer without loading torch; only the
# CLI imports this module.
log = logging.getLogger("mobileinst.export")
FORMATS = ("onnx", "openvino", "ncnn", "executorch", "litert", "coreml")


# -- mobileinst export -------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    """Register the `export` verb on the CLI's subparsers."""
    p = subparsers.add_parser("export", help="export to ONNX (optionally int8) or a mobile format",
                              description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="a mobileinst .pt checkpoint")
    src.add_argument("--model", help="a variant name with random weights (for benchmarking)")
    p.add_argument("--num-classes", type=int, default=80, help="classes of --model (default 80)")
    p.add_argument("--format", choices=(*FORMATS, "web"), default="onnx",
                   help="file format (default onnx); web: a folder with the post-processed graph and "
                        "a page that runs it in a browser (`make web-deps` first; `mobileinst serve`)")
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
    p.add_argument("--conf", type=float, default=None,
                   help="with --postprocess: return only instances scoring above this (e.g. 0.3), "
                        "and upsample only their masks (default: every query above 0.005, <= --max-det)")
    p.add_argument("--input-dtype", choices=("uint8", "float32"), default="uint8",
                   help="dtype of the RGB 0..255 input (default uint8)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--int8", action=argparse.BooleanOptionalAction, default=False,
                   help="also write a static int8 copy beside OUT, calibrated on --calib: "
                        "OUT-int8.onnx (onnxruntime QDQ) or OUT-int8.xml (openvino: NNCF); not "
                        "for ncnn, executorch, litert or coreml (docs/deployment.md, INT8)")
    p.add_argument("--calib", help="calibration images for --int8: a DATA yaml (its train images, "
                                   "never the split AP is measured on), a folder or a glob")
    p.add_argument("--calib-n", type=int, default=64, help="calibration images to use (default 64)")
    add_cfg_option(p, "export")
    p.set_defaults(func=run)


def load_model(args: argparse.Namespace):
    """(model, its ModelInfo, default imgsz, extra metadata) from --weights or --model."""
    if args.weights:
        from ..infer.factory import load_trained
        model, info = load_trained(args.weights)
        meta = {"source": Path(args.weights).name, "source_sha256": file_sha256(args.weights)}
        return model, info, info.imgsz, meta
    from ..infer.model_info import ModelInfo
    from ..models.factory import build_model
    from ..models.registry import get_config
    get_config(args.model)  # a clear error for an unknown name
    log.warning("exporting %s with random weights (no --weights given)", args.model)
    model = build_model(args.model, num_classes=args.num_classes).eval()
    return model, ModelInfo.for_model(model.cfg), 640, {"source": "random init"}


def default_out(args: argparse.Namespace) -> Path:
    suffix = {"onnx": ".onnx", "openvino": ".xml", "ncnn": "_ncnn", "executorch": ".pte", "litert": ".tflite",
              "coreml": ".mlpackage", "web": "_web"}[args.format]
    if args.weights:
        w = Path(args.weights)
        return w.with_name(w.stem + suffix)
    return Path(args.model + suffix)


def run(args: argparse.Namespace) -> None:
    """Run `mobileinst export` (args: parsed options, or an ExportConfig as a Namespace)."""
    from .onnx import export_onnx, parse_imgsz
    if hasattr(args, "_verb"):  # parsed: the --cfg file, then the given options
        args = as_namespace(config_from_args(args))
    check_export_options(args)
    if args.part != "full" and args.int8:
        raise MobileInstError("--int8 is for the full graph (--part full)")
    if args.part != "full" and args.format == "coreml":
        raise MobileInstError("--part features is for the formats that run here (CoreML is "
                              "conversion only off macOS)")
    model, info, train_imgsz, meta = load_model(args)
    names = list(info.class_names)
    hw = parse_imgsz(args.imgsz)
    out = Path(args.out) if args.out else default_out(args)
    t0 = time.perf_counter()
    if args.format == "web":
        from .web import run_web
        print(f"wrote {run_web(args, model, info, hw, meta, out)} ({time.perf_counter() - t0:.0f} s): "
              f"serve it with `mobileinst serve {out}`")
        return
    if args.format != "onnx":
        from .formats import export_format
        from .quantize_runtimes import export_int8, int8_path
        if args.dynamic or args.postprocess:
            raise MobileInstError(f"--dynamic and --postprocess are for --format onnx "
                                  f"({args.format} graphs are fixed-size, raw outputs)")
        path = export_format(args.format, model, out, hw or (640, 640), class_names=names, metadata=meta,
                             cat_ids=list(info.cat_ids), part=args.part)
        print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")
        if args.int8:
            t0 = time.perf_counter()
            q = export_int8(args.format, model, int8_path(path), hw or (640, 640), args.calib,
                            n=args.calib_n, class_names=names, metadata=meta, cat_ids=list(info.cat_ids))
            print(f"wrote {q} (int8, calibrated on up to {args.calib_n} images of {args.calib}; "
                  f"{time.perf_counter() - t0:.0f} s)")
        return
    if args.dynamic and hw is None:
        hw = (train_imgsz, train_imgsz)
    path = export_onnx(model, out, imgsz=hw, dynamic=args.dynamic, simplify=args.simplify,
                       postprocess=args.postprocess, input_dtype=args.input_dtype,
                       opset=args.opset, class_names=names, cat_ids=list(info.cat_ids), max_det=args.max_det,
                       batch=args.batch, metadata=meta, part=args.part, conf=args.conf)
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s): {describe(path)}")
    if args.int8:
        from .quantize import quantize_int8
        q = quantize_int8(path, path.with_name(path.stem + "-int8.onnx"), args.calib, n=args.calib_n)
        print(f"wrote {q} (int8, calibrated on up to {args.calib_n} images of {args.calib})")


def check_export_options(args: argparse.Namespace) -> None:
    """Sizes, counts and the output path, before a model is loaded."""
    from ..utils import IMGSZ_RANGE, check_not_input, check_output_dir, check_output_file, check_range
    for v in args.imgsz or []:
        check_range("--imgsz", v, *IMGSZ_RANGE)
    check_range("--batch", args.batch, 1, 1024)
    check_range("--max-det", args.max_det, 1, 1000)
    check_range("--calib-n", args.calib_n, 1, 100000)
    check_range("--num-classes", args.num_classes, 1, 100000)
    if args.int8:
        from .formats import INT8_FORMATS, NO_INT8
        if args.format not in (*INT8_FORMATS, "web"):  # web: the onnxruntime int8 graph
            raise MobileInstError(f"--int8 is not available for --format {args.format}: "
                                  f"{NO_INT8.get(args.format, 'no int8 tool')} (int8 formats: "
                                  f"{', '.join(INT8_FORMATS)})")
        if not args.calib:
            raise MobileInstError("--int8 needs --calib: a DATA yaml (its train images) or a "
                                  "folder of real images")
        from .quantize import calibration_files
        calibration_files(args.calib)  # before the float graph is written
    if args.out:  # ncnn writes a folder, the others a file
        (check_output_dir if args.format in ("ncnn", "web") else check_output_file)(args.out, "export output (--out)")
    check_not_input(args.out or default_out(args), "export output (--out)",  # the default too
                    {"--weights": args.weights, "--calib": args.calib})


def describe(path: str | Path) -> str:
    """One line: input and outputs of a graph from its metadata."""
    import json

    from .onnx import read_metadata
    meta = read_metadata(path)
    size = "HxW multiple of 32" if meta["dynamic"] == "true" else "x".join(map(str, json.loads(meta["input_size"])))
    outs = ", ".join(json.loads(meta["outputs"]))
    return f"input images (B={meta['batch']}, 3, {size}) {meta['input_dtype']} RGB 0..255; outputs {outs}"


# -- --backend, for the verbs that run a network ---------------------------------------------------
def add_backend_option(parser: argparse.ArgumentParser, backends: tuple[str, ...] | None = None) -> None:
    """--backend and --threads, for verbs that run a network (default: every backend of
    `infer.factory.BACKENDS`)."""
    from ..infer.factory import BACKENDS, RUNTIME_BACKENDS
    backends = backends or BACKENDS
    others = [b for b in backends if b in RUNTIME_BACKENDS]
    parser.add_argument("--backend", choices=backends, default="torch",
                        help="torch (a .pt) or onnxruntime (an .onnx from `mobileinst export`, or a "
                             ".pt exported once to a cached .onnx beside it)"
                             + (f"; {', '.join(others)}: a file from `mobileinst export --format ...`"
                                if others else "") + "; default torch")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the network (default: torch's / 1 for onnxruntime)")
