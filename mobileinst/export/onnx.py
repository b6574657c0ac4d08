"""ONNX export of MobileInst: the network alone, or the network plus the whole inference tail.

    from mobileinst.export.onnx import export_onnx
    export_onnx(model, "m.onnx", imgsz=(640, 640))                 # fixed size, raw outputs
    export_onnx(model, "m.onnx", dynamic=True, postprocess=True)   # any size, instances out

Input
-----
`images`: (B, 3, H, W) RGB pixel values 0..255, uint8 by default (`input_dtype="float32"`: float
0..255). Not normalised: the graph casts to float and applies (x - mean) / std itself with
mean = (123.675, 116.28, 103.53), std = (58.395, 57.12, 57.375). H and W are multiples of 32.
A fixed graph takes exactly the exported (B, 3, H, W); letterbox the image into it (resize so it
fits, pad bottom/right with the mean pixel, (124, 116, 104) in uint8). A dynamic graph takes any
batch and any H, W that are multiples of 32 (pad bottom/right as above).

Outputs without post-processing (`postprocess=False`, the default)
--------------------------------------------------------------------
N = queries (100), C = classes, E = kernel length (128).

    logits         (B, N, C)        float  class logits
    objectness     (B, N, 1)        float  objectness logit
    kernels        (B, N, E)        float  mask kernel of every query (track them across frames)
    mask_features  (B, E, H/8, W/8) float  mask features M

Decoding (SparseInst's recipe; `mobileinst.export.runtime.decode_raw` does it):
1. score = sqrt(sigmoid(logits) * sigmoid(objectness)) -> (B, N, C); per query,
   score, label = max / argmax over C (one label per query, no NMS).
2. keep the queries with score > threshold (0.005 for evaluation; use your display
   confidence, e.g. 0.3, to skip work: the rescoring below never raises a score).
3. mask logits of the kept queries: m = kernels @ M.flatten(2) -> (K, H/8, W/8), then bilinear
   x2 (align_corners=False, i.e. ONNX Resize half_pixel) -> (K, H/4, W/4); p = sigmoid(m).
4. rescoring ("maskness"): score *= sum(p * (p > 0.45)) / (sum(p > 0.45) + 1e-6).
5. sort by score, keep at most 100.
6. masks: bilinear-resize p to (H, W), crop the image's area inside the padding, bilinear-resize
   to the original image size, then binarise > 0.45.

Outputs with post-processing (`postprocess=True`)
-------------------------------------------------
K = `max_det` (default 100, at most N), sorted by score, best first.

    labels   (B, K)        int64  class index
    scores   (B, K)        float  rescored score; 0 for a slot whose query did not pass
                                  score_threshold (0.005): keep scores > your confidence
    masks    (B, K, H, W)  uint8  1 = foreground, at the input size (H, W): crop the image's area
                                  inside the padding and resize it to the original image
    kernels  (B, K, E)     float  the kept queries' mask kernels (tracking)

For one padded image whose size is the original one, (labels, scores, masks) equal
`model.postprocess` for every instance with a score above the threshold. Every mask of the
K slots is upsampled to full size, which costs ~1.5 ns per output pixel: export with a smaller
`max_det` when fewer instances are needed.

The features graph (`part="features"`, for kernel reuse in video)
-----------------------------------------------------------------
Backbone + mask decoder (SEMD) only, no instance decoder: same input, same preprocessing, one
output. A video app runs the raw graph above on key frames and this one on the frames between,
dotting their mask features with the last key frame's kernels (`mobileinst.track.predictor`).

    mask_features  (B, E, H/8, W/8) float  equal to the raw graph's mask_features

Metadata (`metadata_props`, read with `read_metadata`): producer, mobileinst_version,
model_name, model_config, class_names, cat_ids (json), input_name, input_dtype, input_layout,
mean, std, size_divisor, dynamic, input_size ([H, W] or null), batch, imgsz (default short side
for a dynamic graph), postprocess, outputs (json name -> layout), score_threshold,
mask_threshold, max_det, exporter, graph ("raw", "postprocess" or "features"; graphs
exported before this key existed are "raw" or "postprocess" by their `postprocess` entry).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MobileInstError
from ..models.mobileinst import PIXEL_MEAN, PIXEL_STD
from ..models.postprocess import InferenceConfig, maskness, query_scores
from .fuse import fuse_conv_bn

log = logging.getLogger("mobileinst.export")

INPUT_NAME = "images"
RAW_OUTPUTS = {
    "logits": "(B, N, C) float32 class logits",
    "objectness": "(B, N, 1) float32 objectness logit",
    "kernels": "(B, N, E) float32 mask kernels",
    "mask_features": "(B, E, H/8, W/8) float32 mask features; mask logits = "
                     "bilinear_x2(kernels @ mask_features)",
}
POSTPROCESS_OUTPUTS = {
    "labels": "(B, K) int64 class index",
    "scores": "(B, K) float32 rescored score, best first; 0 = empty slot",
    "masks": "(B, K, H, W) uint8 binary masks at the input size",
    "kernels": "(B, K, E) float32 mask kernels of the kept queries",
}
FEATURES_OUTPUTS = {"mask_features": RAW_OUTPUTS["mask_features"]}
SIZE_DIVISOR = 32
MIN_OPSET = 17
PARTS = ("full", "features")


# -- the graph -------------------------------------------------------------------------------
class ExportGraph(nn.Module):
    """The module that is exported: images (B, 3, H, W) uint8 or float 0..255 -> outputs.

    postprocess=False: (logits, objectness, kernels, mask_features) of the network.
    postprocess=True: (labels, scores, masks, kernels) of the top `max_det` queries (PostProcess).
    """

    def __init__(self, model: nn.Module, postprocess: bool = False, max_det: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.postprocess = PostProcess(model, max_det) if postprocess else None

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        mask_feats, f_mask, x6 = self.model.features(images.float())  # (B, E, H/8, W/8), ...
        out = self.model.add_pooled_class_logits(self.model.instance_decoder(x6, f_mask), mask_feats)
        logits, obj, kernels = out["pred_logits"], out["pred_scores"], out["pred_kernels"]
        if self.postprocess is None:
            return logits, obj, kernels, mask_feats
        return self.postprocess(logits, obj, kernels, mask_feats, images.shape[-2:])


class FeaturesGraph(nn.Module):
    """The features graph: images (B, 3, H, W) uint8 or float 0..255 -> (mask_features,) of the
    network's backbone + mask decoder; the frames between video key frames run only this."""

    postprocess = None  # the export helpers ask every graph

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor]:
        return (self.model.features(images.float())[0],)  # (B, E, H/8, W/8)


