"""What a trained model is, apart from its weights: one typed description for every backend.

    info = ModelInfo.from_checkpoint("best.pt", ckpt)      # a checkpoint dict (format checked on load)
    info = ModelInfo.from_metadata("best.onnx", meta)      # an export's metadata (ONNX or sidecar json)

Class names, dataset category ids, the default short side (the training size), the input the
network takes and the post-processing thresholds used to be attributes set on the nn.Module and
read back with fallbacks; predictors, the tracker and the exporters read them from here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..export.onnx import graph_kind
from ..models.postprocess import InferenceConfig
from ..registry import ModelConfig

# Exported files carry `format_version` in their metadata (absent = 1); a newer one is refused,
# as `checkpoint.load_checkpoint` refuses a newer checkpoint format.
EXPORT_FORMAT_VERSION = 1
GRAPHS = ("torch", "raw", "postprocess", "features")  # torch: a PyTorch model, the raw graph's outputs


@dataclass(frozen=True)
class InputSpec:
    """The network's input: (B, 3, H, W) RGB 0..255 of `dtype`, H and W multiples of `divisor`;
    `size` (H, W) and `batch` fixed for a fixed-size export, None when any is accepted."""
    dtype: str = "float32"
    size: tuple[int, int] | None = None
    batch: int | None = None
    divisor: int = 32


@dataclass(frozen=True)
class ModelInfo:
    """One trained model: its variant, labels, default size, input and post-processing."""
    model_name: str
    num_classes: int
    class_names: tuple[str, ...]
    cat_ids: tuple[int, ...]  # contiguous label k -> the dataset's category id
    imgsz: int = 640  # default short side (the training size of a checkpoint)
    mask_upsample: int = 2  # stride-8 mask logits -> stride 4
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    input: InputSpec = field(default_factory=InputSpec)
    graph: str = "torch"
    source: str = ""  # the file it was read from
    graph_conf: float | None = None  # a post-processed graph exported with --conf keeps only > it

    def __post_init__(self) -> None:
        where = self.source or self.model_name
        for key in ("class_names", "cat_ids"):
            if len(getattr(self, key)) != self.num_classes:
                raise CheckpointError(f"{where}: '{key}' has {len(getattr(self, key))} entries but the "
                                      f"model has {self.num_classes} classes (an edited or mixed-up file)")
        if self.graph not in GRAPHS:
            raise CheckpointError(f"{where}: unknown graph kind {self.graph!r}")

    @property
    def max_size(self) -> int:
        """Default long-side cap: SparseInst's test size 640 / 853, scaled to imgsz."""
        return round(self.imgsz * 853 / 640)

    def names(self, labels) -> list[str]:
        """Class names of contiguous labels."""
        return [self.class_names[int(k)] for k in labels]

    # -- readers -------------------------------------------------------------------------------
    @classmethod
    def for_model(cls, cfg: ModelConfig, class_names: list[str] | None = None,
                  cat_ids: list[int] | None = None, imgsz: int = 640, source: str = "") -> "ModelInfo":
        """A PyTorch model's description (defaults: names "0".."C-1", ids 1..C)."""
        n = cfg.num_classes
        return cls(cfg.name, n, tuple(class_names or (str(i) for i in range(n))),
                   tuple(cat_ids or range(1, n + 1)), int(imgsz), int(cfg.mask_upsample),
                   source=source)

    @classmethod
    def from_checkpoint(cls, path: str | Path, ckpt: dict[str, Any]) -> "ModelInfo":
        """From a checkpoint dict read by `checkpoint.load_checkpoint` (which checked its format)."""
        cfg = ModelConfig(**ckpt["model_config"])
        train_cfg = ckpt.get("train_config") or {}
        return cls.for_model(cfg, _list(path, ckpt, "class_names"), _list(path, ckpt, "cat_ids"),
                             int(train_cfg.get("imgsz", 640)), str(path))

    @classmethod
    def from_metadata(cls, path: str | Path, meta: dict[str, str]) -> "ModelInfo":
        """From the metadata `mobileinst export` writes (ONNX metadata_props or sidecar json)."""
        version = int(meta.get("format_version", 1))
        if version > EXPORT_FORMAT_VERSION:
            raise CheckpointError(f"{path}: export format {version} is newer than this mobileinst "
                                  f"reads (format {EXPORT_FORMAT_VERSION}): upgrade mobileinst to run it")
        model_cfg = json.loads(meta.get("model_config", "{}"))
        names = json.loads(meta.get("class_names", "[]"))
        size = tuple(json.loads(meta.get("input_size", "null")) or ()) or None
        batch = meta.get("batch", "dynamic")
        spec = InputSpec(meta.get("input_dtype", "uint8"), size,
                         None if batch == "dynamic" else int(batch), int(meta.get("size_divisor", 32)))
        thresholds = InferenceConfig(float(meta.get("score_threshold", 0.005)),
                                     float(meta.get("mask_threshold", 0.45)), int(meta.get("max_det", 100)))
        return cls(meta.get("model_name", model_cfg.get("name", "?")),
                   int(model_cfg.get("num_classes", len(names))), tuple(names),
                   tuple(json.loads(meta.get("cat_ids", "[]")) or range(1, len(names) + 1)),
                   min(size) if size else int(meta.get("imgsz", 640)),
                   int(model_cfg.get("mask_upsample", 2)), thresholds, spec, graph_kind(meta), str(path),
                   json.loads(meta.get("conf", "null")))


def _list(path: str | Path, ckpt: dict, key: str) -> list | None:
    """ckpt[key] as a list, or None when absent; a value that is not a list is refused."""
    values = ckpt.get(key)
    if not values:
        return None
    if not isinstance(values, (list, tuple)):
        raise CheckpointError(f"{path}: '{key}' must be a list, got {type(values).__name__}")
    return list(values)


class Described:
    """What image and video predictors share: the trained model's names and ids from `info`."""

    info: ModelInfo

    @property
    def class_names(self) -> list[str]:
        return list(self.info.class_names)

    @property
    def cat_ids(self) -> list[int]:
        return list(self.info.cat_ids)
