"""The YOLO side of benchmarks/learning_curve.py: COCO -> YOLO-seg labels, time-budgeted training
with ultralytics' own trainer, and COCO results records of its predictions.

Only the functions under "ultralytics" import it (in the worker process, after the stand-in
torchvision of latency.py): the conversion and the label read-back (`--self-check`) need only
cv2 and pycocotools.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml
from pycocotools import mask as mask_utils

from mobileinst.data.config import load_data_config
from mobileinst.evaluate.coco_eval import instances_to_coco_json, segmentation_to_rle


# -- COCO -> YOLO-seg ------------------------------------------------------------------------------
def keyhole(contours: list[np.ndarray]) -> np.ndarray:
    """Join contours (k, 2) into one polygon through zero-width bridges at their closest points:
    filled with cv2.fillPoly's even-odd rule (as ultralytics rasterises a label), separate parts
    stay filled and holes (a ring's) stay empty."""
    poly = contours[0]
    for c in contours[1:]:
        d = ((poly[:, None, :] - c[None, :, :]) ** 2).sum(-1)
        i, j = np.unravel_index(int(d.argmin()), d.shape)
        ring = np.roll(c, -j, axis=0)
        poly = np.concatenate([poly[:i + 1], ring, ring[:1], poly[i:]])
    return poly


def mask_polygon(mask: np.ndarray) -> np.ndarray | None:
    """(H, W) mask -> one polygon (k, 2) in pixels (None when nothing of 3+ points is left)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    contours = [c[:, 0, :].astype(np.float64) for c in contours if len(c) >= 3]
    return keyhole(contours) if contours else None


def label_lines(anns: list[dict], h: int, w: int, index: dict[int, int]) -> list[str]:
    """One image's annotations -> 'class x1 y1 x2 y2 ...' lines (normalised); crowds skipped."""
    lines = []
    for ann in anns:
        if ann.get("iscrowd", 0):
            continue
        rle = segmentation_to_rle(ann["segmentation"], h, w, f"annotation {ann['id']}")
        poly = mask_polygon(mask_utils.decode(rle))
        if poly is not None:
            xy = (poly / (w, h)).clip(0, 1).ravel()
            lines.append(f"{index[ann['category_id']]} " + " ".join(f"{v:.6f}" for v in xy))
    return lines


def write_split(coco: dict, image_dir: Path, root: Path, split: str, index: dict[int, int]) -> None:
    """root/images/split/<file> (symlinks) and root/labels/split/<stem>.txt."""
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for img in coco["images"]:
        link = root / "images" / split / img["file_name"]
        label = (root / "labels" / split / img["file_name"]).with_suffix(".txt")
        link.parent.mkdir(parents=True, exist_ok=True)
        label.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to((image_dir / img["file_name"]).resolve())
        lines = label_lines(by_image.get(img["id"], []), img["height"], img["width"], index)
        label.write_text("".join(line + "\n" for line in lines))


def sorted_categories(json_path: Path) -> tuple[list[int], list[str]]:
    """Category ids in ascending order (YOLO class k = the k-th) and their names."""
    cats = sorted(json.loads(json_path.read_text())["categories"], key=lambda c: c["id"])
    return [c["id"] for c in cats], [str(c.get("name", c["id"])) for c in cats]


def write_yolo_dataset(data_yaml: str | Path, root: Path) -> Path:
    """The COCO-format DATA file's train/val as a YOLO-seg dataset in root (made anew: no stale
    image, label or ultralytics label cache is left from another set); returns its yaml."""
    cfg = load_data_config(data_yaml)
    shutil.rmtree(root, ignore_errors=True)
    cat_ids, names = sorted_categories(cfg.train.json)
    index = {c: k for k, c in enumerate(cat_ids)}
    for split in ("train", "val"):
        entry = getattr(cfg, split)
        write_split(json.loads(entry.json.read_text()), entry.images, root, split, index)
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump({"path": str(root.resolve()), "train": "images/train",
                                    "val": "images/val", "names": dict(enumerate(names))}))
    return path


def labels_as_records(data_yaml: str | Path, yolo_root: Path) -> list[dict]:
    """The val labels read back, rasterised at the original size as predictions of score 1:
    what `--self-check` scores (AP ~1 checks the polygons, the id mapping and the RLE writer)."""
    cfg = load_data_config(data_yaml)
    cat_ids, _ = sorted_categories(cfg.train.json)
    records: list[dict] = []
    for img in json.loads(cfg.val.json.read_text())["images"]:
        h, w = img["height"], img["width"]
        label = (yolo_root / "labels" / "val" / img["file_name"]).with_suffix(".txt")
        rows = [line.split() for line in label.read_text().splitlines()]
        masks = []
        for row in rows:
            xy = np.round(np.array(row[1:], float).reshape(-1, 2) * (w, h)).astype(np.int32)
            masks.append(cv2.fillPoly(np.zeros((h, w), np.uint8), [xy], 1))
        records += instances_to_coco_json(img["id"], [int(r[0]) for r in rows], [1.0] * len(rows),
                                          masks, cat_ids)
    return records