def graph_kind(meta: dict[str, str]) -> str:
    """"raw", "postprocess" or "features" from a graph's metadata (older files lack `graph`)."""
    if "graph" in meta:
        return meta["graph"]
    return "postprocess" if meta.get("postprocess") == "true" else "raw"


class PostProcess(nn.Module):
    """`mobileinst.models.postprocess.postprocess_image` for a batch, with static shapes.

    Every ONNX node it makes is renamed `postprocess/...` after export, so that int8
    quantization can leave it in float.
    """

    def __init__(self, model: nn.Module, max_det: int | None = None) -> None:
        super().__init__()
        cfg: InferenceConfig = model.inference
        self.score_threshold = cfg.score_threshold
        self.mask_threshold = cfg.mask_threshold
        self.max_det = min(max_det or cfg.max_detections, model.cfg.num_queries)
        self.mask_logits = model.masks  # kernels (B, N, E) . M (B, E, h, w) -> (B, N, 2h, 2w)

    def forward(self, logits: Tensor, obj: Tensor, kernels: Tensor, mask_feats: Tensor,
                size: Sequence[Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Raw outputs -> top-K (labels, scores, masks uint8 at `size`, kernels)."""
        scores, labels = query_scores(logits, obj)  # (B, N), (B, N)
        prob = self.mask_logits(kernels, mask_feats).sigmoid()  # (B, N, H/4, W/4)
        valid = scores > self.score_threshold
        scores = torch.where(valid, scores * maskness(prob, self.mask_threshold),
                             torch.zeros_like(scores))
        scores, idx = scores.topk(self.max_det, dim=1)  # (B, K), best first
        labels = labels.gather(1, idx)  # (B, K)
        kernels = kernels.gather(1, idx.unsqueeze(-1).expand(-1, -1, kernels.shape[-1]))  # (B, K, E)
        h4, w4 = prob.shape[-2], prob.shape[-1]
        prob = prob.gather(1, idx[:, :, None, None].expand(-1, -1, h4, w4))  # (B, K, H/4, W/4)
        prob = prob * (scores > 0).to(prob.dtype)[:, :, None, None]  # empty slots -> empty masks
        # only the K kept masks are upsampled to the input size
        prob = F.interpolate(prob, size=(size[0], size[1]), mode="bilinear", align_corners=False)
        masks = (prob > self.mask_threshold).to(torch.uint8)  # (B, K, H, W)
        return labels, scores, masks, kernels


POSTPROCESS_PREFIX = "postprocess/"


def _tag_postprocess_nodes(proto) -> int:
    """Prefix the names of the nodes PostProcess made (from the exporter's module scopes)."""
    n = 0
    for node in proto.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if "PostProcess" in meta.get("pkg.torch.onnx.class_hierarchy", ""):
            node.name = POSTPROCESS_PREFIX + node.name
            n += 1
    return n


# -- inputs ----------------------------------------------------------------------------------
def example_images(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Natural-looking RGB uint8 images (B, H, W, 3): smooth colour gradients, a few filled
    ellipses and rectangles, mild noise. Deterministic; used to export and to verify."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((batch, height, width, 3), np.uint8)
    for b in range(batch):
        c0, c1 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
        t = (xx / max(width - 1, 1) * rng.uniform(0.3, 1) + yy / max(height - 1, 1) * rng.uniform(0.3, 1)) / 2
        img = c0 + (c1 - c0) * t[..., None]  # (H, W, 3) background gradient
        for _ in range(int(rng.integers(3, 7))):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            ry, rx = rng.uniform(0.08, 0.3) * height, rng.uniform(0.08, 0.3) * width
            if rng.random() < 0.5:
                inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            else:
                inside = (abs(yy - cy) < ry) & (abs(xx - cx) < rx)
            shade = 0.8 + 0.2 * (yy - cy + ry) / (2 * ry)  # a little shading inside objects
            img = np.where(inside[..., None], rng.uniform(0, 255, 3) * shade[..., None], img)
        img += rng.normal(0, 3, img.shape)
        out[b] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def to_input(images_hwc: np.ndarray, dtype: str) -> np.ndarray:
    """(B, H, W, 3) uint8 -> the graph's input (B, 3, H, W) of `dtype`."""
    return np.ascontiguousarray(images_hwc.transpose(0, 3, 1, 2)).astype(np.dtype(dtype))


# -- export ----------------------------------------------------------------------------------
def _check_args(imgsz: tuple[int, int], input_dtype: str, opset: int, batch: int,
                part: str = "full", postprocess: bool = False) -> None:
    if part not in PARTS:
        raise MobileInstError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    if part == "features" and postprocess:
        raise MobileInstError("the features graph has no post-processing (it outputs mask features only)")
    if input_dtype not in ("uint8", "float32"):
        raise MobileInstError(f"input_dtype must be 'uint8' or 'float32', got {input_dtype!r}")
    if opset < MIN_OPSET:
        raise MobileInstError(f"opset {opset} is too old: the export needs opset >= {MIN_OPSET}")
    if len(imgsz) != 2 or any(s <= 0 or s % SIZE_DIVISOR for s in imgsz):
        raise MobileInstError(f"imgsz must be (H, W), both positive multiples of {SIZE_DIVISOR}; "
                              f"got {tuple(imgsz)}")
    if batch < 1:
        raise MobileInstError(f"batch must be >= 1, got {batch}")


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress prints and its known, harmless warnings."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export",
                                              "onnxscript", "onnx_ir", "onnxslim",
                                              "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _torch_export(graph: ExportGraph | FeaturesGraph, example: Tensor, dynamic: bool, opset: int,
                  output_names: list[str]):
    """torch.onnx.export with the dynamo exporter (fallback: the TorchScript one) -> (ModelProto, name)."""
    from torch.export import Dim
    dynamic_shapes = None
    if dynamic:  # example batch >= 2, else the exporter specialises the batch to 1
        dynamic_shapes = {"images": {0: Dim("batch", min=1, max=256),
                                     2: SIZE_DIVISOR * Dim("h32", min=1, max=256),
                                     3: SIZE_DIVISOR * Dim("w32", min=1, max=256)}}
    try:
        with _quiet():
            prog = torch.onnx.export(graph, (example,), None, dynamo=True, opset_version=opset,
                                     input_names=[INPUT_NAME], output_names=output_names,
                                     dynamic_shapes=dynamic_shapes, optimize=True, verbose=False)
        proto = prog.model_proto
        if graph.postprocess is not None and not _tag_postprocess_nodes(proto):
            log.warning("could not find the post-processing nodes: int8 quantization will "
                        "quantize them too")
        return proto, "dynamo"
    except ModuleNotFoundError as e:  # onnxscript missing: the dynamo exporter cannot run
        reason = str(e)
    except Exception as e:  # noqa: BLE001 - any exporter failure: try the legacy exporter
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    log.warning("dynamo ONNX export failed (%s); falling back to the TorchScript exporter", reason)
    buf = io.BytesIO()
    axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}} if dynamic else None
    if axes:
        axes.update({n: {0: "batch"} for n in output_names})
    with _quiet():
        torch.onnx.export(graph, (example,), buf, dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=output_names, dynamic_axes=axes)
    import onnx
    return onnx.load_from_string(buf.getvalue()), "torchscript"


def _slim(proto, check: np.ndarray):
    """onnxslim the graph; keep the original if slimming fails or changes the outputs."""
    try:
        import onnxslim
        with _quiet():
            slimmed = onnxslim.slim(proto)
    except Exception as e:  # noqa: BLE001 - simplification is an optional nicety
        log.warning("onnxslim failed (%s); keeping the unsimplified graph", e)
        return proto, False
    a, b = run_proto(proto, check), run_proto(slimmed, check)
    for name in a:
        if not _close(a[name], b[name]):
            log.warning("onnxslim changed output %r; keeping the unsimplified graph", name)
            return proto, False
    return slimmed, True


def _close(a: np.ndarray, b: np.ndarray, rtol: float = 1e-4) -> bool:
    """Same shape and values, relative to the output's magnitude (masks: >= 99.9% agree)."""
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "uib":
        return a.size == 0 or float(np.mean(a == b)) >= 0.999
    scale = max(1.0, float(np.abs(b).max(initial=0.0)))
    return float(np.abs(a.astype(np.float64) - b).max(initial=0.0)) <= rtol * scale


def run_proto(proto, images: np.ndarray, threads: int = 1) -> dict[str, np.ndarray]:
    """Run an in-memory ModelProto once in onnxruntime -> {output name: array}."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: images})))


def _metadata(model: nn.Module, graph: ExportGraph | FeaturesGraph, imgsz: tuple[int, int],
              dynamic: bool, batch: int, input_dtype: str, class_names: list[str] | None, exporter: str,
              extra: dict[str, Any]) -> dict[str, str]:
    from .. import __version__
    cfg = model.cfg
    names = list(class_names or getattr(model, "class_names", None) or
                 [str(i) for i in range(cfg.num_classes)])
    if len(names) != cfg.num_classes:
        raise MobileInstError(f"{len(names)} class names for a model with {cfg.num_classes} classes")
    kind = "features" if isinstance(graph, FeaturesGraph) else \
        ("raw" if graph.postprocess is None else "postprocess")
    outputs = {"raw": RAW_OUTPUTS, "postprocess": POSTPROCESS_OUTPUTS, "features": FEATURES_OUTPUTS}[kind]
    pp = graph.postprocess if graph.postprocess is not None else PostProcess(model, None)
    meta = {
        "producer": "mobileinst",
        "mobileinst_version": __version__,
        "model_name": cfg.name,
        "model_config": json.dumps(cfg.to_dict()),
        "class_names": json.dumps(names),
        "cat_ids": json.dumps(list(getattr(model, "cat_ids", None) or range(1, cfg.num_classes + 1))),
        "input_name": INPUT_NAME,
        "input_dtype": input_dtype,
        "input_layout": f"(B, 3, H, W) RGB {input_dtype} 0..255, not normalised; the graph "
                        "computes (x - mean) / std; H, W multiples of 32, pad bottom/right",
        "mean": json.dumps(PIXEL_MEAN),
        "std": json.dumps(PIXEL_STD),
        "size_divisor": str(SIZE_DIVISOR),
        "dynamic": json.dumps(dynamic),
        "input_size": json.dumps(None if dynamic else list(imgsz)),
        "batch": "dynamic" if dynamic else str(batch),
        "imgsz": str(min(imgsz)),
        "postprocess": json.dumps(graph.postprocess is not None),
        "outputs": json.dumps(outputs),
        "score_threshold": str(pp.score_threshold),
        "mask_threshold": str(pp.mask_threshold),
        "max_det": str(pp.max_det),
        "exporter": exporter,
        "graph": kind,
    }
    meta.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta


def set_metadata(proto, meta: dict[str, str]) -> None:
    """Replace the graph's metadata_props with `meta`."""
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


def read_metadata(source) -> dict[str, str]:
    """metadata_props of an ONNX file (path) or ModelProto as a dict (empty when none)."""
    import onnx
    proto = source if isinstance(source, onnx.ModelProto) else onnx.load(str(source), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def export_onnx(model: nn.Module, out: str | Path, imgsz: tuple[int, int] | int | None = None,
                dynamic: bool = False, simplify: bool = True, postprocess: bool = False,
                input_dtype: str = "uint8", opset: int = 18, class_names: list[str] | None = None,
                max_det: int | None = None, batch: int = 1, fuse: bool = True, verify: bool = True,
                metadata: dict[str, Any] | None = None, part: str = "full") -> Path:
    """Export a MobileInst network to ONNX; returns the written path.

    imgsz: (H, W) of a fixed graph (default 640 x 640); with `dynamic` only the example size
      used while exporting and the default short side stored for predictors.
    dynamic: any batch and any H, W that are multiples of 32 (else exactly (batch, 3, H, W)).
    postprocess: put scores, maskness rescoring, top-`max_det`, mask upsampling and thresholding
      in the graph (outputs labels, scores, masks, kernels); else the raw network outputs.
    input_dtype: "uint8" (default) or "float32"; either way pixel values 0..255, RGB.
    simplify: onnxslim the graph, keeping it only if its outputs match the unsimplified one.
    fuse: fold BatchNorm into the convolutions first (same outputs, smaller graph).
    verify: run the exported graph in onnxruntime on a natural-looking image and compare with
      PyTorch; a mismatch raises MobileInstError.
    metadata: extra key -> value pairs for metadata_props (values json-encoded unless str).
    part: "full" (the whole network) or "features" (backbone + mask decoder only: images ->
      mask_features, for the frames between video key frames; metadata `graph: features`).
    The layout and decoding of the outputs are in this module's docstring.
    """
    import onnx
    hw = (640, 640) if imgsz is None else ((imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz))
    _check_args(hw, input_dtype, opset, batch, part, postprocess)
    out = Path(out)
    net = fuse_conv_bn(model) if fuse else model
    net.eval()
    if part == "features":
        graph, output_names = FeaturesGraph(net).eval(), list(FEATURES_OUTPUTS)
    else:
        graph = ExportGraph(net, postprocess, max_det).eval()
        output_names = list(POSTPROCESS_OUTPUTS if postprocess else RAW_OUTPUTS)
    n_example = max(2, batch) if dynamic else batch
    example = to_input(example_images(n_example, *hw), input_dtype)
    check = example[:1] if dynamic or batch == 1 else example
    with torch.no_grad():
        proto, exporter = _torch_export(graph, torch.from_numpy(example), dynamic, opset, output_names)
    if verify:
        _verify(graph, proto, check)
    if simplify:
        proto, _ = _slim(proto, check)
    proto.producer_name, proto.producer_version = "mobileinst", _version()
    set_metadata(proto, _metadata(model, graph, hw, dynamic, batch, input_dtype, class_names,
                                  exporter, metadata or {}))
    onnx.checker.check_model(proto)
    save_atomic(proto, out)
    return out


def save_atomic(proto, out: Path) -> None:
    """onnx.save to a temporary file in the same folder, then rename over `out`."""
    import onnx
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        onnx.save(proto, tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _version() -> str:
    from .. import __version__
    return __version__


@torch.no_grad()
def _verify(graph: ExportGraph | FeaturesGraph, proto, images: np.ndarray) -> dict[str, float]:
    """Compare the ONNX graph with PyTorch on `images`; MobileInstError on a real mismatch.

    Raw outputs: max abs difference <= 1e-3 of the output's magnitude (float rounding differs
    between the two runtimes on large activations). Post-processed: scores within 1e-3 and >= 99%
    of the mask pixels of the valid slots equal (labels and order may swap between near-equal
    scores, so slots are compared after sorting by (score, label)).
    """
    got = run_proto(proto, images)
    ref = [t.numpy() for t in graph(torch.from_numpy(images))]
    diffs = {}
    for (name, a), b in zip(got.items(), ref):
        if a.shape != b.shape:
            raise MobileInstError(f"ONNX export check failed: output {name} has shape {a.shape}, "
                                  f"PyTorch {b.shape}")
        if a.dtype.kind == "f":
            scale = max(1.0, float(np.abs(b).max(initial=0.0)))
            diffs[name] = float(np.abs(a - b).max(initial=0.0)) / scale
    if graph.postprocess is not None:
        ok = (scores_close := np.abs(np.sort(got["scores"], 1) - np.sort(ref[1], 1)).max(initial=0.0)) <= 1e-3
        valid = ref[1] > 0.05
        agree = float(np.mean(got["masks"][valid] == ref[2][valid])) if valid.any() else 1.0
        diffs = {"scores": float(scores_close), "masks_disagree": 1 - agree}
        if not ok or agree < 0.99:
            raise MobileInstError(f"ONNX export check failed (post-processed graph): {diffs}")
    elif any(d > 1e-3 for d in diffs.values()):
        raise MobileInstError(f"ONNX export check failed: outputs differ from PyTorch: {diffs}")
    log.info("ONNX export check: %s", diffs)
    return diffs


def parse_imgsz(values: Sequence[int] | int | None) -> tuple[int, int] | None:
    """CLI --imgsz S or H W -> (H, W)."""
    if values is None:
        return None
    if isinstance(values, int):
        return values, values
    values = list(values)
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise MobileInstError(f"--imgsz takes S or H W, got {values}")


__all__ = ["export_onnx", "read_metadata", "example_images", "ExportGraph", "FeaturesGraph",
           "graph_kind", "RAW_OUTPUTS", "POSTPROCESS_OUTPUTS", "FEATURES_OUTPUTS", "INPUT_NAME",
           "POSTPROCESS_PREFIX"]
