"""`mobileinst track`: the CLI over `track.run.track_source`."""
from __future__ import annotations

import argparse

from ..verb_config import add_cfg_option, config_from_args


def cmd_track(args: argparse.Namespace) -> None:
    from .run import track_source
    cfg = config_from_args(args)  # a TrackConfig: --cfg file, then the given options
    s = track_source(cfg.weights, cfg.source, cfg.out_dir, reuse=cfg.reuse, conf=cfg.conf,
                     imgsz=cfg.imgsz, patience=cfg.patience, video_id=cfg.video_id,
                     device=cfg.device, save_video=cfg.video, backend=cfg.backend,
                     threads=cfg.threads, features=cfg.features)
    print(f"{s['frames_done']} frames, {s['tracks']} tracks, {s['fps']:.1f} frames/s; "
          f"{'overlay ' + s['video'] + ', ' if s['video'] else ''}results {s['results']}")


def add_parser(sub) -> None:
    p = sub.add_parser("track", help="video instance segmentation: overlay mp4 + YouTube-VIS json")
    from ..export.command import add_backend_option
    p.add_argument("--weights", required=True,
                   help="a .pt checkpoint, or the key-frame file (raw outputs) from `mobileinst "
                        "export`: an .onnx for onnxruntime, a --format openvino|ncnn|executorch|"
                        "litert file for that backend")
    p.add_argument("--source", required=True, help="a video file, a folder of frames, or a glob")
    p.add_argument("--out-dir", required=True, help="folder for <name>.mp4, results.json, summary.json")
    p.add_argument("--reuse", type=int, default=1,
                   help="key-frame interval K: the instance decoder runs every K-th frame, the "
                        "frames between reuse its kernels (default 1 = every frame)")
    p.add_argument("--conf", type=float, default=0.3, help="score that starts a track (default 0.3)")
    p.add_argument("--patience", type=int, default=10,
                   help="frames a lost track waits before it ends (default 10)")
    p.add_argument("--imgsz", type=int, default=None, help="short side (default: the checkpoint's)")
    p.add_argument("--video-id", type=int, default=1, help="video_id written in results.json")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto: CUDA when available)")
    p.add_argument("--video", action=argparse.BooleanOptionalAction, default=True,
                   help="write the overlay mp4 (default on); --no-video writes the json only")
    add_backend_option(p)  # every backend has a VideoNet (infer/video.py)
    p.add_argument("--features", default=None,
                   help="with an exported --weights and --reuse > 1: the features file of the same "
                        "model and format (mobileinst export --part features); with onnxruntime a "
                        ".pt exports both graphs once, cached as NAME.cache.onnx and "
                        "NAME.cache-features.onnx")
    add_cfg_option(p, "track")
    p.set_defaults(func=cmd_track)
