"""Our own checkpoints: atomic writes, readable errors, and rebuilding a model from one.

A checkpoint is a dict: `model` (state_dict), `model_config` (ModelConfig fields), `class_names`,
`cat_ids` (contiguous label -> dataset category id), and for training runs `ema`, `optimizer`,
`scheduler`, `scaler`, `iteration`, `epoch`, `best_ap`, `rng`, `train_config`, `meter`.

Reading never runs code: `torch.load(weights_only=True)` takes tensors and plain Python values
only (format 2 stores the NumPy RNG state as a tensor). Format-1 files pickled NumPy's RNG state as
an ndarray, so NumPy's array reconstruction (and nothing else) is also allowed; a file that asks
for any other global is refused with one line.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import utils
from .errors import CheckpointError
from .models.mobileinst import MobileInst
from .models.registry import ModelConfig

FORMAT_VERSION = 2  # 2: RNG state as tensors / plain values (loads with weights_only=True)
# What a format-1 file's pickled NumPy RNG state needs; array reconstruction runs no user code.
_NP_CORE = getattr(np, "_core", None) or np.core  # NumPy 2 renamed np.core
LEGACY_NUMPY_GLOBALS = [_NP_CORE.multiarray._reconstruct, np.ndarray, np.dtype,
                        type(np.dtype(np.uint32))]


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`.

    A process killed at any moment leaves either the old file or the new one, never a torn one.
    A failed write (a full disk: ENOSPC) is a MobileInstError naming the file and the errno.
    """
    with utils.atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
        torch.save({**state, "format_version": FORMAT_VERSION}, f)  # a file: ENOSPC is an OSError


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read one of our checkpoints; any problem becomes a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals(LEGACY_NUMPY_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a global outside the allow-list: code, or a foreign object
        raise CheckpointError(f"{path}: refused: the file asks to run or build Python objects "
                              f"({_unsafe_globals(path)}); mobileinst checkpoints hold tensors and "
                              "plain values only, so this file was not written by mobileinst or was "
                              "tampered with") from None
    except Exception as e:  # noqa: BLE001 - torch.load on garbage raises KeyError, RuntimeError, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{path}: not a mobileinst checkpoint (no 'model' / 'model_config'; "
                              "an official backbone file goes to --backbone-weights instead)")
    version = ckpt.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version!r} is newer than this mobileinst "
                              f"reads (format {FORMAT_VERSION}): upgrade mobileinst to load it")
    check_contents(path, ckpt)
    return ckpt


def check_contents(path: Path, ckpt: dict[str, Any]) -> None:
    """The types of what every verb reads from a checkpoint, and a usable training size;
    CheckpointError naming the file and the field otherwise (an edited or foreign file)."""
    def fail(key: str, want: str) -> CheckpointError:
        return CheckpointError(f"{path}: '{key}' must be {want}, got {_shown(ckpt.get(key))}")
    for key in ("model", "model_config"):
        if not isinstance(ckpt[key], dict):
            raise fail(key, "a dict")
    ema = ckpt.get("ema")
    if ema and not (isinstance(ema, dict) and isinstance(ema.get("module"), dict)
                    and isinstance(ema.get("updates", 0), int)):
        raise fail("ema", "null or {'module': state dict, 'updates': int}")
    if not _all(ckpt.get("class_names"), str):
        raise fail("class_names", "a list of strings")
    if not _all(ckpt.get("cat_ids"), int):
        raise fail("cat_ids", "a list of integers")
    train_cfg = ckpt.get("train_config")
    if train_cfg is not None and not isinstance(train_cfg, dict):
        raise fail("train_config", "a dict")
    imgsz = (train_cfg or {}).get("imgsz", 640)
    low, high = utils.IMGSZ_RANGE
    if isinstance(imgsz, bool) or not isinstance(imgsz, int) or not low <= imgsz <= high:
        raise CheckpointError(f"{path}: training size imgsz {imgsz!r} is outside [{low}, {high}] "
                              "(below 32 px the network has no stride-32 level; above 4096 one "
                              "image's activations outgrow this machine's memory): an edited file?")


def _all(values: Any, kind: type) -> bool:
    """`values` absent/empty, or a list (tuple) of `kind` only (bool is no int)."""
    return not values or (isinstance(values, (list, tuple)) and all(
        isinstance(v, kind) and not isinstance(v, bool) for v in values))


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _unsafe_globals(path: Path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - only used to word the message
        return "unknown globals"
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def model_from_checkpoint(path: str | Path, use_ema: bool = True):
    """Rebuild the network a checkpoint describes and load its weights (EMA ones when present).

    Returns (model in eval mode, checkpoint dict); what the model was trained on (class names,
    category ids, size) is `models.model_info.ModelInfo.from_checkpoint(path, ckpt)`."""
    ckpt = load_checkpoint(path)
    try:
        cfg = ModelConfig(**ckpt["model_config"])
    except TypeError as e:
        raise CheckpointError(f"{path}: model_config does not fit this version: {e}") from None
    model = MobileInst(cfg)
    state = ckpt["ema"]["module"] if use_ema and ckpt.get("ema") else ckpt["model"]
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{path}: weights do not fit {cfg.name}: "
                              f"{str(e).splitlines()[1:3] or e}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: weights do not fit {cfg.name}: {len(result.missing_keys)} missing "
            f"(e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:3]})")
    return model.eval(), ckpt
