"""Our own checkpoints: atomic writes, readable errors, and rebuilding a model from one.

A checkpoint is a dict: `model` (state_dict), `model_config` (ModelConfig fields), `class_names`,
`cat_ids` (contiguous label -> dataset category id), and for training runs `ema`, `optimizer`,
`scheduler`, `scaler`, `iteration`, `epoch`, `best_ap`, `rng`, `train_config`.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

FORMAT_VERSION = 1


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`.

    A process killed at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({**state, "format_version": FORMAT_VERSION}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read one of our checkpoints; any problem becomes a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{path}: not a mobileinst checkpoint (no 'model' / 'model_config'; "
                              "an official backbone file goes to --backbone-weights instead)")
    return ckpt


def model_from_checkpoint(path: str | Path, use_ema: bool = True):
    """Rebuild the network a checkpoint describes and load its weights (EMA ones when present).

    Returns (model in eval mode, checkpoint dict)."""
    from .models.mobileinst import MobileInst
    from .registry import ModelConfig

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
    model.class_names = list(ckpt.get("class_names") or [str(i) for i in range(cfg.num_classes)])
    model.cat_ids = list(ckpt.get("cat_ids") or range(1, cfg.num_classes + 1))
    return model.eval(), ckpt
