"""YouTube-VIS AP of a model: track every val video, score the tracks with `evaluate_ytvis`.

Used by `mobileinst val` and by video training on a `video: true` DATA file. Tracks are started
at a low score (EVAL_CONF) because AP ranks detections by score and rewards recall; the CLI's 0.3
is a display threshold.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from .. import dist
from ..data.coco import read_rgb
from ..infer.video import VideoPredictor
from ..infer.video_results import TrackResults
from ..models.model_info import ModelInfo
from ..utils import write_json
from .ytvis_eval import VisMetrics, evaluate_ytvis

EVAL_CONF = 0.05


@torch.no_grad()
def predict_videos(vp: VideoPredictor, dataset, progress: bool = True) -> list[dict]:
    """YouTube-VIS records for every video of a `data.ytvis.YtvisClips` (dataset category ids)."""
    records = []
    for v, video in enumerate(tqdm(dataset.videos, desc="val videos", leave=False,
                                   dynamic_ncols=True, disable=not progress)):
        vp.reset()
        results = TrackResults(video["id"], dataset.cat_ids, dataset.class_names)
        for t in range(int(video["length"])):
            results.add(vp.step(read_rgb(dataset.frame_path(v, t))))
        records += results.records(int(video["length"]))
    return records


def evaluate_video_model(model: torch.nn.Module, dataset, device: torch.device | str = "cpu",
                         results_path: str | None = None, imgsz: int | None = None,
                         reuse: int = 1, conf: float = EVAL_CONF) -> VisMetrics | None:
    """Video mask AP of `model` on the videos of `dataset` (None on workers other than rank 0;
    the short side is `imgsz`, else the dataset's EvalTransform size, else 640)."""
    if not dist.is_main():
        return None
    imgsz = imgsz or getattr(dataset.transform, "imgsz", None) or 640
    was_training = model.training
    info = ModelInfo.for_model(model.cfg, dataset.class_names, dataset.cat_ids, imgsz)
    vp = VideoPredictor(model, info, reuse=reuse, conf=conf, device=device)
    try:
        records = predict_videos(vp, dataset)
    finally:
        model.train(was_training)
    if results_path:
        write_json(results_path, records)
    return evaluate_ytvis(dataset.json_path, records)
