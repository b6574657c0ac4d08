"""Prediction with an exported ONNX graph in onnxruntime, with the same API as `Predictor`.

    predictor = OnnxPredictor("model.onnx", conf=0.3, threads=1)
    result = predictor(image_rgb_uint8)      # Result(labels, scores, masks, names)

The graph's metadata (written by `export_onnx`) says what it takes and returns:
- a dynamic graph gets exactly the batch `mobileinst.predict.preprocess` makes (short side
  `imgsz`, long side capped, padded to a multiple of 32 with the mean pixel);
- a fixed-size graph gets the image letterboxed into its (H, W): resized to fit, padded
  bottom/right with the mean pixel;
- a raw-output graph is decoded with the reference post-processing
  (`mobileinst.models.postprocess.postprocess_image`), so its Result equals the PyTorch
  Predictor's for the same input batch; only the kept queries' masks are computed;
- a post-processed graph already returns top-K binary masks at the input size: they are cropped
  to the image and resized (bilinear on the 0/1 mask) to the original size.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CheckpointError, MobileInstError
from ..models.mobileinst import PIXEL_MEAN
from ..models.postprocess import MASK_CHUNK_BYTES, InferenceConfig, postprocess_image, query_scores
from ..predict import Predictor, Result, conf_config, preprocess


def session_options(threads: int = 1):
    """onnxruntime options for latency: `threads` intra-op threads, 1 inter-op, sequential,
    every graph optimisation."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


