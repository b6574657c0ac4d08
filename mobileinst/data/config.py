"""The DATA file: a small YAML naming the train and val splits.

    train: {json: annotations/instances_train.json, images: train}
    val:   {json: annotations/instances_val.json, images: val}
    names: [circle, square, ...]   # optional: taken from the json's categories otherwise
    format: coco                   # or ytvis (YouTube-VIS videos); `video: true` means ytvis
    max_gap: 5                     # ytvis training: the largest frame gap d of a clip (t, t + d)
    coco: {json: ..., images: ...} # ytvis training: also COCO images as pseudo-clips (same category ids)

Paths are relative to the YAML's folder (absolute ones are kept); `load_data_config` returns them
absolute. Other keys are kept in `DataConfig.extra`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import DataError

FORMATS = ("coco", "ytvis")


@dataclass
class Split:
    json: Path  # the COCO (or YouTube-VIS) json, absolute
    images: Path  # the image folder the json's file_names are relative to, absolute


@dataclass
class DataConfig:
    path: Path  # the DATA yaml itself, absolute
    train: Split
    val: Split
    names: list[str] | None = None
    format: str = "coco"
    extra: dict = field(default_factory=dict)
    coco: Split | None = None  # ytvis training: COCO images mixed in as pseudo-clips


def _split(cfg: dict, key: str, root: Path, source: Path) -> Split:
    entry = cfg.get(key)
    if not isinstance(entry, dict) or "json" not in entry or "images" not in entry:
        raise DataError(f"{source}: '{key}' must be a mapping with 'json' and 'images'")
    split = Split(root / Path(str(entry["json"])).expanduser(),
                  root / Path(str(entry["images"])).expanduser())
    if not split.json.is_file():
        raise DataError(f"{source}: {key} json {split.json} does not exist")
    if not split.images.is_dir():
        raise DataError(f"{source}: {key} image folder {split.images} does not exist")
    return split


def load_data_config(path: str | Path) -> DataConfig:
    """Read and check a DATA yaml (every problem names the file)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such DATA file")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise DataError(f"{path}: a DATA file must be a mapping with train/val entries")
    path = path.resolve()
    root = path.parent
    fmt = str(cfg.get("format", "ytvis" if cfg.get("video") is True else "coco"))
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown format {fmt!r}; expected one of {FORMATS}")
    names = cfg.get("names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise DataError(f"{path}: 'names' must be a list of class names")
    coco = None
    if "coco" in cfg:
        if fmt != "ytvis":
            raise DataError(f"{path}: 'coco' (images as pseudo-clips) needs format: ytvis")
        coco = _split(cfg, "coco", root, path)
    extra = {k: v for k, v in cfg.items() if k not in ("train", "val", "names", "format", "video", "coco")}
    return DataConfig(path, _split(cfg, "train", root, path), _split(cfg, "val", root, path),
                      names, fmt, extra, coco)
