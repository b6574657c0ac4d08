"""The ONNX graph of a model: the modules that are exported (`ExportGraph`: the whole network, raw
or post-processed; `FeaturesGraph`: backbone + mask decoder), and `write_onnx`, which exports the
graph a `ModelInfo` describes, checks it against PyTorch and writes it with its metadata.

Below both users: the onnxruntime backend exports a checkpoint once and caches the file
(`infer.factory`), video runs these modules in PyTorch (`infer.video`), and the `export` job writes
every format from them (`mobileinst.export.onnx.export_onnx`, whose docstring is the file's layout:
inputs, outputs, decoding, metadata).
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .. import __version__
from ..errors import MobileInstError
from ..models.model_info import INPUT_NAME, SIZE_DIVISOR, ModelInfo, set_metadata
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
        # the one kernels . M product: the pooled class / objectness terms need every query's
        # stride-8 mask logits, and PostProcess reuses them; without them PostProcess makes the
        # product for the queries it keeps only
        m8 = None
        if self.model.pools_masks:
            m8 = self.postprocess.product(heads["pred_kernels"], mask_feats)  # (B, N, H/8, W/8)
        out = self.model.add_pooled_terms(heads, mask_feats, m8)
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


__all__ = ["ExportGraph", "FeaturesGraph", "POSTPROCESS_PREFIX", "example_images", "export_module",
           "run_proto", "save_atomic", "to_input", "write_onnx"]
