"""ONNX export of MobileInst: the network alone, or the network plus the whole inference tail.

    from mobileinst.export.onnx import export_onnx
    export_onnx(model, "m.onnx", imgsz=(640, 640))                 # fixed size, raw outputs
    export_onnx(model, "m.onnx", dynamic=True, postprocess=True)   # any size, instances out
    write_onnx(model, "m.onnx", info.for_graph("raw", (640, 640)))  # from a ModelInfo

The graph modules and the writer (`write_onnx`) are `mobileinst.infer.onnx_graph`, in the
inference layer below, which also exports a checkpoint for onnxruntime; this module is their
keyword form and the description of the file.

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
network's own float noise); tests/test_export_postprocess.py. A device app reads K from the
output's shape and needs no threshold of its own when it exported with its confidence. Exported
by the TorchScript fallback (when the dynamo exporter fails), K cannot be data-dependent:
K = max_det, score 0 = empty slot (metadata `num_instances`: "max_det").

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

from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ..errors import MobileInstError
from ..infer.onnx_graph import (POSTPROCESS_PREFIX, ExportGraph, FeaturesGraph, example_images,
                                export_module, write_onnx)
from ..models.model_info import (FEATURES_OUTPUTS, INPUT_NAME, PARTS, POSTPROCESS_OUTPUTS, RAW_OUTPUTS,
                                 ModelInfo, graph_kind, read_metadata)


def _check_options(part: str, postprocess: bool, conf: float | None) -> None:
    """The graph options of `export_onnx` that a ModelInfo cannot hold wrong."""
    if conf is not None and not postprocess:
        raise MobileInstError("conf (--conf) is for post-processed graphs (--postprocess); a raw "
                              "graph's consumer applies its own confidence")
    if part not in PARTS:
        raise MobileInstError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    if part == "features" and postprocess:
        raise MobileInstError("the features graph has no post-processing (it outputs mask features only)")


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
