"""Inference post-processing: raw network outputs -> instances (labels, scores, binary masks).

SparseInst's recipe (/shared/spec/training.md §3), shared by PyTorch prediction and the export
graph: score = sqrt(sigmoid(cls) * sigmoid(obj)), one label per query (max over classes), keep
score > 0.005, maskness rescoring at 1/4 resolution, upsample the kept masks to the padded input,
crop the image, resize to the original size, binarise > 0.45. No NMS: at most N instances.

Prediction (`predict --conf`) sets `InferenceConfig.conf`: the queries are then filtered on their
pre-score before any mask is computed and on their final score before any mask is upsampled (see
`postprocess_image`), and the full-resolution masks are made a few instances at a time
(`binary_masks`), so memory grows with the instances kept, not with the queries or the photo.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class InferenceConfig:
    score_threshold: float = 0.005  # SparseInst CLS_THRESHOLD; 0.2-0.3 emptied images (mobileinst.md)
    mask_threshold: float = 0.45  # SparseInst MASK_THRESHOLD
    max_detections: int = 100
    # predict's display confidence: when set, only instances whose final (rescored) score is
    # > conf are returned, and only their masks are upsampled. None (evaluation): every query
    # above score_threshold is ranked and returned, up to max_detections.
    conf: float | None = None


def conf_config(cfg: InferenceConfig, conf: float) -> InferenceConfig:
    """The post-processing for `predict --conf`: pre-score threshold conf, final-score cut conf.

    Exactly the instances that ranking every query above min(score_threshold, conf) and then
    keeping score > conf gives (the old recipe), without a mask for the rest. Proof: the final
    score is pre * maskness with pre >= 0 and 0 <= maskness <= 1 (a mean of probabilities over
    the binarised pixels; in float32 too, since sum(p * fg) <= sum(fg) term by term with the same
    summation order and rounding is monotone), so final <= pre and final > conf implies
    pre > conf >= min(score_threshold, conf). The queries the higher threshold drops thus all
    have final <= conf and were dropped afterwards anyway; and as every one of them ranks below
    every instance with final > conf, the top max_detections of the survivors are unchanged (up
    to the order of exactly equal scores). Tested against a copy of the old recipe in
    tests/test_predict_robust.py."""
    return InferenceConfig(conf, cfg.mask_threshold, cfg.max_detections, conf=conf)

# Bytes of float intermediates `binary_masks` may hold at once at the original size: 64 MiB is
# ~0.2 s of bilinear work per chunk, small next to the (K, H0, W0) bool result itself.
MASK_CHUNK_BYTES = 64 << 20


def query_scores(logits: Tensor, objectness: Tensor) -> tuple[Tensor, Tensor]:
    """(..., N, C), (..., N, 1) -> score (..., N) and label (..., N): sqrt(p_cls * p_obj), max over C."""
    prob = (logits.sigmoid() * objectness.sigmoid()).sqrt()
    return prob.max(dim=-1)


def kernel_mask_logits(kernels: Tensor, mask_feats: Tensor, upsample: int = 2) -> Tensor:
    """One image's mask logits: kernels (K, E) . M (E, h, w) -> (K, upsample*h, upsample*w),
    bilinear (align_corners=False, SparseInst SCALE_FACTOR 2). K = 0 gives an empty result."""
    e, h, w = mask_feats.shape
    if len(kernels) == 0:  # F.interpolate rejects an empty channel dimension
        return mask_feats.new_zeros((0, upsample * h, upsample * w))
    m = torch.bmm(kernels[None], mask_feats.reshape(1, e, h * w)).view(1, -1, h, w)  # (1, K, h, w)
    return F.interpolate(m, scale_factor=float(upsample), mode="bilinear", align_corners=False)[0]


def maskness(mask_prob: Tensor, threshold: float) -> Tensor:
    """Mean foreground probability inside the binarised mask: (..., H, W) -> (...)."""
    fg = (mask_prob > threshold).to(mask_prob.dtype)
    return (mask_prob * fg).flatten(-2).sum(-1) / (fg.flatten(-2).sum(-1) + 1e-6)


def upsample_masks(mask_prob: Tensor, padded_size: tuple[int, int], image_size: tuple[int, int],
                   orig_size: tuple[int, int]) -> Tensor:
    """(K, h4, w4) probabilities -> (K, H0, W0): to the padded input, crop the image, to the original.
    The last resize is skipped when the image was not resized: bilinear to the same size is the
    identity (weights exactly 1 and 0), so the result is bit-identical and ~40% cheaper (tested)."""
    m = F.interpolate(mask_prob[None], size=padded_size, mode="bilinear", align_corners=False)
    m = m[:, :, : image_size[0], : image_size[1]]
    if tuple(orig_size) != tuple(m.shape[-2:]):
        m = F.interpolate(m, size=orig_size, mode="bilinear", align_corners=False)
    return m[0]


def binary_masks(mask_prob: Tensor, padded_size: tuple[int, int], image_size: tuple[int, int],
                 orig_size: tuple[int, int], threshold: float,
                 chunk_bytes: int = MASK_CHUNK_BYTES) -> Tensor:
    """(K, h4, w4) probabilities -> (K, H0, W0) bool masks, `upsample_masks` > threshold.

    Made in chunks of instances so the float intermediates never exceed ~chunk_bytes (at least
    one instance: H0 x W0 floats); each instance is resized on its own channel, so the result is
    bit-identical to upsampling all K at once."""
    h0, w0 = orig_size
    out = torch.empty((len(mask_prob), h0, w0), dtype=torch.bool, device=mask_prob.device)
    step = max(1, chunk_bytes // (4 * h0 * w0))  # instances per chunk
    for s in range(0, len(mask_prob), step):
        out[s:s + step] = upsample_masks(mask_prob[s:s + step], padded_size, image_size,
                                         orig_size) > threshold  # (k, H0, W0)
    return out


def postprocess_image(logits: Tensor, objectness: Tensor, mask_logits: Tensor,
                      padded_size: tuple[int, int], image_size: tuple[int, int],
                      orig_size: tuple[int, int], cfg: InferenceConfig = InferenceConfig()
                      ) -> dict[str, Tensor]:
    """One image's raw outputs -> instances sorted by score.

    logits (N, C), objectness (N, 1), mask_logits (N, h4, w4) at 1/4 of padded_size;
    image_size = the resized image inside the padding, orig_size = the original image.
    Returns labels (K,) int64, scores (K,) float, masks (K, H0, W0) bool.
    """
    scores, labels = query_scores(logits.float(), objectness.float())  # (N,), (N,)
    keep = scores > cfg.score_threshold
    scores, labels, mask_prob = scores[keep], labels[keep], mask_logits[keep].float().sigmoid()
    scores = scores * maskness(mask_prob, cfg.mask_threshold)  # (K,) final scores
    order = scores.argsort(descending=True)[: cfg.max_detections]
    if cfg.conf is not None:  # prediction: drop what --conf drops before any upsampling
        order = order[scores[order] > cfg.conf]
    scores, labels, mask_prob = scores[order], labels[order], mask_prob[order]
    masks = binary_masks(mask_prob, padded_size, image_size, orig_size, cfg.mask_threshold)
    return {"labels": labels, "scores": scores, "masks": masks}  # masks (K, H0, W0) bool


def decode_instances(logits: Tensor, objectness: Tensor, kernels: Tensor, mask_feats: Tensor,
                     padded_size: tuple[int, int], image_size: tuple[int, int],
                     orig_size: tuple[int, int], cfg: InferenceConfig = InferenceConfig(),
                     mask_upsample: int = 2) -> dict[str, Tensor]:
    """THE decode step, from one image's raw outputs to its instances; evaluation in training,
    `predict` and `val` on every backend, and the tracker's drawing all go through here.

    logits (N, C), objectness (N, 1), kernels (N, E), mask_feats M (E, h, w) at 1/8 of
    padded_size: the raw graph's outputs (`MobileInst.inference_outputs`). Only the queries that
    pass cfg.score_threshold get a mask (kernels[keep] . M), then `postprocess_image`.
    Returns labels (K,) int64, scores (K,) float, masks (K, H0, W0) bool."""
    scores, _ = query_scores(logits.float(), objectness.float())  # (N,)
    keep = scores > cfg.score_threshold
    masks = kernel_mask_logits(kernels[keep].float(), mask_feats.float(), mask_upsample)  # (K, 2h, 2w)
    return postprocess_image(logits[keep], objectness[keep], masks, padded_size, image_size,
                             orig_size, cfg)