def open_session(path: str | Path, threads: int = 1):
    """(onnxruntime session, mobileinst metadata) of an ONNX file made by `export_onnx`.

    CheckpointError when the file is missing, not ONNX (corrupt, truncated, another format) or
    an ONNX model that mobileinst did not export (no metadata)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise MobileInstError("onnxruntime is not installed: pip install 'mobileinst[export]'") from None
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such ONNX file")
    try:
        sess = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several private exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a loadable ONNX model (corrupt, truncated or another "
                              f"format): {first[:300]}") from None
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    if meta.get("producer") != "mobileinst":
        raise CheckpointError(f"{path}: an ONNX model without mobileinst metadata (not made by "
                              "`mobileinst export`): its input and outputs are unknown")
    return sess, meta


def letterbox(images: list[np.ndarray], size: tuple[int, int]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """RGB uint8 images -> (B, 3, H, W) float 0..255 at exactly `size`, each image resized to fit
    (aspect kept) and padded bottom/right with the mean pixel; and each resized (h, w)."""
    hp, wp = size
    batch = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1).repeat(len(images), 1, hp, wp)
    sizes = []
    for i, img in enumerate(images):
        scale = min(hp / img.shape[0], wp / img.shape[1])
        h = min(hp, max(1, round(img.shape[0] * scale)))
        w = min(wp, max(1, round(img.shape[1] * scale)))
        r = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
        batch[i, :, :h, :w] = torch.from_numpy(r).permute(2, 0, 1).float()
        sizes.append((h, w))
    return batch, sizes


def mask_logits(kernels: torch.Tensor, mask_feats: torch.Tensor, upsample: int = 2) -> torch.Tensor:
    """`MobileInst.masks` for one image: kernels (K, E) . M (E, h, w) -> (K, upsample*h, upsample*w).
    K = 0 (no query above the threshold) gives an empty (0, upsample*h, upsample*w)."""
    e, h, w = mask_feats.shape
    if len(kernels) == 0:  # F.interpolate rejects an empty channel dimension
        return mask_feats.new_zeros((0, upsample * h, upsample * w))
    m = torch.bmm(kernels[None], mask_feats.reshape(1, e, h * w)).view(1, -1, h, w)
    return F.interpolate(m, scale_factor=float(upsample), mode="bilinear", align_corners=False)[0]


def decode_raw(outputs: dict[str, np.ndarray], padded_size: tuple[int, int],
               image_sizes: list[tuple[int, int]], orig_sizes: list[tuple[int, int]],
               cfg: InferenceConfig = InferenceConfig(), mask_upsample: int = 2) -> list[dict[str, torch.Tensor]]:
    """Raw-graph outputs (logits, objectness, kernels, mask_features) -> per image
    {labels, scores, masks bool at orig size}, exactly `MobileInst.postprocess`.

    Masks are computed only for the queries above cfg.score_threshold (the reference keeps only
    those), so a higher threshold (the display confidence) saves most of the work; with cfg.conf
    set only the instances scoring above it are upsampled (`postprocess_image`). An image where
    no query passes gives empty results (masks (0, H0, W0))."""
    results = []
    for i in range(outputs["logits"].shape[0]):
        logits = torch.from_numpy(outputs["logits"][i])  # (N, C)
        obj = torch.from_numpy(outputs["objectness"][i])  # (N, 1)
        scores, _ = query_scores(logits, obj)  # (N,)
        keep = scores > cfg.score_threshold
        kernels = torch.from_numpy(outputs["kernels"][i])[keep]  # (K, E)
        masks = mask_logits(kernels, torch.from_numpy(outputs["mask_features"][i]), mask_upsample)
        results.append(postprocess_image(logits[keep], obj[keep], masks, padded_size,
                                         tuple(image_sizes[i]), tuple(orig_sizes[i]), cfg))
    return results


class OnnxPredictor(Predictor):
    """`Predictor` backed by onnxruntime on an ONNX file from `export_onnx`.

    imgsz/max_size: the short side / long-side cap for a dynamic graph (default: the size stored
    at export, long side imgsz * 853 / 640); a fixed-size graph always uses its own size.
    threads: onnxruntime intra-op threads. The PyTorch-only attributes (`model`) are None.
    """

    def __init__(self, path: str | Path, imgsz: int | None = None, max_size: int | None = None,
                 conf: float = 0.3, threads: int = 1, class_names: list[str] | None = None) -> None:
        self.path = Path(path)
        self.session, self.meta = open_session(path, threads)
        meta = self.meta
        self.input = self.session.get_inputs()[0]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.configure(meta, imgsz, max_size, conf, class_names)

    def configure(self, meta: dict[str, str], imgsz: int | None = None, max_size: int | None = None,
                  conf: float = 0.3, class_names: list[str] | None = None) -> None:
        """The predictor's settings from a mobileinst export's metadata (any runtime's file)."""
        self.input_dtype = np.dtype(meta.get("input_dtype", "uint8"))
        self.dynamic = json.loads(meta.get("dynamic", "false"))
        self.input_size = tuple(json.loads(meta.get("input_size", "null")) or ()) or None
        self.batch = None if meta.get("batch", "dynamic") == "dynamic" else int(meta["batch"])
        self.postprocess = json.loads(meta.get("postprocess", "false"))
        self.model_config = json.loads(meta.get("model_config", "{}"))
        self.class_names = list(class_names or json.loads(meta.get("class_names", "[]")))
        self.cat_ids = json.loads(meta.get("cat_ids", "[]"))
        self.inference = InferenceConfig(float(meta.get("score_threshold", 0.005)),
                                         float(meta.get("mask_threshold", 0.45)),
                                         int(meta.get("max_det", 100)))
        self.imgsz = imgsz or (min(self.input_size) if self.input_size else int(meta.get("imgsz", 640)))
        self.max_size = max_size or round(self.imgsz * 853 / 640)
        self.conf = conf
        self.model = None
        self.device = torch.device("cpu")

    # -- the graph ---------------------------------------------------------------------------
    def check_input(self, batch: np.ndarray) -> None:
        """MobileInstError unless `batch` fits the graph's input (dtype, layout, size)."""
        if not isinstance(batch, np.ndarray):
            raise MobileInstError(f"{self.path.name}: the input must be a numpy array, got {type(batch).__name__}")
        if batch.dtype != self.input_dtype:
            raise MobileInstError(f"{self.path.name}: the graph takes {self.input_dtype} pixels 0..255, "
                                  f"got {batch.dtype}")
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise MobileInstError(f"{self.path.name}: the input must be (B, 3, H, W) RGB, got shape "
                                  f"{tuple(batch.shape)}")
        h, w = batch.shape[-2:]
        if self.input_size and (h, w) != tuple(self.input_size):
            raise MobileInstError(f"{self.path.name}: this graph was exported for "
                                  f"{self.input_size[0]}x{self.input_size[1]} inputs, got {h}x{w} "
                                  "(export with --dynamic for any size)")
        if h % 32 or w % 32:
            raise MobileInstError(f"{self.path.name}: height and width must be multiples of 32, got {h}x{w}")
        if self.batch is not None and batch.shape[0] != self.batch:
            raise MobileInstError(f"{self.path.name}: this graph takes batches of {self.batch}, got {batch.shape[0]}")

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """One run of the graph on a prepared (B, 3, H, W) batch -> {output name: array}."""
        self.check_input(batch)
        return dict(zip(self.output_names, self.session.run(None, {self.input.name: batch})))

    def prepare(self, images: list[np.ndarray]) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """RGB uint8 images -> (the graph's input batch, each image's resized size)."""
        if self.input_size:
            batch, sizes = letterbox(images, tuple(self.input_size))
        else:
            batch, sizes = preprocess(images, self.imgsz, self.max_size)
        if self.input_dtype == np.uint8:  # pixels are whole numbers; the pad is the rounded mean
            return batch.round().clamp(0, 255).to(torch.uint8).numpy(), sizes
        return batch.numpy().astype(self.input_dtype), sizes

    # -- the Predictor API -------------------------------------------------------------------
    def __call__(self, images: np.ndarray | list[np.ndarray]) -> Result | list[Result]:
        """RGB uint8 image(s) (H, W, 3) -> Result(s) with score > conf, masks at the image's size."""
        single = isinstance(images, np.ndarray)
        batch_imgs = [images] if single else list(images)
        for img in batch_imgs:
            _check_image(img)
        step = self.batch or max(1, len(batch_imgs))
        results = []
        for start in range(0, len(batch_imgs), step):
            chunk = batch_imgs[start:start + step]
            results += self._predict(chunk)
        return results[0] if single else results

    def _predict(self, images: list[np.ndarray]) -> list[Result]:
        n = len(images)
        padded_imgs = images + [images[-1]] * ((self.batch or n) - n)  # fill a fixed batch
        batch, sizes = self.prepare(padded_imgs)
        out = self.run(batch)
        orig = [im.shape[:2] for im in images]
        if self.postprocess:
            return [self._from_postprocessed(out, i, sizes[i], orig[i]) for i in range(n)]
        cfg = conf_config(self.inference, self.conf)  # masks only for what conf keeps
        outs = decode_raw({k: v[:n] for k, v in out.items()}, tuple(batch.shape[-2:]), sizes[:n],
                          orig, cfg, int(self.model_config.get("mask_upsample", 2)))
        return [self._result(o) for o in outs]

    def _from_postprocessed(self, out: dict[str, np.ndarray], i: int, size: tuple[int, int],
                            orig: tuple[int, int]) -> Result:
        keep = out["scores"][i] > self.conf
        labels, scores = out["labels"][i][keep], out["scores"][i][keep]
        masks = resize_masks(out["masks"][i][keep], size, orig)
        return Result(labels, scores, masks, [self.class_names[j] for j in labels])


def resize_masks(masks: np.ndarray, size: tuple[int, int], orig: tuple[int, int],
                 chunk_bytes: int = MASK_CHUNK_BYTES) -> np.ndarray:
    """(K, Hp, Wp) 0/1 masks at the padded input -> (K, H0, W0) bool: crop the image's (h, w),
    resize bilinearly to the original size (i.e. threshold the interpolation at 0.5).

    A few instances at a time (~chunk_bytes of uint8 intermediates at the original size, at
    least one instance); each channel is resized on its own, so chunking changes nothing."""
    h, w = size
    masks = masks[:, :h, :w]  # (K, h, w)
    if (h, w) == tuple(orig):
        return masks.astype(bool)
    out = np.empty((len(masks), *orig), bool)  # (K, H0, W0)
    step = int(min(512, max(1, chunk_bytes // (2 * orig[0] * orig[1]))))  # cv2: <= 512 channels
    for s in range(0, len(masks), step):
        chunk = np.ascontiguousarray(masks[s:s + step].transpose(1, 2, 0)).astype(np.uint8)  # (h,w,k)
        r = cv2.resize(chunk, (orig[1], orig[0]), interpolation=cv2.INTER_LINEAR)  # (H0, W0[, k])
        out[s:s + step] = r.reshape(orig[0], orig[1], -1).transpose(2, 0, 1) > 0
    return out


def _check_image(img: Any) -> None:
    if not isinstance(img, np.ndarray):
        raise MobileInstError(f"expected an RGB uint8 image (numpy array H x W x 3), got {type(img).__name__}")
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise MobileInstError(f"expected an RGB uint8 image (H, W, 3), got {img.dtype} {tuple(img.shape)}")
