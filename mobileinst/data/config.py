"""The DATA file: a small YAML naming the train and val splits.

    train: {json: annotations/instances_train.json, images: train}
    val:   {json: annotations/instances_val.json, images: val}
    names: [circle, square, ...]   # optional: taken from the json's categories otherwise
    format: coco                   # or ytvis (YouTube-VIS videos); `video: true` means ytvis
    max_gap: 5                     # ytvis training: the largest frame gap d of a clip (t, t + d)
    coco: {json: ..., images: ...} # ytvis training: also COCO images as pseudo-clips (same category ids)

Paths are relative to the YAML's folder (absolute ones are kept); `load_data_config` returns them
absolute. `names` may also be a mapping {id: name} (taken in id order). `max_gap` is kept in
`DataConfig.extra`. Any other key is an error naming it and the closest known key (a typo such as
`nmaes:` is not silently ignored), as are wrong types and missing files.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import DataError
from .validate import shown

FORMATS = ("coco", "ytvis")
KEYS = ("train", "val", "names", "format", "video", "max_gap", "coco")
SPLIT_KEYS = ("json", "images")


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


def _known_keys(cfg: dict, known: tuple[str, ...], source: Path, where: str = "") -> None:
    """DataError for the first key not in `known`, suggesting the closest known one."""
    for key in cfg:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise DataError(f"{source}: unknown key {str(key)!r}{where}{hint} "
                            f"(known keys: {', '.join(known)})")


def _path(entry: dict, key: str, split: str, root: Path, source: Path) -> Path:
    value = entry[key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{source}: {split}.{key} must be a path (a string; quote numbers), "
                        f"got {shown(value)}")
    return root / Path(value).expanduser()


def _split(cfg: dict, key: str, root: Path, source: Path) -> Split:
    entry = cfg.get(key)
    if isinstance(entry, dict):
        _known_keys(entry, SPLIT_KEYS, source, f" in '{key}'")
    if not isinstance(entry, dict) or "json" not in entry or "images" not in entry:
        raise DataError(f"{source}: '{key}' must be a mapping with 'json' and 'images'")
    split = Split(_path(entry, "json", key, root, source), _path(entry, "images", key, root, source))
    if not split.json.is_file():
        raise DataError(f"{source}: {key} json {split.json} does not exist"
                        + (" (it is a folder)" if split.json.is_dir() else ""))
    if not split.images.is_dir():
        raise DataError(f"{source}: {key} image folder {split.images} does not exist"
                        + (" (it is a file)" if split.images.is_file() else ""))
    return split


def _names(cfg: dict, source: Path) -> list[str] | None:
    """`names`: a list of strings, or a mapping {int id: string} taken in id order."""
    names = cfg.get("names")
    if names is None:
        return None
    if isinstance(names, dict):
        if not all(type(k) is int for k in names):
            raise DataError(f"{source}: 'names' as a mapping needs int keys (ids), got "
                            f"{shown(next(k for k in names if type(k) is not int))}")
        names = [names[k] for k in sorted(names)]
    if not isinstance(names, list):
        raise DataError(f"{source}: 'names' must be a list of class names (or a mapping id: name), "
                        f"got {shown(names)}")
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n:
            raise DataError(f"{source}: names[{i}] must be a non-empty string, got {shown(n)}")
    return names


def _format(cfg: dict, source: Path) -> str:
    video = cfg.get("video", False)
    if type(video) is not bool:
        raise DataError(f"{source}: 'video' must be true or false, got {shown(video)}")
    fmt = cfg.get("format", "ytvis" if video else "coco")
    if fmt not in FORMATS:
        raise DataError(f"{source}: unknown format {fmt!r}; expected one of {FORMATS}")
    if video and fmt != "ytvis":
        raise DataError(f"{source}: 'video: true' contradicts 'format: {fmt}'")
    return fmt


def _extra(cfg: dict, source: Path) -> dict[str, Any]:
    extra = {k: cfg[k] for k in ("max_gap",) if k in cfg}
    gap = extra.get("max_gap", 1)
    if type(gap) is not int or gap < 1:
        raise DataError(f"{source}: 'max_gap' must be a positive int (frames), got {shown(gap)}")
    return extra


def _read(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: no such DATA file")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    if not isinstance(cfg, dict):
        raise DataError(f"{path}: a DATA file must be a mapping with train/val entries")
    return cfg


def load_data_config(path: str | Path) -> DataConfig:
    """Read and check a DATA yaml (every problem is one line naming the file)."""
    path = Path(path)
    cfg = _read(path)
    path = path.resolve()
    root = path.parent
    _known_keys(cfg, KEYS, path)
    fmt = _format(cfg, path)
    names = _names(cfg, path)
    extra = _extra(cfg, path)
    coco = None
    if "coco" in cfg:
        if fmt != "ytvis":
            raise DataError(f"{path}: 'coco' (images as pseudo-clips) needs format: ytvis")
        coco = _split(cfg, "coco", root, path)
    return DataConfig(path, _split(cfg, "train", root, path), _split(cfg, "val", root, path),
                      names, fmt, extra, coco)
