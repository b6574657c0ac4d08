"""Prediction on images: files, folders and globs -> overlays + a JSON of instances.

    predictor = Predictor.from_checkpoint("best.pt")
    result = predictor(image_rgb)            # labels, scores, masks at the image's own size
    predictor.predict_source("photos/", out_dir="runs/predict/exp")

The image is resized so its short side is `imgsz` (long side capped), padded to a multiple of 32
with the mean pixel, run through the network, and the masks come back at the original size.
"""
from __future__ import annotations

import glob
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError, MobileInstError
from .models.mobileinst import PIXEL_MEAN
from .models.postprocess import InferenceConfig

log = logging.getLogger("mobileinst.predict")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass
class Result:
    """Instances of one image: labels (K,), scores (K,), masks (K, H, W) bool, sorted by score."""
    labels: np.ndarray
    scores: np.ndarray
    masks: np.ndarray
    names: list[str] = field(default_factory=list)  # class name per instance
    path: str = ""

    def __len__(self) -> int:
        return len(self.scores)


def inference_size(h: int, w: int, imgsz: int, max_size: int) -> tuple[int, int]:
    """(h, w) scaled so the short side is imgsz and the long side at most max_size."""
    scale = min(imgsz / min(h, w), max_size / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def preprocess(images: list[np.ndarray], imgsz: int, max_size: int, divisor: int = 32
               ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """RGB uint8 images -> a padded batch (B, 3, Hp, Wp) float 0..255 and each resized size."""
    resized = []
    for img in images:
        h, w = inference_size(*img.shape[:2], imgsz, max_size)
        resized.append(cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR))
    hp = -(-max(r.shape[0] for r in resized) // divisor) * divisor
    wp = -(-max(r.shape[1] for r in resized) // divisor) * divisor
    batch = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1).repeat(len(images), 1, hp, wp)
    for i, r in enumerate(resized):
        batch[i, :, : r.shape[0], : r.shape[1]] = torch.from_numpy(r).permute(2, 0, 1).float()
    return batch, [r.shape[:2] for r in resized]


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); DataError naming the file when it is missing or not an image."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{path}: not a readable image (corrupt or unsupported format)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def list_sources(source: str | Path) -> list[Path]:
    """An image file, a folder of images (sorted), or a glob pattern -> image paths."""
    s = str(source)
    p = Path(s)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    elif any(c in s for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(s, recursive=True)
                       if Path(f).suffix.lower() in IMAGE_SUFFIXES)
    elif p.is_file():
        files = [p]
    else:
        raise DataError(f"{s}: no such file, folder or glob match")
    if not files:
        raise DataError(f"{s}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


class Predictor:
    """A network plus the pre/post-processing around it, on one device."""

    def __init__(self, model: torch.nn.Module, class_names: list[str] | None = None,
                 imgsz: int = 640, max_size: int | None = None, conf: float = 0.3,
                 device: str | torch.device = "cpu") -> None:
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.class_names = class_names or getattr(model, "class_names", None) or \
            [str(i) for i in range(model.cfg.num_classes)]
        self.imgsz = imgsz
        self.max_size = max_size or round(imgsz * 853 / 640)  # SparseInst test size 640 / 853
        self.conf = conf

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs) -> "Predictor":
        from .checkpoint import model_from_checkpoint
        model, ckpt = model_from_checkpoint(path)
        train_cfg = ckpt.get("train_config") or {}
        kwargs.setdefault("imgsz", train_cfg.get("imgsz", 640))
        return cls(model, model.class_names, **kwargs)

    @torch.no_grad()
    def __call__(self, images: np.ndarray | list[np.ndarray]) -> Result | list[Result]:
        """RGB uint8 image(s) (H, W, 3) -> Result(s) with score > conf, masks at the image's size."""
        single = isinstance(images, np.ndarray)
        batch_imgs = [images] if single else list(images)
        batch, sizes = preprocess(batch_imgs, self.imgsz, self.max_size)
        cfg = self.model.inference
        self.model.inference = InferenceConfig(min(cfg.score_threshold, self.conf),
                                               cfg.mask_threshold, cfg.max_detections)
        try:
            outs = self.model(batch.to(self.device), image_sizes=sizes,
                              orig_sizes=[im.shape[:2] for im in batch_imgs])
        finally:
            self.model.inference = cfg
        results = [self._result(o) for o in outs]
        return results[0] if single else results

    def _result(self, out: dict[str, torch.Tensor]) -> Result:
        keep = out["scores"] > self.conf
        labels = out["labels"][keep].cpu().numpy()
        return Result(labels, out["scores"][keep].cpu().numpy(), out["masks"][keep].cpu().numpy(),
                      [self.class_names[i] for i in labels])

    def iter_source(self, source: str | Path) -> Iterator[tuple[Path, np.ndarray | None, Result | None]]:
        """(path, image, result) per image of the source; unreadable images give (path, None, None)
        with a warning, so one bad file does not stop a folder."""
        for path in list_sources(source):
            try:
                image = read_image(path)
            except DataError as e:
                log.warning("skipped: %s", e)
                yield path, None, None
                continue
            result = self(image)
            result.path = str(path)
            yield path, image, result


def next_dir(root: str | Path) -> Path:
    root = Path(root)
    for i in range(1, 100000):
        d = root / ("exp" if i == 1 else f"exp{i}")
        if not d.exists():
            return d
    raise MobileInstError(f"{root}: too many runs")


def result_records(result: Result, image_id: int, file_name: str, cat_ids: list[int]) -> list[dict]:
    """COCO-style records of one image (original category ids, RLE masks, boxes from the masks)."""
    from pycocotools import mask as mask_utils
    from .evaluate.coco_eval import encode_mask
    records = []
    for label, name, score, mask in zip(result.labels, result.names, result.scores, result.masks):
        rle = encode_mask(mask)
        records.append({"image_id": image_id, "file_name": file_name,
                        "category_id": int(cat_ids[int(label)]), "category_name": name,
                        "score": round(float(score), 5), "segmentation": rle,
                        "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)],
                        "area": int(mask.sum())})
    return records


def predict_source(weights: str | Path, source: str | Path, out_dir: str | Path | None = None,
                   conf: float = 0.3, imgsz: int | None = None, device: str = "cpu",
                   backend: str = "torch", save_overlays: bool = True,
                   threads: int | None = None) -> dict:
    """`mobileinst predict`: overlays/<name>.jpg and predictions.json for every image of source.

    backend "onnxruntime" takes an .onnx from `mobileinst export`, or a .pt that is exported once
    to a cached .onnx beside it (same results as "torch")."""
    from tqdm import tqdm
    from .export.command import load_predictor
    from .utils import write_json
    from .viz import color, draw_instances, save_rgb

    files = list_sources(source)  # fail on a bad source before loading anything
    predictor = load_predictor(weights, backend=backend, imgsz=imgsz, conf=conf, device=device,
                               threads=threads)
    cat_ids = getattr(predictor.model, "cat_ids", None) if hasattr(predictor, "model") else None
    cat_ids = cat_ids or getattr(predictor, "cat_ids", None) or list(range(1, len(predictor.class_names) + 1))
    out = Path(out_dir) if out_dir else next_dir("runs/predict")
    records, skipped, n_inst = [], 0, 0
    for i, path in enumerate(tqdm(files, desc="predict", dynamic_ncols=True)):
        try:
            image = read_image(path)
        except DataError as e:
            log.warning("skipped: %s", e)
            skipped += 1
            continue
        result = predictor(image)
        n_inst += len(result)
        records += result_records(result, i, str(path), cat_ids)
        if save_overlays:
            labels = [f"{n} {s:.2f}" for n, s in zip(result.names, result.scores)]
            overlay = draw_instances(image, result.masks, labels, [color(k) for k in range(len(result))])
            save_rgb(out / "overlays" / f"{path.stem}.jpg", overlay)
    write_json(out / "predictions.json", records)
    return {"images": len(files) - skipped, "instances": n_inst, "skipped": skipped, "out_dir": str(out)}
