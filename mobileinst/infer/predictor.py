"""Image prediction over any backend: one interface, one preparation, one decode.

    predictor = load_predictor("best.pt")                         # PyTorch (infer/factory.py)
    predictor = load_predictor("best.onnx", backend="onnxruntime", threads=1)
    result = predictor(image_rgb)            # Result: labels, scores, names, masks at the image's size
    results = predictor([img1, img2])

A backend is a `Predictor` subclass that says what the network is (`info`, a ModelInfo) and
implements `forward(batch)`: the prepared float batch (B, 3, H, W) -> the raw graph's outputs
{logits, objectness, kernels, mask_features} as tensors or arrays (or, for a post-processed
export, {labels, scores, masks}). Everything else is here and shared: the image checks, the resize
and padding (`prepare`), fixed-batch chunking, and decoding (`postprocess`) with
`models.postprocess.decode_instances` at the display confidence (`conf_config`: only the instances
above `conf` get a full-size mask). A call is prepare -> forward -> postprocess; benchmarks time
those three.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..checkpoint import model_from_checkpoint
from ..models.mobileinst import MobileInst
from ..models.postprocess import (InferenceConfig, binary_masks, conf_config, decode_instances,
                                   decode_selected, evaluation_config)
from ..models.model_info import ModelInfo
from .model_info import Described
from .preprocess import check_image, prediction_sizes, prepare
from .results import MaskChunks, Result, postprocessed_result

log = logging.getLogger("mobileinst.infer")
RAW_KEYS = ("logits", "objectness", "kernels", "mask_features")


class Predictor(Described):
    """Image(s) -> Result(s) with score > conf. Subclasses set `info` and implement `forward`.

    imgsz / max_size: the short side and long-side cap for an any-size network (default: the
    model's training size, long side imgsz * 853 / 640); a fixed-size export uses its own size.
    conf None: evaluation (`val`), the decode of training-time evaluation: every query above
    the score threshold ranked, at most max_detections, no final-score cut.
    """

    info: ModelInfo

    def __init__(self, info: ModelInfo, imgsz: int | None = None, max_size: int | None = None,
                 conf: float | None = 0.3) -> None:
        self.info = info
        self.imgsz, self.max_size = prediction_sizes(info.input, imgsz, max_size, info.imgsz)
        self.conf = conf
        if info.graph_conf is not None and (conf or 0.0) < info.graph_conf:
            log.warning("%s returns only instances scoring above %s (exported with --conf): conf %s "
                        "cannot show more", info.source or "the graph", info.graph_conf, conf)

    def forward(self, batch: Tensor) -> dict[str, Tensor | np.ndarray]:
        """The network: the prepared float batch (B, 3, H, W) 0..255 -> its outputs by name."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def __call__(self, images: np.ndarray | list[np.ndarray], lazy_masks: bool = False
                 ) -> Result | list[Result]:
        """RGB uint8 image(s) (H, W, 3) -> Result(s) with score > conf, masks at the image's size.
        lazy_masks: each Result's masks a `MaskChunks`, made a few at a time as they are iterated
        (`val`: memory bounded on huge photos whatever the instance count)."""
        single = isinstance(images, np.ndarray)
        batch_imgs = [images] if single else list(images)
        for img in batch_imgs:
            check_image(img)
        step = self.info.input.batch or max(1, len(batch_imgs))
        results = []
        for start in range(0, len(batch_imgs), step):
            results += self._predict(batch_imgs[start:start + step], lazy_masks)
        return results[0] if single else results

    @torch.no_grad()
    def _predict(self, images: list[np.ndarray], lazy_masks: bool = False) -> list[Result]:
        batch, sizes = self.prepare(images)
        return self.postprocess(self.forward(batch), tuple(batch.shape[-2:]), sizes,
                                [im.shape[:2] for im in images], lazy_masks)

    # -- the three stages (public, so benchmarks time exactly what prediction runs) ---------------
    def prepare(self, images: list[np.ndarray]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Pre-processing: RGB uint8 images -> (float batch (B, 3, H, W) 0..255, each image's
        resized size inside it); a fixed-batch export gets its batch filled with the last image."""
        fill = (self.info.input.batch or len(images)) - len(images)
        return prepare(images + [images[-1]] * fill, self.info.input, self.imgsz, self.max_size)

    def postprocess(self, out: dict[str, Tensor | np.ndarray], padded: tuple[int, int],
                    sizes: list[tuple[int, int]], origs: list[tuple[int, int]],
                    lazy_masks: bool = False) -> list[Result]:
        """Post-processing: the network's outputs -> one Result per original image (origs);
        lazy_masks: masks as `MaskChunks` (see __call__)."""
        if self.info.graph == "postprocess":
            return [postprocessed_result(out, i, sizes[i], origs[i], self.conf or 0.0, self.info,
                                         lazy_masks) for i in range(len(origs))]
        # evaluation (conf None): every class of a query ranked (multi_label); with conf, one label
        # per query and masks only for what conf keeps
        cfg = self.info.inference
        cfg = evaluation_config(cfg) if self.conf is None else conf_config(cfg, self.conf)
        results = []
        for inst in decode_outputs(out, padded, sizes, origs, cfg, self.info.mask_upsample, lazy_masks):
            labels, masks = inst["labels"].cpu().numpy(), inst["masks"]
            results.append(Result(labels, inst["scores"].cpu().numpy(),
                                  masks if lazy_masks else masks.cpu().numpy(), self.info.names(labels)))
        return results


def decode_outputs(out: dict[str, Tensor | np.ndarray], padded: tuple[int, int],
                   sizes: list[tuple[int, int]], origs: list[tuple[int, int]],
                   cfg: InferenceConfig = InferenceConfig(), mask_upsample: int = 2,
                   lazy_masks: bool = False) -> list[dict[str, Tensor | MaskChunks]]:
    """A raw-output batch {logits, objectness, kernels, mask_features} (tensors or arrays, any
    backend) -> per original image {labels, scores, masks bool (K, H0, W0)}: `decode_instances`
    on each of the first len(origs) images (the rest fill a fixed batch). lazy_masks: masks as
    a `MaskChunks` of the same masks, `binary_masks` run a few instances at a time."""
    results = []
    for i in range(len(origs)):
        raw = [torch.as_tensor(out[k][i]) for k in RAW_KEYS]  # (N, C), (N, 1), (N, E), (E, h, w)
        size, orig = tuple(sizes[i]), tuple(origs[i])
        if not lazy_masks:
            results.append(decode_instances(*raw, padded, size, orig, cfg, mask_upsample))
            continue
        picked = decode_selected(*raw, cfg, mask_upsample)
        prob = picked.pop("mask_prob")
        results.append({**picked, "masks": lazy_binary_masks(prob, padded, size, orig, cfg.mask_threshold)})
    return results


def lazy_binary_masks(mask_prob: Tensor, padded: tuple[int, int], size: tuple[int, int],
                      orig: tuple[int, int], threshold: float) -> MaskChunks:
    """`binary_masks` of (K, h4, w4) probabilities as a MaskChunks: the same (K, H0, W0) bool
    masks, a few instances per call."""
    def make(start: int, end: int) -> np.ndarray:
        return binary_masks(mask_prob[start:end], padded, size, orig, threshold).cpu().numpy()
    return MaskChunks(len(mask_prob), orig, make)


class TorchPredictor(Predictor):
    """A PyTorch MobileInst on `device` (eager; what `predict --backend torch` runs)."""

    def __init__(self, model: MobileInst, info: ModelInfo | None = None, imgsz: int | None = None,
                 max_size: int | None = None, conf: float | None = 0.3,
                 device: str | torch.device = "cpu") -> None:
        super().__init__(info or ModelInfo.for_model(model.cfg), imgsz, max_size, conf)
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        # the model's own thresholds (a caller may have changed model.inference)
        self.info = _with_inference(self.info, model.inference)

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs) -> "TorchPredictor":
        """A checkpoint's model (EMA weights when present) and description."""
        model, ckpt = model_from_checkpoint(path)
        return cls(model, ModelInfo.from_checkpoint(path, ckpt), **kwargs)

    def forward(self, batch: Tensor) -> dict[str, Tensor]:
        return dict(zip(RAW_KEYS, self.model.inference_outputs(batch.to(self.device))))


def _with_inference(info: ModelInfo, cfg: InferenceConfig) -> ModelInfo:
    return info if info.inference == cfg else replace(info, inference=cfg)
