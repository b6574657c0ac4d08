"""`mobileinst predict`: images, folders and globs -> overlays + a JSON of instances.

    predict_source("best.pt", "photos/", out_dir="runs/predict/exp")   # what the CLI runs

The network runs behind the inference layer's predictor (`mobileinst.infer`: any backend, the
image resized so its short side is `imgsz`, masks back at the original size); this module is the
job around it: checking the options and the output folder first, naming overlays, the records.
"""
from __future__ import annotations

import logging
import math
import numbers
import os
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .data.coco import read_rgb
from .data.sources import list_sources
from .errors import DataError, MobileInstError
from .infer.factory import load_predictor
from .infer.predictor import Predictor
from .infer.results import recorded_masks, result_records
from .train.run_dir import claim_new_run_dir  # runs/predict/expN, claimed atomically as training's
from .utils import IMGSZ_RANGE, folder_lock, write_json
from .viz import color, draw_instances, save_rgb

log = logging.getLogger("mobileinst.predict")


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
                   threads: int | None = None, exist_ok: bool = False) -> dict:
    """`mobileinst predict`: an overlay per image and predictions.json for every image of source.

    Overlays go to out_dir/overlays/, named by the image's path relative to the source folder
    (a glob: its part before the first wildcard; a file: its folder) plus ".jpg" unless that
    already ends in .jpg: photos/a.jpg -> overlays/a.jpg, photos/a.png -> overlays/a.png.jpg,
    photos/sub/a.jpg (from photos/**/*.jpg) -> overlays/sub/a.jpg. Names never collide
    (`overlay_names`). The options are checked (`check_predict_options`) and out_dir is created
    and probed for writing before the model is loaded; each is a MobileInstError naming it.
    Unreadable images are skipped with a warning naming each; the summary lists them
    (`skipped_files`). out_dir is locked while this runs (a second predict into it is refused) and
    a predictions.json already there, an earlier run's, is replaced only when `exist_ok`.

    backend "onnxruntime" takes an .onnx from `mobileinst export`, or a .pt that is exported once
    to a cached .onnx beside it (same results as "torch")."""
    check_predict_options(conf, imgsz, threads)
    files = list_sources(source)  # fail on a bad source before loading anything
    out = prepare_out_dir(Path(out_dir) if out_dir else claim_new_run_dir("runs/predict"), save_overlays)
    with folder_lock(out, "output folder (--out-dir)"):
        if (out / "predictions.json").exists() and not exist_ok:
            raise MobileInstError(f"{out}: holds the predictions.json of an earlier predict; "
                                  "--exist-ok replaces it, or choose another --out-dir")
        return _predict_files(weights, files, source, out, conf, imgsz, device, backend,
                              save_overlays, threads)


def _predict_files(weights: str | Path, files: list[Path], source: str | Path, out: Path,
                   conf: float, imgsz: int | None, device: str, backend: str, save_overlays: bool,
                   threads: int | None) -> dict:
    """predict_source's work once its options are checked and `out` is claimed."""
    names = overlay_names(files, source_root(source))
    predictor = load_predictor(weights, backend=backend, imgsz=imgsz, conf=conf, device=device,
                               threads=threads)
    cat_ids = predictor.cat_ids
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
    function so that the image, masks and overlay are freed before the next image.

    The full-size masks are made a few at a time (`lazy_masks`: `MaskChunks`) and each is
    encoded and drawn in one pass (`recorded_masks`), then dropped: `--conf 0` on a 6000 x 6000
    photo kept 95 masks of 36 MB at once (4.4 GB peak); now ~64 MiB of masks at most."""
    try:
        image = read_rgb(path)
    except DataError as e:
        log.warning("skipped: %s", e)
        return None
    result = predictor(image, lazy_masks=True)
    if overlay_path is None:
        return result_records(result, image_id, str(path), cat_ids)
    records: list[dict] = []
    masks = recorded_masks(result, image_id, str(path), cat_ids, records)
    labels = [f"{n} {s:.2f}" for n, s in zip(result.names, result.scores)]
    overlay = draw_instances(image, masks, labels, [color(k) for k in range(len(result))])
    save_rgb(overlay_path, overlay)
    return records
