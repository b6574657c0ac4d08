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
from ..export.onnx import FEATURES_OUTPUTS, POSTPROCESS_OUTPUTS, RAW_OUTPUTS, graph_kind
from ..models.postprocess import InferenceConfig
from ..registry import ModelConfig

# Exported files carry `format_version` in their metadata (absent = 1); a newer one is refused,
# as `checkpoint.load_checkpoint` refuses a newer checkpoint format.
EXPORT_FORMAT_VERSION = 1
INPUT_DTYPES = ("uint8", "float32")  # what `export --input-dtype` writes
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
        """From the metadata `mobileinst export` writes (ONNX metadata_props or sidecar json):
        every field read is checked (`MetaReader`); a wrong one is a CheckpointError naming it."""
        r = MetaReader(path, meta)
        version = r.integer("format_version", 1)
        if version > EXPORT_FORMAT_VERSION:
            raise CheckpointError(f"{path}: export format {version} is newer than this mobileinst "
                                  f"reads (format {EXPORT_FORMAT_VERSION}): upgrade mobileinst to run it")
        model_cfg = r.parsed("model_config", {}, lambda v: isinstance(v, dict), "a json object")
        names = r.parsed("class_names", [], _strings, "a json list of strings")
        size = r.parsed("input_size", None, _size, "null or a json [height, width] of positive integers")
        batch = None if meta.get("batch", "dynamic") == "dynamic" else r.integer("batch", 1, low=1)
        spec = InputSpec(r.choice("input_dtype", "uint8", INPUT_DTYPES), tuple(size) if size else None, batch,
                         r.integer("size_divisor", 32, low=1))
        thresholds = InferenceConfig(r.number("score_threshold", 0.005), r.number("mask_threshold", 0.45),
                                     r.integer("max_det", 100, low=1))
        cat_ids = r.parsed("cat_ids", [], _ints, "a json list of integers")
        r.parsed("outputs", [], _outputs, "a json object of output name -> description")  # output_names
        num_classes = _config_int(path, model_cfg, "num_classes", len(names))
        return cls(r.text("model_name", str(model_cfg.get("name", "?"))), num_classes, tuple(names),
                   tuple(cat_ids or range(1, len(names) + 1)),
                   min(size) if size else r.integer("imgsz", 640, low=1),
                   _config_int(path, model_cfg, "mask_upsample", 2), thresholds, spec,
                   r.choice("graph", "", GRAPHS) or graph_kind(meta),
                   str(path), r.parsed("conf", None, _number, "null or a number"))


class MetaReader:
    """Typed reads of an export's metadata (str -> str; json-encoded values where noted): a
    missing key gives the default, a wrong type or unparsable value a CheckpointError naming the
    file and the key."""

    def __init__(self, path: str | Path, meta: Any) -> None:
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: the mobileinst metadata must be a json object, got "
                                  f"{type(meta).__name__}")
        self.path, self.meta = path, meta

    def _raw(self, key: str) -> str | None:
        value = self.meta.get(key)
        if value is not None and not isinstance(value, str):
            raise CheckpointError(f"{self.path}: metadata {key} must be a string (as `mobileinst "
                                  f"export` writes it), got {type(value).__name__}")
        return value

    def _fail(self, key: str, raw: str, want: str) -> CheckpointError:
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        return CheckpointError(f"{self.path}: metadata {key} {shown!r} is not {want}")

    def text(self, key: str, default: str) -> str:
        raw = self._raw(key)
        return default if raw is None else raw

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        raw = self._raw(key)
        if raw is not None and raw not in choices:
            raise self._fail(key, raw, f"one of {', '.join(choices)}")
        return default if raw is None else raw

    def integer(self, key: str, default: int, low: int = 0) -> int:
        raw = self._raw(key)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise self._fail(key, raw, "an integer") from None
        if not low <= value <= 2**31:
            raise self._fail(key, raw, f"an integer in [{low}, {2**31}]")
        return value

    def number(self, key: str, default: float) -> float:
        raw = self._raw(key)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise self._fail(key, raw, "a number") from None
        if not 0.0 <= value <= 1.0:
            raise self._fail(key, raw, "a number in [0, 1]")
        return value

    def parsed(self, key: str, default: Any, ok, want: str) -> Any:
        """json.loads of the value, which `ok(value)` must accept."""
        raw = self._raw(key)
        if raw is None:
            return default
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: thousands of nested brackets
            raise self._fail(key, raw, want) from None
        if not ok(value):
            raise self._fail(key, raw, want)
        return value


def output_names(meta: dict[str, str]) -> tuple[str, ...]:
    """The outputs an export's metadata lists, in order (older files: those of its graph kind);
    read from metadata that `ModelInfo.from_metadata` accepted."""
    if "outputs" in meta:
        return tuple(json.loads(meta["outputs"]))
    kind = graph_kind(meta)
    return tuple({"postprocess": POSTPROCESS_OUTPUTS, "features": FEATURES_OUTPUTS}.get(kind, RAW_OUTPUTS))


def _config_int(path: str | Path, model_cfg: dict, key: str, default: int) -> int:
    value = model_cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100000:
        raise CheckpointError(f"{path}: metadata model_config {key} must be an integer in "
                              f"[1, 100000], got {value!r}")
    return value


def _strings(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _outputs(v: Any) -> bool:
    """The exporter's {name: description} (a list of names is taken too)."""
    return _strings(list(v.values()) + list(v)) if isinstance(v, dict) else _strings(v)


def _ints(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)


def _size(v: Any) -> bool:
    return v is None or (_ints(v) and len(v) == 2 and all(0 < x <= 65536 for x in v))


def _number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


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