# -- ultralytics -----------------------------------------------------------------------------------
class BudgetReached(Exception):
    """Raised by the callbacks once the last budget's snapshot is saved: it ends the run there,
    before the trainer's closing validations (time that is no part of the comparison)."""


class BudgetSnapshots:
    """Trainer callbacks: a checkpoint each time the training clock passes a budget.

    The clock is the trainer's own (`train_time_start`, set after its set-up, the one its `time`
    argument is measured on); the seconds spent writing a snapshot are added to it, so they are
    not counted."""

    def __init__(self, minutes: list[float], folder: Path) -> None:
        self.pending = sorted(minutes)
        self.folder, self.points, self.batches = folder, [], 0

    def callbacks(self) -> dict:
        return {"on_train_batch_start": self.count, "on_train_batch_end": self.check,
                "on_train_epoch_end": self.check_epoch}

    def count(self, trainer) -> None:
        self.batches += 1

    def check(self, trainer) -> None:
        self.take(trainer, done=False)

    def check_epoch(self, trainer) -> None:
        # the trainer's own time stop breaks out before on_train_batch_end; its last epoch ends too
        self.take(trainer, done=trainer.stop or trainer.epoch + 1 >= trainer.epochs)

    def take(self, trainer, done: bool) -> None:
        elapsed = time.time() - trainer.train_time_start
        while self.pending and (done or elapsed >= 60 * self.pending[0]):
            t = time.time()
            m = self.pending.pop(0)
            weights = self.folder / f"budget-{m:g}min.pt"
            trainer.save_model()
            shutil.copyfile(trainer.last, weights)
            nb = len(trainer.train_loader)
            self.points.append({"minutes": m, "seconds": round(elapsed, 1), "iterations": self.batches,
                                "epochs": round(self.batches / nb, 3), "weights": str(weights),
                                "torch_threads": torch.get_num_threads()})
            trainer.train_time_start += time.time() - t
        if not self.pending:
            raise BudgetReached


def prepare_ultralytics(threads: int, config_dir: Path) -> None:
    """Import ultralytics offline, its settings under config_dir, at `threads` CPU threads."""
    os.environ["YOLO_OFFLINE"] = "1"  # no online checks (ultralytics/utils is_online)
    os.environ["YOLO_AUTOINSTALL"] = "0"  # never pip-installs a missing requirement
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    from latency import install_torchvision_stub
    install_torchvision_stub()
    import ultralytics.data.utils
    import ultralytics.utils.torch_utils
    # select_device() sets torch's threads to this constant (cpu_count - 1: one thread here)
    ultralytics.utils.torch_utils.NUM_THREADS = threads
    # check_det_dataset() looks for Arial.ttf (for plots, which are off) and would ask the network
    ultralytics.data.utils.check_font = lambda *args, **kwargs: None


def train(job: dict) -> list[dict]:
    """Train job["cfg"] from scratch under the largest budget; a snapshot at every budget."""
    from ultralytics import YOLO
    out = Path(job["out"])
    snaps = BudgetSnapshots(job["minutes"], out)
    model = YOLO(job["cfg"])
    for event, fn in snaps.callbacks().items():
        model.add_callback(event, fn)
    try:  # `time` (hours) also fits the lr schedule, warm-up and close_mosaic to the budget
        model.train(data=job["yolo_data"], time=max(job["minutes"]) / 60, imgsz=job["imgsz"],
                    batch=job["batch"], workers=job["workers"], device="cpu", seed=job["seed"],
                    pretrained=False, amp=False, plots=False, val=False, project=str(out),
                    name="train", exist_ok=True, verbose=False)
    except BudgetReached:
        pass
    return snaps.points


def predict_records(weights: str, data_yaml: str, imgsz: int) -> list[dict]:
    """COCO results records of a checkpoint on every val image: masks at the original image size
    (retina_masks), score = box confidence, class k -> the k-th smallest category id."""
    from ultralytics import YOLO
    cfg = load_data_config(data_yaml)
    cat_ids, _ = sorted_categories(cfg.train.json)
    model = YOLO(weights)
    records: list[dict] = []
    for img in json.loads(cfg.val.json.read_text())["images"]:
        r = model.predict(str(cfg.val.images / img["file_name"]), imgsz=imgsz, conf=0.001,
                          max_det=100, retina_masks=True, device="cpu", verbose=False)[0]
        if r.masks is None:
            continue
        masks = r.masks.data.cpu().numpy() > 0.5
        if masks.shape[1:] != (img["height"], img["width"]):
            raise RuntimeError(f"{img['file_name']}: masks {masks.shape[1:]} are not at the image size")
        records += instances_to_coco_json(img["id"], r.boxes.cls.cpu().numpy(),
                                          r.boxes.conf.cpu().numpy(), masks, cat_ids)
    return records
