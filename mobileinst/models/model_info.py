"""What a trained model is, apart from its weights: one typed description for every backend, and
the metadata of every export, written and read here.

    info = ModelInfo.from_checkpoint("best.pt", ckpt)      # a checkpoint dict (format checked on load)
    info = ModelInfo.from_metadata("best.onnx", meta)      # an export's metadata (ONNX or sidecar json)
    meta = info.for_graph("raw", size=(640, 640)).to_metadata({"exporter": "dynamo"})

`to_metadata` is the inverse of `from_metadata`: from_metadata(info.source, info.to_metadata())
== info. Export files carry `format_version` (absent = 1); a newer one is refused, as
`checkpoint.load_checkpoint` refuses a newer checkpoint format.

It sits in `models/`, the bottom layer, because both sides of the contract import it: the
exporters (`export/`) write it and the predictors (`infer/`), evaluation and checkpoints read it;
`infer/` cannot hold it, since its package imports the ONNX exporter (the cached export of a .pt).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from .. import __version__
from ..errors import CheckpointError
from .registry import ModelConfig
from .mobileinst import PIXEL_MEAN, PIXEL_STD
from .postprocess import InferenceConfig

FORMAT_VERSION = 1  # of the export metadata; a file with a newer one is refused
INPUT_NAME = "images"
SIZE_DIVISOR = 32
INPUT_DTYPES = ("uint8", "float32")  # what `export --input-dtype` writes
PARTS = ("full", "features")  # what `export --part` writes: the whole network, or M alone
GRAPHS = ("torch", "raw", "postprocess", "features")  # torch: a PyTorch model, the raw graph's outputs

# the outputs of each graph, name -> layout (the ONNX docstring, `mobileinst.export.onnx`, decodes them)
RAW_OUTPUTS = {
    "logits": "(B, N, C) float32 class logits",
    "objectness": "(B, N, 1) float32 objectness logit",
    "kernels": "(B, N, E) float32 mask kernels",
    "mask_features": "(B, E, H/s, W/s) float32 mask features at the mask stride s (8, or 4); "
                     "mask logits = bilinear x mask_upsample (s / 4) of kernels @ mask_features",
}
POSTPROCESS_OUTPUTS = {
    "labels": "(B, K) int64 class index; K = the instances kept (score > conf, or > 0 without "
              "conf; at most max_det; the most of any image for B > 1; may be 0)",
    "scores": "(B, K) float32 rescored score, best first; 0 = empty slot (an image of a batch "
              "with fewer instances than K)",
    "masks": "(B, K, H, W) uint8 binary masks at the input size",
    "kernels": "(B, K, E) float32 mask kernels of the kept queries",
}
FEATURES_OUTPUTS = {"mask_features": RAW_OUTPUTS["mask_features"]}
GRAPH_OUTPUTS = {"torch": RAW_OUTPUTS, "raw": RAW_OUTPUTS, "postprocess": POSTPROCESS_OUTPUTS,
                 "features": FEATURES_OUTPUTS}


def graph_kind(meta: Mapping[str, str]) -> str:
    """"raw", "postprocess" or "features" from a graph's metadata (older files lack `graph`)."""
    if "graph" in meta:
        return meta["graph"]
    return "postprocess" if meta.get("postprocess") == "true" else "raw"


@dataclass(frozen=True)
class InputSpec:
    """The network's input: (B, 3, H, W) RGB 0..255 of `dtype`, H and W multiples of `divisor`;
    `size` (H, W) and `batch` fixed for a fixed-size export, None when any is accepted."""
    dtype: str = "float32"
    size: tuple[int, int] | None = None
    batch: int | None = None
    divisor: int = SIZE_DIVISOR


