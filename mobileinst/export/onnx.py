"""ONNX export of MobileInst: the network alone, or the network plus the whole inference tail.

    from mobileinst.export.onnx import export_onnx
    export_onnx(model, "m.onnx", imgsz=(640, 640))                 # fixed size, raw outputs
    export_onnx(model, "m.onnx", dynamic=True, postprocess=True)   # any size, instances out
    write_onnx(model, "m.onnx", info.for_graph("raw", (640, 640)))  # from a ModelInfo

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
    mask_features  (B, E, H/s, W/s) float  mask features M at the mask stride s: 8, or 4 with
                                           the `mask_stride: 4` option

Decoding (SparseInst's recipe; `mobileinst.models.postprocess.decode_instances` does it):
1. score = sqrt(sigmoid(logits) * sigmoid(objectness)) -> (B, N, C); per query,
   score, label = max / argmax over C (one label per query, no NMS).
2. keep the queries with score > threshold (0.005 for evaluation; use your display
   confidence, e.g. 0.3, to skip work: the rescoring below never raises a score).
3. mask logits of the kept queries: m = kernels @ M.flatten(2) -> (K, H/s, W/s), then bilinear
   x u to stride 4, u = the metadata's `mask_upsample` (s / 4: 2 at stride 8, 1 = none at
   stride 4; align_corners=False, i.e. ONNX Resize half_pixel) -> (K, H/4, W/4); p = sigmoid(m).
4. rescoring ("maskness"): score *= sum(p * (p > 0.45)) / (sum(p > 0.45) + 1e-6).
5. sort by score, keep at most 100.
6. masks: bilinear-resize p to (H, W), crop the image's area inside the padding, bilinear-resize
   to the original image size, then binarise > 0.45.

Outputs with post-processing (`postprocess=True`)
-------------------------------------------------
The instances, sorted by score, best first. K is data-dependent (a symbolic output dimension):

- with `conf` (CLI `--conf 0.3`, your display confidence): the instances scoring above conf,
  at most `max_det` (default 100, at most N); K = 0 when none does;
- without `conf` (the default): every query above score_threshold (0.005) whose rescored score
  is not 0 (the non-empty slots of graphs before `conf` existed), at most `max_det`;
- batch > 1: K = the most any image of the batch keeps; an image's slots beyond its own count
  have score 0 and an empty mask (keep scores > 0, or > your confidence, as before).

    labels   (B, K)        int64  class index
    scores   (B, K)        float  rescored score (> conf; 0 = empty slot, batch > 1 only)
    masks    (B, K, H, W)  uint8  1 = foreground, at the input size (H, W): crop the image's area
                                  inside the padding and resize it to the original image
    kernels  (B, K, E)     float  the kept queries' mask kernels (tracking)

For one padded image whose size is the original one, (labels, scores, masks) equal
`model.postprocess` for every instance above conf (or with a non-zero score): same label,
the same mask (IoU >= 0.99), score within 1e-5 against the graph before `conf` existed in
onnxruntime and for this graph run in PyTorch (within 1e-4 onnxruntime vs PyTorch: the
network's own float noise); tests/test_export_postprocess.py. A device app reads K from the output's shape and needs no threshold of
its own when it exported with its confidence. Exported by the TorchScript fallback (when the
dynamo exporter fails), K cannot be data-dependent: K = max_det, score 0 = empty slot
(metadata `num_instances`: "max_det").

The work follows what is kept, not max_det. Per image: scores and labels of all N queries; the
kernels . M product (E x H/8 x W/8 per query) and the stride-4 masks and maskness only for the
queries whose pre-score passes max(score_threshold, conf) (the rescoring never raises a score,
so no other query can be kept; with cfg.mask_pooled_cls the class term needs the product of all
N, made once and shared); the full-size bilinear upsampling (~1.5 ns per output pixel, 1 thread)
and thresholding only for the K kept masks. Measured in benchmarks/postprocess_graph.py.

Not done: "crop before resize". The masks of a letterboxed image matter only inside the image
area (h, w), and cropping the stride-4 masks to ceil(h/4) + 1 rows and ceil(w/4) + 1 columns
before the x4 resize would give the same pixels inside it (half-pixel sampling positions of
those pixels never reach the cropped border) without the padding's. But the graph does not
know (h, w): it would need a second input, which breaks every consumer that feeds `images`
alone (int8 calibration, the predictors, device apps), and ONNX has no optional input except an
initializer-backed default, which graph optimisers (onnxslim, onnxruntime) may fold into a
constant. The saving is bounded by the padded share of the K upsampled masks: none for a
dynamic graph (padding < 32 px) or a fixed graph exported at the camera's aspect ratio (e.g.
`--imgsz 480 640`), which is the way to avoid it. Measured (benchmarks/postprocess_graph.py,
1 thread, a loaded 2-core machine): the tail with 10 instances kept takes 20.9 ms at 640x640
and 13.4 ms at 480x640, i.e. a 4:3 photo letterboxed into 640x640 would save ~7 ms of a
~210 ms graph by cropping; with `conf` the tail is already ~1 ms + ~2 ms per kept instance.

The features graph (`part="features"`, for kernel reuse in video)
-----------------------------------------------------------------
Backbone + mask decoder (SEMD) only, no instance decoder: same input, same preprocessing, one
output. A video app runs the raw graph above on key frames and this one on the frames between,
dotting their mask features with the last key frame's kernels (`mobileinst.infer.video`).

    mask_features  (B, E, H/s, W/s) float  equal to the raw graph's mask_features

Metadata (`metadata_props`: `ModelInfo.to_metadata` writes it, `ModelInfo.from_metadata` reads
it back; `read_metadata` gets the dict): producer, format_version, mobileinst_version,
model_name, model_config, class_names, cat_ids (json), input_name, input_dtype, input_layout,
mean, std, size_divisor, dynamic, input_size ([H, W] or null), batch, imgsz (default short side
for a dynamic graph), postprocess, outputs (json name -> layout), score_threshold,
mask_threshold, max_det, exporter, graph ("raw", "postprocess" or "features"; graphs
exported before this key existed are "raw" or "postprocess" by their `postprocess` entry);
post-processed graphs also: conf (json: the export's conf, null = none: score_threshold only)
and num_instances ("dynamic": K data-dependent; "max_det": K = max_det slots; absent in graphs
before `conf` existed, which are "max_det").
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .. import __version__
from ..errors import MobileInstError
from ..models.model_info import (FEATURES_OUTPUTS, INPUT_NAME, PARTS, POSTPROCESS_OUTPUTS, RAW_OUTPUTS,
                                 SIZE_DIVISOR, ModelInfo, graph_kind, read_metadata, set_metadata)
from ..models.postprocess import InferenceConfig, count_kept, gather_queries, resize_bilinear, select_instances
from ..utils import atomic_path
from .fuse import fuse_conv_bn

log = logging.getLogger("mobileinst.export")

MIN_OPSET = 17


# -- the graph -------------------------------------------------------------------------------
class ExportGraph(nn.Module):
    """The module that is exported: images (B, 3, H, W) uint8 or float 0..255 -> outputs.

    postprocess=False: (logits, objectness, kernels, mask_features) of the network.
    postprocess=True: (labels, scores, masks, kernels) of the kept queries (PostProcess): at most
    `max_det`, only those scoring above `conf` (default: every query above score_threshold);
    thresholds `cfg` (default: the model's own, `model.inference`).
    """

    def __init__(self, model: nn.Module, postprocess: bool = False, max_det: int | None = None,
                 conf: float | None = None, cfg: InferenceConfig | None = None) -> None:
        super().__init__()
        self.model = model
        self.postprocess = PostProcess(model, max_det, conf, cfg) if postprocess else None

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        if self.postprocess is None:  # the eager inference path's own heads
            return self.model.inference_outputs(images.float())
        mask_feats, f_mask, x6 = self.model.features(images.float())  # (B, E, H/8, W/8), ...
        return self.tail(self.model.instance_decoder(x6, f_mask), mask_feats, images.shape[-2:])

    def tail(self, heads: dict[str, Tensor], mask_feats: Tensor, size: Sequence[Any]) -> tuple[Tensor, ...]:
        """The instance decoder's heads + M -> the post-processed outputs (everything after the
        network; benchmarks/postprocess_graph.py exports it alone)."""
        # the one kernels . M product: the pooled class term needs every query's stride-8 mask
        # logits, and PostProcess reuses them; without that term PostProcess makes the product
        # for the queries it keeps only
        m8 = None
        if getattr(self.model, "mask_class", None) is not None:
            m8 = self.postprocess.product(heads["pred_kernels"], mask_feats)  # (B, N, H/8, W/8)
        out = self.model.add_pooled_class_logits(heads, mask_feats, m8)
        return self.postprocess(out["pred_logits"], out["pred_scores"], out["pred_kernels"],
                                mask_feats, size, m8)


class FeaturesGraph(nn.Module):
    """The features graph: images (B, 3, H, W) uint8 or float 0..255 -> (mask_features,) of the
    network's backbone + mask decoder; the frames between video key frames run only this."""

    postprocess = None  # the export helpers ask every graph

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor]:
        return (self.model.features(images.float())[0],)  # (B, E, H/8, W/8)


