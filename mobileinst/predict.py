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
import math
import numbers
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import torch

from .data.coco import read_rgb
from .errors import DataError, MobileInstError
from .models.mobileinst import PIXEL_MEAN
from .models.postprocess import InferenceConfig
from .train.run_dir import claim_new_run_dir  # runs/predict/expN, claimed atomically as training's
from .utils import IMGSZ_RANGE

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
    """RGB uint8 (H, W, 3); DataError naming the file when it is missing, truncated or not an
    image: the training reader's checks (`data.coco.read_rgb`), so a half-written JPEG is skipped
    here too instead of being predicted on half grey."""
    return read_rgb(path)


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


def conf_config(cfg: InferenceConfig, conf: float) -> InferenceConfig:
    """The post-processing for `predict --conf`: pre-score threshold conf, final-score cut conf.

    Exactly the instances that ranking every query above min(score_threshold, conf) and then
    keeping score > conf gives (the old recipe), without a mask for the rest. Proof: the final
    score is pre * maskness with pre >= 0 and 0 <= maskness <= 1 (a mean of probabilities over
    the binarised pixels; in float32 too, since sum(p * fg) <= sum(fg) term by term with the same
    summation order and rounding is monotone), so final <= pre and final > conf implies
    pre > conf >= min(score_threshold, conf). The queries the higher threshold drops thus all
    have final <= conf and were dropped afterwards anyway; and as every one of them ranks below
    every instance with final > conf, the top max_detections of the survivors are unchanged (up
    to the order of exactly equal scores). Tested against a copy of the old recipe in
    tests/test_predict_robust.py."""
    return InferenceConfig(conf, cfg.mask_threshold, cfg.max_detections, conf=conf)


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
        self.model.inference = conf_config(cfg, self.conf)
        try:
            outs = self.model(batch.to(self.device), image_sizes=sizes,
                              orig_sizes=[im.shape[:2] for im in batch_imgs])
        finally:
            self.model.inference = cfg
        results = [self._result(o) for o in outs]
        return results[0] if single else results

    def _result(self, out: dict[str, torch.Tensor]) -> Result:
        keep = out["scores"] > self.conf  # all true after conf_config; kept as a guard
        if not bool(keep.all()):  # indexing copies the (K, H0, W0) masks: only when needed
            out = {k: v[keep] for k, v in out.items()}
        labels = out["labels"].cpu().numpy()
        return Result(labels, out["scores"].cpu().numpy(), out["masks"].cpu().numpy(),
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


def check_predict_options(conf: Any, imgsz: Any = None, threads: Any = None) -> None:
    """predict's numeric options, before any work; MobileInstError naming the first bad one."""
    if isinstance(conf, bool) or not isinstance(conf, numbers.Real) or not (
            math.isfinite(conf) and 0.0 <= conf <= 1.0):
        raise MobileInstError(f"conf (--conf) must be a finite number in [0, 1] (scores are "
                              f"probabilities), got {conf!r}")
    low, high = IMGSZ_RANGE  # 32: one cell of the stride-32 map; 4096: see its comment in utils
    if imgsz is not None and (isinstance(imgsz, bool) or not isinstance(imgsz, numbers.Integral)
                              or not low <= imgsz <= high):
        raise MobileInstError(f"imgsz (--imgsz) must be an integer short side in [{low}, {high}] "
                              f"pixels, got {imgsz!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, numbers.Integral)
                                or threads < 1):
        raise MobileInstError(f"threads (--threads) must be an integer >= 1, got {threads!r}")


def prepare_out_dir(out: Path, save_overlays: bool = True) -> Path:
    """Create the run folder and prove it writable (a probe file) before the model is loaded:
    MobileInstError naming it when it is a file, cannot be created or is read-only. The probe
    catches what os.access misses (a read-only file system seen by root)."""
    if out.exists() and not out.is_dir():
        raise MobileInstError(f"{out}: the output folder (--out-dir) is an existing file")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MobileInstError(f"{out}: cannot create the output folder (--out-dir): "
                              f"{e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise MobileInstError(f"{out}: the output folder (--out-dir) is not writable")
    try:
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise MobileInstError(f"{out}: the output folder (--out-dir) is not writable: "
                              f"{e.strerror or e}") from None
    for name, must_be_dir in (("overlays", True), ("predictions.json", False)):
        p = out / name
        if p.exists() and p.is_dir() != must_be_dir and (save_overlays or not must_be_dir):
            raise MobileInstError(f"{p}: in the way of predict's output (expected a "
                                  f"{'folder' if must_be_dir else 'file'})")
    return out


def source_root(source: str | Path) -> Path:
    """The folder the overlay names are relative to: the folder itself, a file's folder, or a
    glob's leading part without wildcards (`photos/**/*.jpg` -> photos)."""
    p = Path(source)
    if p.is_dir():
        return p
    if any(c in str(source) for c in "*?["):
        parts = []
        for part in p.parts:
            if any(c in part for c in "*?["):
                break
            parts.append(part)
        return Path(*parts) if parts else Path(".")
    return p.parent


def overlay_names(files: list[Path], root: Path) -> dict[Path, Path]:
    """Image path -> its overlay's path under overlays/, unique over `files`: the path relative to
    `root`, plus ".jpg" unless it already ends in .jpg (a.jpg -> a.jpg, a.png -> a.png.jpg,
    sub/b.jpeg -> sub/b.jpeg.jpg). The one clash this leaves (a.png beside an image named
    a.png.jpg, which keeps its name) is resolved with "~2", "~3", ...: a.png -> a.png~2.jpg."""
    def natural(f: Path) -> Path:
        try:
            rel = f.relative_to(root)
        except ValueError:
            rel = Path(f.name)
        return rel if rel.suffix == ".jpg" else rel.with_name(rel.name + ".jpg")

    names = {f: natural(f) for f in files}
    taken, used, out = set(names.values()), set(), {}
    first = [f for f in files if f.suffix == ".jpg"] + [f for f in files if f.suffix != ".jpg"]
    for f in first:  # .jpg images keep their own name; a "~k" name is never a natural name
        name, k = names[f], 1
        while name in used or (k > 1 and name in taken):
            k += 1
            name = names[f].with_name(f"{names[f].stem}~{k}.jpg")
        used.add(name)
        out[f] = name
    return out


def predict_source(weights: str | Path, source: str | Path, out_dir: str | Path | None = None,
                   conf: float = 0.3, imgsz: int | None = None, device: str = "cpu",
                   backend: str = "torch", save_overlays: bool = True,
                   threads: int | None = None) -> dict:
    """`mobileinst predict`: an overlay per image and predictions.json for every image of source.

    Overlays go to out_dir/overlays/, named by the image's path relative to the source folder
    (a glob: its part before the first wildcard; a file: its folder) plus ".jpg" unless that
    already ends in .jpg: photos/a.jpg -> overlays/a.jpg, photos/a.png -> overlays/a.png.jpg,
    photos/sub/a.jpg (from photos/**/*.jpg) -> overlays/sub/a.jpg. Names never collide
    (`overlay_names`). The options are checked (`check_predict_options`) and out_dir is created
    and probed for writing before the model is loaded; each is a MobileInstError naming it.
    Unreadable images are skipped with a warning naming each; the summary lists them
    (`skipped_files`).

    backend "onnxruntime" takes an .onnx from `mobileinst export`, or a .pt that is exported once
    to a cached .onnx beside it (same results as "torch")."""
    from tqdm import tqdm
    from .export.command import load_predictor
    from .utils import write_json

    check_predict_options(conf, imgsz, threads)
    files = list_sources(source)  # fail on a bad source before loading anything
    out = prepare_out_dir(Path(out_dir) if out_dir else claim_new_run_dir("runs/predict"), save_overlays)
    names = overlay_names(files, source_root(source))
    predictor = load_predictor(weights, backend=backend, imgsz=imgsz, conf=conf, device=device,
                               threads=threads)
    cat_ids = getattr(predictor.model, "cat_ids", None) if hasattr(predictor, "model") else None
    cat_ids = cat_ids or getattr(predictor, "cat_ids", None) or list(range(1, len(predictor.class_names) + 1))
    records, skipped, n_inst = [], [], 0
    for i, path in enumerate(tqdm(files, desc="predict", dynamic_ncols=True)):
        recs = _predict_file(predictor, path, i, cat_ids,
                             out / "overlays" / names[path] if save_overlays else None)
        if recs is None:
            skipped.append(str(path))
            continue
        n_inst += len(recs)
        records += recs
    write_json(out / "predictions.json", records)
    if skipped:
        log.warning("%d unreadable image(s) skipped: %s", len(skipped), ", ".join(skipped))
    return {"images": len(files) - len(skipped), "instances": n_inst, "skipped": len(skipped),
            "skipped_files": skipped, "out_dir": str(out)}


def _predict_file(predictor: Predictor, path: Path, image_id: int, cat_ids: list[int],
                  overlay_path: Path | None) -> list[dict] | None:
    """One image -> its records (and its overlay written); None when it is unreadable. Its own
    function so that the image, masks and overlay are freed before the next image."""
    from .viz import color, draw_instances, save_rgb
    try:
        image = read_image(path)
    except DataError as e:
        log.warning("skipped: %s", e)
        return None
    result = predictor(image)
    records = result_records(result, image_id, str(path), cat_ids)
    if overlay_path is not None:
        labels = [f"{n} {s:.2f}" for n, s in zip(result.names, result.scores)]
        save_rgb(overlay_path, draw_instances(image, result.masks, labels,
                                              [color(k) for k in range(len(result))]))
    return records