@dataclass(frozen=True)
class ModelInfo:
    """One trained model: its variant, labels, default size, input, post-processing and, for an
    export, its graph (kind, outputs, the conf a post-processed graph was exported with)."""
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
    config: Mapping[str, Any] = field(default_factory=dict, hash=False, repr=False)  # ModelConfig.to_dict()
    outputs: tuple[str, ...] = ()  # the graph's output names, in order (default: those of `graph`)

    def __post_init__(self) -> None:
        where = self.source or self.model_name
        for key in ("class_names", "cat_ids"):
            if len(getattr(self, key)) != self.num_classes:
                raise CheckpointError(f"{where}: '{key}' has {len(getattr(self, key))} entries but the "
                                      f"model has {self.num_classes} classes (an edited or mixed-up file)")
        if self.graph not in GRAPHS:
            raise CheckpointError(f"{where}: unknown graph kind {self.graph!r}")
        if not self.outputs:
            object.__setattr__(self, "outputs", tuple(GRAPH_OUTPUTS[self.graph]))

    @property
    def max_size(self) -> int:
        """Default long-side cap: SparseInst's test size 640 / 853, scaled to imgsz."""
        return round(self.imgsz * 853 / 640)

    @property
    def part(self) -> str:
        """The part of the network the graph holds: "features" (M alone) or "full"."""
        return "features" if self.graph == "features" else "full"

    def names(self, labels) -> list[str]:
        """Class names of contiguous labels."""
        return [self.class_names[int(k)] for k in labels]

    def for_graph(self, graph: str, size: tuple[int, int] | None = None, batch: int | None = 1,
                  dtype: str = "float32", max_det: int | None = None,
                  conf: float | None = None) -> "ModelInfo":
        """This model exported as `graph` ("raw", "postprocess" or "features"): input (B, 3, H, W)
        of `dtype` at a fixed `size` and `batch` (None: any), the post-processing at most
        `max_det` instances (at most the queries), above `conf` (post-processed graphs). A
        fixed-size graph's default short side is its own (what `from_metadata` reads back)."""
        if size is None:
            spec = InputSpec(dtype, None, None, SIZE_DIVISOR)
        else:
            spec = InputSpec(dtype, (int(size[0]), int(size[1])), batch, SIZE_DIVISOR)
        queries = int(self.config.get("num_queries", 100))
        cap = min(max_det or self.inference.max_detections, queries)
        return replace(self, input=spec, graph=graph, outputs=tuple(GRAPH_OUTPUTS[graph]),
                       imgsz=min(spec.size) if spec.size else self.imgsz,
                       inference=InferenceConfig(self.inference.score_threshold,
                                                 self.inference.mask_threshold, cap),
                       graph_conf=None if conf is None else float(conf))

    # -- readers -------------------------------------------------------------------------------
    @classmethod
    def for_model(cls, cfg: ModelConfig, class_names: list[str] | None = None,
                  cat_ids: list[int] | None = None, imgsz: int = 640, source: str = "") -> "ModelInfo":
        """A PyTorch model's description (defaults: names "0".."C-1", ids 1..C)."""
        n = cfg.num_classes
        return cls(cfg.name, n, tuple(class_names or (str(i) for i in range(n))),
                   tuple(cat_ids or range(1, n + 1)), int(imgsz), int(cfg.mask_upsample),
                   source=source, config=cfg.to_dict())

    @classmethod
    def from_checkpoint(cls, path: str | Path, ckpt: dict[str, Any]) -> "ModelInfo":
        """From a checkpoint dict read by `checkpoint.load_checkpoint` (which checked its format)."""
        cfg = ModelConfig(**ckpt["model_config"])
        train_cfg = ckpt.get("train_config") or {}
        return cls.for_model(cfg, _list(path, ckpt, "class_names"), _list(path, ckpt, "cat_ids"),
                             int(train_cfg.get("imgsz", 640)), str(path))

    @classmethod
    def from_metadata(cls, path: str | Path, meta: Mapping[str, str]) -> "ModelInfo":
        """From the metadata `mobileinst export` writes (ONNX metadata_props or sidecar json):
        every field read is checked (`MetaReader`); a wrong one is a CheckpointError naming it."""
        r = MetaReader(path, meta)
        version = r.integer("format_version", 1)
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{path}: export format {version} is newer than this mobileinst "
                                  f"reads (format {FORMAT_VERSION}): upgrade mobileinst to run it")
        model_cfg = r.parsed("model_config", {}, lambda v: isinstance(v, dict), "a json object")
        names = r.parsed("class_names", [], _strings, "a json list of strings")
        size = r.parsed("input_size", None, _size, "null or a json [height, width] of positive integers")
        batch = None if meta.get("batch", "dynamic") == "dynamic" else r.integer("batch", 1, low=1)
        spec = InputSpec(r.choice("input_dtype", "uint8", INPUT_DTYPES), tuple(size) if size else None, batch,
                         r.integer("size_divisor", SIZE_DIVISOR, low=1))
        thresholds = InferenceConfig(r.number("score_threshold", 0.005), r.number("mask_threshold", 0.45),
                                     r.integer("max_det", 100, low=1))
        cat_ids = r.parsed("cat_ids", [], _ints, "a json list of integers")
        outputs = r.parsed("outputs", [], _outputs, "a json object of output name -> description")
        num_classes = _config_int(path, model_cfg, "num_classes", len(names))
        graph = r.choice("graph", "", GRAPHS) or graph_kind(meta)
        return cls(r.text("model_name", str(model_cfg.get("name", "?"))), num_classes, tuple(names),
                   tuple(cat_ids or range(1, len(names) + 1)),
                   min(size) if size else r.integer("imgsz", 640, low=1),
                   _config_int(path, model_cfg, "mask_upsample", 2), thresholds, spec, graph,
                   str(path), r.parsed("conf", None, _number, "null or a number"), model_cfg,
                   tuple(outputs))

    # -- the writer ------------------------------------------------------------------------------
    def to_metadata(self, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
        """The export metadata (str -> str, json-encoded where noted in `mobileinst.export.onnx`)
        that `from_metadata` reads back to this ModelInfo; `extra` entries (values json-encoded
        unless str: the exporter, the source checkpoint, ...) are added last."""
        dtype, size, dynamic = self.input.dtype, self.input.size, self.input.size is None
        descriptions = GRAPH_OUTPUTS[self.graph]
        meta = {
            "producer": "mobileinst",
            "format_version": str(FORMAT_VERSION),
            "mobileinst_version": __version__,
            "model_name": self.model_name,
            "model_config": json.dumps(dict(self.config)),
            "class_names": json.dumps(list(self.class_names)),
            "cat_ids": json.dumps(list(self.cat_ids)),
            "input_name": INPUT_NAME,
            "input_dtype": dtype,
            "input_layout": f"(B, 3, H, W) RGB {dtype} 0..255, not normalised; the graph "
                            "computes (x - mean) / std; H, W multiples of 32, pad bottom/right",
            "mean": json.dumps(PIXEL_MEAN),
            "std": json.dumps(PIXEL_STD),
            "size_divisor": str(self.input.divisor),
            "dynamic": json.dumps(dynamic),
            "input_size": json.dumps(None if size is None else list(size)),
            "batch": "dynamic" if self.input.batch is None else str(self.input.batch),
            "imgsz": str(self.imgsz),
            "postprocess": json.dumps(self.graph == "postprocess"),
            "outputs": json.dumps({n: descriptions.get(n, "") for n in self.outputs}),
            "score_threshold": str(self.inference.score_threshold),
            "mask_threshold": str(self.inference.mask_threshold),
            "max_det": str(self.inference.max_detections),
            "graph": self.graph,
        }
        if self.graph == "postprocess" or self.graph_conf is not None:
            meta["conf"] = json.dumps(self.graph_conf)  # null: every query above score_threshold
        meta.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items()})
        return meta


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
        return self._scalar(key, default, int, "an integer", low, 2**31)

    def number(self, key: str, default: float) -> float:
        return self._scalar(key, default, float, "a number", 0, 1)

    def _scalar(self, key: str, default: Any, kind: Callable[[str], Any], want: str, low: Any,
                high: Any) -> Any:
        """kind(value) in [low, high] (nan is not: every comparison with it is False)."""
        raw = self._raw(key)
        if raw is None:
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise self._fail(key, raw, want) from None
        if not low <= value <= high:
            raise self._fail(key, raw, f"{want} in [{low}, {high}]")
        return value

    def parsed(self, key: str, default: Any, ok: Callable[[Any], bool], want: str) -> Any:
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


# -- where the metadata is kept: an ONNX file's metadata_props, the other formats' sidecar json ---
def set_metadata(proto, meta: Mapping[str, str]) -> None:
    """Replace an ONNX ModelProto's metadata_props with `meta`."""
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


def read_metadata(source) -> dict[str, str]:
    """metadata_props of an ONNX file (path) or ModelProto as a dict (empty when none)."""
    import onnx
    proto = source if isinstance(source, onnx.ModelProto) else onnx.load(str(source), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def metadata_path(path: str | Path) -> Path:
    """Where the sidecar metadata of an exported file that is not ONNX lives: FOLDER/mobileinst.json
    for an NCNN folder (or its model.ncnn.param), else PATH.json beside it (m.tflite ->
    m.tflite.json, m.xml -> m.xml.json, m.mlpackage -> m.mlpackage.json)."""
    path = Path(path)
    if path.name == "model.ncnn.param":
        path = path.parent
    if (path / "model.ncnn.param").is_file():
        return path / "mobileinst.json"
    return path.with_name(path.name + ".json")


# -- checks ------------------------------------------------------------------------------------
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