def export_module(model: nn.Module, info: ModelInfo) -> ExportGraph | FeaturesGraph:
    """The module that exports as the graph `info` describes (`info.graph`: raw, postprocess or
    features), in eval mode."""
    if info.graph == "features":
        return FeaturesGraph(model).eval()
    if info.graph == "postprocess":
        cfg = info.inference
        return ExportGraph(model, True, cfg.max_detections, info.graph_conf, cfg).eval()
    return ExportGraph(model).eval()


class MaskProduct(nn.Module):
    """kernels (B, N, E) . M (B, E, h, w) -> stride-8 mask logits (B, N, h, w), once per graph.

    Its own module so that its nodes are tagged `postprocess/` (kept float by int8 quantization,
    as when PostProcess made the product) although ExportGraph calls it before the pooled class
    term of a cfg.mask_pooled_cls model, which reads the same logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.fn = model.mask_logits  # a bound method, not a submodule

    def forward(self, kernels: Tensor, mask_feats: Tensor) -> Tensor:
        return self.fn(kernels, mask_feats)


class PostProcess(nn.Module):
    """`mobileinst.models.postprocess.select_instances` (the decode eager code runs too) for a
    batch, then the K kept masks upsampled to the input size and thresholded.

    1. pre-score s, label (every query); K1 = the most queries above t = max(score_threshold,
       conf) in any image: only those get mask logits (kernels . M, unless ExportGraph made it
       for all N for the pooled class term: then gathered) at stride 4, sigmoid, maskness;
    2. final = s * maskness; sort; K = the most finals > conf (> 0 without conf) in any image, at
       most max_det: only those K masks are upsampled to (H, W) and thresholded; slots of an
       image beyond its own count get score 0 and an empty mask (batch > 1 only). K may be 0.

    Equal to the old graph (every query's mask at stride 4, the top max_det all upsampled) for
    every kept instance: final <= s (maskness <= 1), so a query with s <= conf can never be
    kept (the proof of `mobileinst.models.postprocess.conf_config`), and ranking the survivors gives the
    same top max_det. K1 and K are data-dependent sizes (the dynamo exporter makes them
    symbolic, `u0`/`u1`); `dynamic_k = False` (the TorchScript fallback, which would freeze them
    at the example's values) keeps K1 = N and K = max_det with empty slots instead.

    Every ONNX node it (and MaskProduct) makes is renamed `postprocess/...` after export, so that
    int8 quantization can leave it in float.
    """

    def __init__(self, model: nn.Module, max_det: int | None = None, conf: float | None = None,
                 cfg: InferenceConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or model.inference
        self.cfg = InferenceConfig(cfg.score_threshold, cfg.mask_threshold,
                                   min(max_det or cfg.max_detections, model.cfg.num_queries))
        self.conf = None if conf is None else float(conf)
        self.upsample = int(model.cfg.mask_upsample)
        self.product = MaskProduct(model)
        self.dynamic_k = True

    @property
    def max_det(self) -> int:
        return self.cfg.max_detections

    def _count(self, passed: Tensor, upper: int) -> int:
        """`count_kept`, or `upper` for a static graph."""
        return count_kept(passed, upper) if self.dynamic_k else upper

    def forward(self, logits: Tensor, obj: Tensor, kernels: Tensor, mask_feats: Tensor,
                size: Sequence[Any], m8: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Network outputs (+ every query's stride-8 mask logits `m8`, when already made) ->
        (labels (B, K), scores (B, K), masks (B, K, H, W) uint8 at `size`, kernels (B, K, E))."""
        picked = select_instances(logits, obj, kernels, mask_feats, self.cfg, self.upsample,
                                  0.0 if self.conf is None else self.conf, self._count, m8)
        prob = picked["mask_prob"]  # (B, K, H/4, W/4)
        prob = prob * picked["keep"].to(prob.dtype)[:, :, None, None]  # empty slots -> empty masks
        prob = resize_bilinear(prob, size=(size[0], size[1]))  # only the K kept masks, to the input size
        masks = (prob > self.cfg.mask_threshold).to(torch.uint8)  # (B, K, H, W)
        return picked["labels"], picked["scores"], masks, gather_queries(kernels, picked["index"])


POSTPROCESS_PREFIX = "postprocess/"
_POSTPROCESS_CLASSES = (f"{__name__}.PostProcess", f"{__name__}.MaskProduct")


def _tag_postprocess_nodes(proto) -> int:
    """Prefix the names of the nodes PostProcess made (from the exporter's module scopes)."""
    n = 0
    for node in proto.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if any(c in meta.get("pkg.torch.onnx.class_hierarchy", "") for c in _POSTPROCESS_CLASSES):
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
def _check_options(part: str, postprocess: bool, conf: float | None) -> None:
    """The graph options of `export_onnx` that a ModelInfo cannot hold wrong."""
    if conf is not None and not postprocess:
        raise MobileInstError("conf (--conf) is for post-processed graphs (--postprocess); a raw "
                              "graph's consumer applies its own confidence")
    if part not in PARTS:
        raise MobileInstError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    if part == "features" and postprocess:
        raise MobileInstError("the features graph has no post-processing (it outputs mask features only)")


def _check_export(info: ModelInfo, hw: Sequence[int], opset: int) -> None:
    """MobileInstError unless `info` describes a graph this exporter writes, at size `hw`."""
    conf, batch = info.graph_conf, info.input.batch or 1
    if info.graph not in ("raw", "postprocess", "features"):
        raise MobileInstError(f"graph {info.graph!r}: export a ModelInfo.for_graph('raw' | "
                              "'postprocess' | 'features')")
    if conf is not None and not 0.0 <= conf < 1.0:
        raise MobileInstError(f"conf must be in [0, 1), got {conf}")
    if info.input.dtype not in ("uint8", "float32"):
        raise MobileInstError(f"input_dtype must be 'uint8' or 'float32', got {info.input.dtype!r}")
    if opset < MIN_OPSET:
        raise MobileInstError(f"opset {opset} is too old: the export needs opset >= {MIN_OPSET}")
    if len(hw) != 2 or any(s <= 0 or s % SIZE_DIVISOR for s in hw):
        raise MobileInstError(f"imgsz must be (H, W), both positive multiples of {SIZE_DIVISOR}; "
                              f"got {tuple(hw)}")
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
    if graph.postprocess is not None:  # tracing would freeze the data-dependent K at the example's
        graph.postprocess.dynamic_k = False
        log.warning("the TorchScript exporter cannot make the number of instances data-dependent: "
                    "the graph returns K = max_det (%d) slots, score 0 = empty", graph.postprocess.max_det)
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


def export_onnx(model: nn.Module, out: str | Path, imgsz: tuple[int, int] | int | None = None,
                dynamic: bool = False, simplify: bool = True, postprocess: bool = False,
                input_dtype: str = "uint8", opset: int = 18, class_names: list[str] | None = None,
                max_det: int | None = None, batch: int = 1, fuse: bool = True, verify: bool = True,
                metadata: dict[str, Any] | None = None, part: str = "full",
                conf: float | None = None, cat_ids: list[int] | None = None,
                default_imgsz: int | None = None) -> Path:
    """Export a MobileInst network to ONNX; returns the written path. The keyword form of
    `write_onnx`: the options make the graph's `ModelInfo`.

    imgsz: (H, W) of a fixed graph (default 640 x 640); with `dynamic` only the example size
      used while exporting and the default short side stored for predictors.
    dynamic: any batch and any H, W that are multiples of 32 (else exactly (batch, 3, H, W)).
    postprocess: put scores, maskness rescoring, top-`max_det`, mask upsampling and thresholding
      in the graph (outputs labels, scores, masks, kernels); else the raw network outputs.
    conf: with postprocess, the graph returns only the instances scoring above conf (the
      display confidence, e.g. 0.3), and computes masks for those only: K is then
      data-dependent. None (default): every query above score_threshold (0.005) with a
      non-zero score, i.e. the slots the graph always returned, at most max_det.
    input_dtype: "uint8" (default) or "float32"; either way pixel values 0..255, RGB.
    class_names, cat_ids: the trained model's (`ModelInfo`; default "0".."C-1" and 1..C).
    default_imgsz: the short side predictors use for a dynamic graph (default min(imgsz)).
    part: "full" (the whole network) or "features" (backbone + mask decoder only: images ->
      mask_features, for the frames between video key frames; metadata `graph: features`).
    simplify, fuse, verify, metadata, opset: as `write_onnx`.
    The layout and decoding of the outputs are in this module's docstring.
    """
    hw = (640, 640) if imgsz is None else ((imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz))
    _check_options(part, postprocess, conf)
    kind = "features" if part == "features" else ("postprocess" if postprocess else "raw")
    base = ModelInfo.for_model(model.cfg, class_names, cat_ids, default_imgsz or min(hw))
    info = replace(base, inference=model.inference).for_graph(
        kind, None if dynamic else hw, batch, input_dtype, max_det, conf)
    return write_onnx(model, out, info, hw, opset=opset, simplify=simplify, fuse=fuse,
                      verify=verify, metadata=metadata)


def write_onnx(model: nn.Module, out: str | Path, info: ModelInfo,
               example_size: tuple[int, int] | None = None, opset: int = 18, simplify: bool = True,
               fuse: bool = True, verify: bool = True, metadata: dict[str, Any] | None = None) -> Path:
    """Export `model` as the graph `info` describes (`ModelInfo.for_graph`: kind, input, max_det,
    conf, names) to ONNX at `out`, with `info.to_metadata()` as its metadata; returns `out`.

    example_size: the (H, W) a dynamic graph is traced at (default (imgsz, imgsz)).
    simplify: onnxslim the graph, keeping it only if its outputs match the unsimplified one.
    fuse: fold BatchNorm into the convolutions first (same outputs, smaller graph).
    verify: run the exported graph in onnxruntime on a natural-looking image and compare with
      PyTorch; a mismatch raises MobileInstError.
    metadata: extra key -> value pairs for metadata_props (values json-encoded unless str).
    """
    import onnx
    hw = tuple(info.input.size or example_size or (info.imgsz, info.imgsz))
    _check_export(info, hw, opset)
    out = Path(out)
    net = fuse_conv_bn(model) if fuse else model
    graph = export_module(net.eval(), info)
    dynamic, batch = info.input.size is None, info.input.batch or 1
    example = to_input(example_images(max(2, batch) if dynamic else batch, *hw), info.input.dtype)
    check = example[:1] if dynamic or batch == 1 else example
    with torch.no_grad():
        proto, exporter = _torch_export(graph, torch.from_numpy(example), dynamic, opset, list(info.outputs))
    if verify:
        _verify(graph, proto, check)
    if simplify:
        proto, _ = _slim(proto, check)
    proto.producer_name, proto.producer_version = "mobileinst", _version()
    set_metadata(proto, info.to_metadata({"exporter": exporter, **_num_instances(graph), **(metadata or {})}))
    onnx.checker.check_model(proto)
    save_atomic(proto, out)
    return out


def _num_instances(graph: ExportGraph | FeaturesGraph) -> dict[str, str]:
    """A post-processed graph's K: "dynamic" (data-dependent) or "max_det" (TorchScript fallback)."""
    if graph.postprocess is None:
        return {}
    return {"num_instances": "dynamic" if graph.postprocess.dynamic_k else "max_det"}


def save_atomic(proto, out: Path) -> None:
    """onnx.save to a temporary file in the same folder, then rename over `out` (`atomic_path`:
    a failed write is a MobileInstError naming `out`, the old file intact)."""
    import onnx
    with atomic_path(out) as tmp:
        onnx.save(proto, tmp)


def _version() -> str:
    return __version__


@torch.no_grad()
def _verify(graph: ExportGraph | FeaturesGraph, proto, images: np.ndarray) -> dict[str, float]:
    """Compare the ONNX graph with PyTorch on `images`; MobileInstError on a real mismatch.

    Raw outputs: max abs difference <= 1e-3 of the output's magnitude (float rounding differs
    between the two runtimes on large activations). Post-processed: scores within 1e-3 and >= 99%
    of the mask pixels of the valid slots equal (labels and order may swap between near-equal
    scores, so slots are compared after sorting by (score, label)); the data-dependent K may
    differ only by slots whose score is within 1e-3 of the cut (conf, or 0).
    """
    got = run_proto(proto, images)
    ref = [t.numpy() for t in graph(torch.from_numpy(images))]
    if graph.postprocess is not None:
        return _verify_postprocessed(graph.postprocess, got, ref)
    diffs = {}
    for (name, a), b in zip(got.items(), ref):
        if a.shape != b.shape:
            raise MobileInstError(f"ONNX export check failed: output {name} has shape {a.shape}, "
                                  f"PyTorch {b.shape}")
        scale = max(1.0, float(np.abs(b).max(initial=0.0)))
        diffs[name] = float(np.abs(a - b).max(initial=0.0)) / scale
    if any(d > 1e-3 for d in diffs.values()):
        raise MobileInstError(f"ONNX export check failed: outputs differ from PyTorch: {diffs}")
    log.info("ONNX export check: %s", diffs)
    return diffs


def _verify_postprocessed(pp: PostProcess, got: dict[str, np.ndarray], ref: list[np.ndarray]
                          ) -> dict[str, float]:
    """`_verify` of a post-processed graph (labels, scores, masks, kernels)."""
    gs, rs = got["scores"], ref[1]
    if gs.shape[0] != rs.shape[0] or got["masks"].shape[2:] != ref[2].shape[2:]:
        raise MobileInstError(f"ONNX export check failed: masks {got['masks'].shape}, PyTorch "
                              f"{ref[2].shape}")
    k = min(gs.shape[1], rs.shape[1])
    cut = pp.conf or 0.0
    extra = np.concatenate([gs[:, k:].ravel(), rs[:, k:].ravel()])  # slots only one side has
    scores_diff = float(np.abs(-np.sort(-gs, 1)[:, :k] - -np.sort(-rs, 1)[:, :k]).max(initial=0.0))
    valid = rs[:, :k] > 0.05
    masks_g, masks_r = got["masks"][:, :k], ref[2][:, :k]
    agree = float(np.mean(masks_g[valid] == masks_r[valid])) if valid.any() else 1.0
    diffs = {"scores": scores_diff, "masks_disagree": 1 - agree, "k": float(gs.shape[1]),
             "k_torch": float(rs.shape[1])}
    if scores_diff > 1e-3 or agree < 0.99 or bool(((extra > 0) & (np.abs(extra - cut) > 1e-3)).any()):
        raise MobileInstError(f"ONNX export check failed (post-processed graph): {diffs}")
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


__all__ = ["export_onnx", "write_onnx", "export_module", "read_metadata", "example_images",
           "ExportGraph", "FeaturesGraph",
           "graph_kind", "RAW_OUTPUTS", "POSTPROCESS_OUTPUTS", "FEATURES_OUTPUTS", "INPUT_NAME",
           "POSTPROCESS_PREFIX"]
