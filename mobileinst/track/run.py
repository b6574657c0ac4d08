"""`mobileinst track` as a function: a source -> overlay mp4 + YouTube-VIS results json.

    track_source("best.pt", "clip.mp4", "runs/track/exp", reuse=3)
    track_source("best.pt", "clip.mp4", "runs/track/ort", reuse=3, backend="onnxruntime", threads=1)
    track_source("best.onnx", "clip.mp4", "runs/track/ort", reuse=3, backend="onnxruntime",
                 features="best-features.onnx")

Writes, in out_dir:
  <name>.mp4     the frames with each track's mask, outline and "#id class score" (one colour per id)
  results.json   YouTube-VIS results (`results.TrackResults`), evaluable with `mobileinst eval --video`
  summary.json   source, frames done / total, complete (false after an interruption), settings
                 (backend included), fps

The json files are written in a `finally` block and the mp4 writer is released there too, so an
exception or Ctrl-C mid-video leaves valid files covering the frames finished (summary.json says
`complete: false`). A hard kill (SIGKILL) cannot be caught: nothing is written then (the mp4's
temporary `.NAME.mp4.*.tmp.mp4` stays). A file that cannot be written (a full disk) is one line
naming it and the reason; files of an earlier run in out_dir are replaced only by whole files.

out_dir may be the user's (issue 23): it is locked while a track writes there (a second track
into it is refused) and the names above are claimed in its manifest before the model is loaded
(`utils.claimed_files`): one that exists and mobileinst did not write is refused, never replaced.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tqdm import tqdm

from ..errors import MobileInstError
from ..utils import (IMGSZ_RANGE, check_output_dir, check_range, claimed_files, resolve_device,
                     write_json)
from ..viz import color, draw_instances
from ..infer.video import TrackedFrame, VideoPredictor
from ..infer.video_results import TrackResults
from .video_io import FrameSource, Mp4Writer, open_frames


def overlay(image: np.ndarray, out: TrackedFrame) -> np.ndarray:
    """RGB frame with the tracked instances drawn, one colour per track id."""
    labels = [f"#{i} {n} {s:.2f}" for i, n, s in zip(out.track_ids, out.names, out.scores)]
    return draw_instances(image, out.masks, labels, [color(int(i)) for i in out.track_ids])


def track_source(weights: str | Path | VideoPredictor, source: str | Path, out_dir: str | Path,
                 reuse: int = 1, conf: float = 0.3, imgsz: int | None = None, patience: int = 10,
                 video_id: int = 1, device: str = "cpu", save_video: bool = True,
                 progress: bool = True, backend: str = "torch", threads: int | None = None,
                 features: str | Path | None = None) -> dict:
    """Track every frame of `source` (video file, frame folder or glob); see the module docstring.
    backend "onnxruntime" runs a .pt exported once to cached graphs beside it, or a key-frame .onnx
    plus its `features` graph (`VideoPredictor.from_weights`); threads: the network's CPU threads.
    Returns the summary (also written to summary.json)."""
    check_range("--conf", conf, 0.0, 1.0)
    check_range("--reuse", reuse, 1, 10000)
    check_range("--patience", patience, 0, 10**6)
    check_range("--imgsz", imgsz, *IMGSZ_RANGE)
    check_range("--threads", threads, 1, 1024)
    if not isinstance(weights, VideoPredictor):
        device = str(resolve_device(device))
    check_output_dir(out_dir, OUT_DIR)
    with open_frames(source) as frames, claimed_files(  # a bad source fails before the model loads
            Path(out_dir), output_names(frames.name, save_video), OUT_DIR) as out:
        if isinstance(weights, VideoPredictor):
            vp = weights
            vp.reset()
        else:
            vp = VideoPredictor.from_weights(weights, backend, device=device, threads=threads,
                                             features=features, reuse=reuse, conf=conf,
                                             patience=patience, **({"imgsz": imgsz} if imgsz else {}))
        return _track(vp, frames, out, video_id, save_video, progress)


OUT_DIR = "track output folder (--out-dir)"


def output_names(name: str, save_video: bool) -> list[str]:
    """What a track of the source `name` writes into its out_dir."""
    return [f"{name}.mp4"] * save_video + ["results.json", "summary.json"]


def _track(vp: VideoPredictor, frames: FrameSource, out: Path, video_id: int, save_video: bool,
           progress: bool) -> dict:
    """track_source's loop once its options are checked and `out` is locked and claimed."""
    results = TrackResults(video_id, vp.cat_ids, vp.class_names)
    video_path = out / f"{frames.name}.mp4"
    writer = Mp4Writer(video_path, frames.fps) if save_video else None
    summary = {"source": str(frames.source), "frames_done": 0, "frames_total": frames.length,
               "complete": False, "backend": vp.net.backend,
               "reuse": vp.reuse, "conf": vp.tracker.cfg.start_score,
               "patience": vp.tracker.cfg.patience, "imgsz": vp.imgsz,
               "video": str(video_path) if save_video else None, "results": str(out / "results.json")}
    t0 = time.perf_counter()
    bar = tqdm(total=frames.length, desc="track", unit="frame", dynamic_ncols=True, disable=not progress)
    try:
        for _, image in frames:
            tracked = vp.step(image)
            results.add(tracked)
            if writer is not None:
                writer.write(overlay(image, tracked))
            summary["frames_done"] += 1
            bar.update(1)
        summary["complete"] = True
    finally:
        bar.close()
        frames.close()
        elapsed = time.perf_counter() - t0
        summary.update(frames_total=frames.length or summary["frames_done"],
                       tracks=len(results.records()), seconds=round(elapsed, 3),
                       fps=round(summary["frames_done"] / max(elapsed, 1e-9), 2))
        write_outputs(writer, results, summary, out)
    return summary


def write_outputs(writer: Mp4Writer | None, results: TrackResults, summary: dict, out: Path) -> None:
    """Finish the mp4, then write results.json and summary.json, each tried even when one before
    failed (a full disk: the small json files may still fit; summary.json then says `video:
    null`). A failure is one MobileInstError: the first file's line, naming the others that
    failed too. Every file is written atomically, so an earlier run's file stays whole."""
    failed: list[tuple[Path, MobileInstError]] = []
    if writer is not None:
        try:
            writer.close()
        except MobileInstError as e:
            failed.append((writer.path, e))
            summary["video"] = None
    for path, write in ((out / "results.json", results.save),
                        (out / "summary.json", lambda p: write_json(p, summary))):
        try:
            write(path)
        except MobileInstError as e:
            failed.append((path, e))
    if failed:
        also = [str(p) for p, _ in failed[1:]]
        raise MobileInstError(str(failed[0][1]) + (f"; not written either: {', '.join(also)}" if also else ""))
