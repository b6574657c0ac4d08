"""Video tracking: accuracy, identity stability and speed of kernel reuse + kernel association.

    .venv/bin/python benchmarks/track_eval.py [--weights runs/demo/train/weights/best.pt]
        [--data DATA.yaml] [--reuse 1 3 5] [--threads 1 2] [--fps-imgsz 640]

On the synthetic YouTube-VIS val set (written to runs/track_eval/data unless --data is given):
1. video mask AP (mobileinst's YouTube-VIS evaluator) of the tracker at reuse interval K = 1, 3, 5,
   at the checkpoint's training size, and the AP change each K costs against K = 1;
2. identity switches per 100 tracked frames, for the tracker and for a per-frame BASELINE that runs
   the full model on every frame and links instances of consecutive frames by mask IoU only
   (Hungarian on 1 - IoU between this frame's instances and the live tracks' last masks, a link
   needs IoU >= 0.3; unlinked instances start tracks; the same start score, patience, class and
   score averaging as the tracker). An ID SWITCH (the CLEAR-MOT rule): in each frame a ground-truth
   track keeps its previous predicted track if that one still has mask IoU >= 0.5 with it, else it
   is matched to the predicted track with the highest IoU, if >= 0.5; a switch is counted when the
   matched id differs from the one at the GT track's previous matched frame. "Tracked frames" =
   GT-track frames with a match (the table gives that coverage). AP is measured with tracks started
   at a low score (--conf, 0.05: AP rewards recall), ID switches with the CLI's 0.3 (--switch-conf);
3. tracker frames/s on the CPU at short side 640 (frames upscaled) for each K and torch thread
   count: 3 warm-up frames, then the median over 3 repeats of (15 frames / their wall time),
   15 being a multiple of every K so key and reused frames are in proportion. The accuracy part
   runs with one thread (two threads on a loaded 2-core machine slow everything down 10x).
Prints a markdown table per part.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mobileinst.data.coco import read_rgb  # noqa: E402
from mobileinst.data.config import load_data_config  # noqa: E402
from mobileinst.data.synthetic_video import make_synthetic_ytvis  # noqa: E402
from mobileinst.data.ytvis import YtvisClips  # noqa: E402
from mobileinst.data.rle import encode_mask  # noqa: E402
from mobileinst.evaluate.ytvis_eval import evaluate_ytvis, load_ytvis_json  # noqa: E402
from mobileinst.models.postprocess import InferenceConfig, class_scores, maskness, upsample_masks  # noqa: E402
from mobileinst.infer.factory import load_trained  # noqa: E402
from mobileinst.models.model_info import ModelInfo  # noqa: E402
from mobileinst.infer.preprocess import preprocess  # noqa: E402
from mobileinst.evaluate.video import EVAL_CONF, predict_videos  # noqa: E402
from mobileinst.infer.video import VideoPredictor  # noqa: E402
from mobileinst.infer.tracker import TrackerConfig  # noqa: E402
from mobileinst.utils import keep_freed_memory  # noqa: E402

LINK_IOU = 0.3  # baseline: the least mask IoU that links an instance to a track
MATCH_IOU = 0.5  # id switches: a GT frame is matched to a predicted track at this IoU


# -- the per-frame mask-IoU baseline ----------------------------------------------------------------
class IouLinker:
    """Per-frame instances -> tracks by Hungarian matching on mask IoU with the live tracks."""

    def __init__(self, cfg: TrackerConfig) -> None:
        self.cfg, self.tracks, self.next_id = cfg, [], 1

    def update(self, frame: int, labels: np.ndarray, scores: np.ndarray, probs: np.ndarray,
               masks: np.ndarray) -> list[tuple[int, int, float, np.ndarray]]:
        """Instances (K,), (K,), class probs (K, C), masks (K, H, W) -> [(id, label, score, mask)]."""
        self.tracks = [t for t in self.tracks if frame - t["last"] <= self.cfg.patience]
        keep = scores >= self.cfg.keep
        labels, scores, probs, masks = labels[keep], scores[keep], probs[keep], masks[keep]
        rles = [encode_mask(m) for m in masks]
        assigned = [None] * len(rles)
        if rles and self.tracks:
            iou = np.asarray(mask_utils.iou(rles, [t["rle"] for t in self.tracks], [0] * len(self.tracks)))
            for i, j in zip(*linear_sum_assignment(1 - iou)):
                if iou[i, j] >= LINK_IOU:
                    assigned[i] = self.tracks[j]
        out = []
        for i, rle in enumerate(rles):
            t = assigned[i]
            if t is None:
                if scores[i] < self.cfg.start_score:
                    continue
                c = probs.shape[1]
                t = {"id": self.next_id, "sum": np.zeros(c), "score": np.zeros(c), "n": 0}
                self.next_id += 1
                self.tracks.append(t)
            t.update(rle=rle, last=frame, n=t["n"] + 1)
            t["sum"] += probs[i]
            t["score"] += probs[i] * scores[i] / max(probs[i].max(), 1e-9)  # prob x maskness
            label = int(t["sum"].argmax())
            out.append((t["id"], label, float(t["score"][label] / t["n"]), masks[i]))
        return out


@torch.no_grad()
def frame_instances(model, image: np.ndarray, imgsz: int, keep: float):
    """The full model on one frame, SparseInst post-processing (score = max class prob x
    maskness): labels (K,), scores (K,), class probs (K, C), masks (K, H, W) of score >= keep."""
    batch, sizes = preprocess([image], imgsz, round(imgsz * 853 / 640))
    raw = model.forward_raw(batch)
    probs = class_scores(raw["pred_logits"][0], raw["pred_scores"][0])  # (N, C)
    mask_prob = raw["pred_masks"][0].sigmoid()  # (N, H/4, W/4)
    thr = InferenceConfig().mask_threshold
    scores = probs.max(-1).values * maskness(mask_prob, thr)
    k = torch.nonzero(scores >= keep).flatten()
    masks = upsample_masks(mask_prob[k], tuple(batch.shape[-2:]), sizes[0], image.shape[:2]) > thr \
        if len(k) else torch.zeros((0, *image.shape[:2]), dtype=torch.bool)
    return probs[k].argmax(-1).numpy(), scores[k].numpy(), probs[k].numpy(), masks.numpy()


def baseline_records(model, dataset: YtvisClips, imgsz: int, conf: float) -> list[dict]:
    """YouTube-VIS records of the per-frame model + mask-IoU linking."""
    records = []
    for v, video in enumerate(dataset.videos):
        linker, tracks = IouLinker(TrackerConfig(conf)), {}
        n = int(video["length"])
        for t in range(n):
            inst = frame_instances(model, read_rgb(dataset.frame_path(v, t)), imgsz, linker.cfg.keep)
            for tid, label, score, mask in linker.update(t, *inst):
                rec = tracks.setdefault(tid, {"video_id": video["id"], "segmentations": [None] * n})
                rec.update(category_id=dataset.cat_ids[label], score=score)
                if mask.any():
                    rec["segmentations"][t] = encode_mask(mask)
        records += [r for r in tracks.values() if any(s is not None for s in r["segmentations"])]
    return records


# -- identity switches -------------------------------------------------------------------------------
def _rle(seg, h, w):
    if isinstance(seg, dict) and isinstance(seg.get("counts"), list):
        return mask_utils.frPyObjects(seg, h, w)
    return {"size": seg["size"], "counts": seg["counts"].encode() if isinstance(seg["counts"], str)
            else seg["counts"]}


def id_switches(gt: dict, records: list[dict]) -> tuple[int, int, int]:
    """(switches, tracked frames, GT frames): see the module docstring."""
    videos = {v["id"]: v for v in gt["videos"]}
    by_video: dict = {}
    for i, r in enumerate(records):
        by_video.setdefault(r["video_id"], []).append((i, r))
    switches = tracked = total = 0
    for a in gt["annotations"]:
        v = videos[a["video_id"]]
        h, w = int(v["height"]), int(v["width"])
        preds = by_video.get(a["video_id"], [])
        last = None
        for t, seg in enumerate(a["segmentations"]):
            if not seg:
                continue
            total += 1
            cand = [(i, r["segmentations"][t]) for i, r in preds if r["segmentations"][t]]
            if not cand:
                continue
            iou = np.asarray(mask_utils.iou([_rle(s, h, w) for _, s in cand], [_rle(seg, h, w)], [0]))[:, 0]
            if iou.max() < MATCH_IOU:
                continue
            ids = [i for i, _ in cand]
            keep = last in ids and iou[ids.index(last)] >= MATCH_IOU  # CLEAR-MOT: keep a valid match
            pid = last if keep else cand[int(iou.argmax())][0]
            tracked += 1
            switches += last is not None and pid != last
            last = pid
    return switches, tracked, total


# -- speed -------------------------------------------------------------------------------------------
def tracker_fps(model, frames: list[np.ndarray], reuse: int, imgsz: int, threads: int,
                n: int = 15, repeats: int = 3, warmup: int = 3) -> float:
    torch.set_num_threads(threads)
    vp = VideoPredictor(model, imgsz=imgsz, reuse=reuse, conf=0.3)
    for f in frames[:warmup]:
        vp.step(f)
    rates = []
    for _ in range(repeats):
        vp.reset()
        t0 = time.perf_counter()
        for i in range(n):
            vp.step(frames[i % len(frames)])
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="runs/demo/train/weights/best.pt")
    ap.add_argument("--data", default=None, help="video DATA yaml (default: synthetic val, written)")
    ap.add_argument("--reuse", type=int, nargs="+", default=[1, 3, 5])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--fps-imgsz", type=int, default=640)
    ap.add_argument("--imgsz", type=int, default=None, help="AP size (default: the checkpoint's)")
    ap.add_argument("--conf", type=float, default=EVAL_CONF, help="track start score for AP")
    ap.add_argument("--switch-conf", type=float, default=0.3, help="track start score for ID switches")
    args = ap.parse_args()
    keep_freed_memory()  # as `mobileinst track` does (cli.main): no page faults per frame

    model, info = load_trained(args.weights)
    imgsz = args.imgsz or info.imgsz
    data_yaml = Path(args.data) if args.data else make_synthetic_ytvis("runs/track_eval/data", n_train=0)
    data = load_data_config(data_yaml)
    ds = YtvisClips(data.val.json, data.val.images, None, data.names)
    gt = load_ytvis_json(data.val.json)
    torch.set_num_threads(1)
    print(f"checkpoint {args.weights} ({model.cfg.name}), {len(ds.videos)} val videos, "
          f"{len(ds)} frames, short side {imgsz}; tracks start at score {args.conf} for AP, "
          f"{args.switch_conf} for ID switches\n")

    def run(reuse, conf):
        if reuse is None:
            return baseline_records(model, ds, imgsz, conf)
        info = ModelInfo.for_model(model.cfg, ds.class_names, ds.cat_ids, imgsz)
        return predict_videos(VideoPredictor(model, info, reuse=reuse, conf=conf), ds, progress=False)

    rows = []
    for name, reuse in [("per-frame + mask-IoU linking (baseline)", None)] + \
            [(f"kernel association, reuse K={k}", k) for k in args.reuse]:
        m = evaluate_ytvis(gt, run(reuse, args.conf))
        recs = run(reuse, args.switch_conf)
        sw, tracked, total = id_switches(gt, recs)
        rows.append((name, reuse, m.AP, m.AP50, m.AR10, sw, tracked, total, len(recs)))
    ap1 = next((r[2] for r in rows if r[1] == 1), rows[0][2])
    print("| method | video AP | AP50 | AR10 | ΔAP vs K=1 | ID switches / 100 tracked frames | "
          "tracked / GT frames | tracks (at the switch score) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, reuse, a, a50, ar10, sw, tracked, total, n in rows:
        delta = f"{a - ap1:+.4f}" if reuse is not None else "-"
        print(f"| {name} | {a:.4f} | {a50:.4f} | {ar10:.4f} | {delta} | "
              f"{100 * sw / max(tracked, 1):.2f} ({sw}) | {tracked} / {total} | {n} |")

    frames = [read_rgb(ds.frame_path(0, t)) for t in range(int(ds.videos[0]["length"]))]
    h, w = frames[0].shape[:2]
    print(f"\ntracker frames/s, CPU, short side {args.fps_imgsz} ({w}x{h} frames resized), "
          "median of 3 x 15 frames after 3 warm-up frames\n")
    print("| reuse K | " + " | ".join(f"{t} thread{'s' * (t > 1)} fps" for t in args.threads) +
          " | ΔAP vs K=1 |")
    print("|---|" + "---|" * (len(args.threads) + 1))
    for k in args.reuse:
        fps = [tracker_fps(model, frames, k, args.fps_imgsz, t) for t in args.threads]
        a = next(r[2] for r in rows if r[1] == k)
        print(f"| {k} | " + " | ".join(f"{f:.2f}" for f in fps) + f" | {a - ap1:+.4f} |")


if __name__ == "__main__":
    main()
