"""Inference post-processing: raw network outputs -> instances (labels, scores, binary masks).

SparseInst's recipe (spec training.md §3), shared by PyTorch prediction and the export
graph: score = sqrt(sigmoid(cls) * sigmoid(obj)), one label per query (max over classes), keep
score > 0.005, maskness rescoring at 1/4 resolution, upsample the kept masks to the padded input,
crop the image, resize to the original size, binarise > 0.45. No NMS: at most N instances.

One decode for every path: `select_instances` is batched and is what the post-processed ONNX
graph runs (`mobileinst.infer.onnx_graph.PostProcess`); `decode_instances` (evaluation, `predict`,
`val` on every backend) and `postprocess_image` are that function on one image, followed by
`binary_masks` at the original size.

Prediction (`predict --conf`) sets `InferenceConfig.conf`: the queries are then filtered on their
pre-score before any mask is computed and on their final score before any mask is upsampled (see
`postprocess_image`), and each full-resolution mask is computed only inside its instance's box
(`binary_masks`), so work and memory grow with the instances kept, not with the queries or the photo.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class InferenceConfig:
    score_threshold: float = 0.005  # SparseInst CLS_THRESHOLD; 0.2-0.3 emptied images (mobileinst.md)
    mask_threshold: float = 0.45  # SparseInst MASK_THRESHOLD
    max_detections: int = 100
    # evaluation: every (query, class) pair is a candidate, ranked by that class's score, so a
    # query unsure between two classes is scored under both (the top-k over N x C of Deformable
    # DETR's and Mask2Former's inference; Ultralytics' val `multi_label`). Prediction and the
    # exported graphs keep one label per query (the best class): one instance per object.
    multi_label: bool = False
    # predict's display confidence: when set, only instances whose final (rescored) score is
    # > conf are returned, and only their masks are upsampled. None (evaluation): every query
    # above score_threshold is ranked and returned, up to max_detections.
    conf: float | None = None


COCO_MAX_DETS = 100  # pycocotools' maxDets[-1]: the detections per image that mask AP counts


def evaluation_config(cfg: InferenceConfig) -> InferenceConfig:
    """The decode that evaluation (`val` on every backend, the in-run evaluation) scores: every
    (query, class) pair a candidate, the best COCO_MAX_DETS per image, whatever cap a graph's
    own post-processing has (an exported graph caps max_det at its query count)."""
    return replace(cfg, multi_label=True, max_detections=COCO_MAX_DETS, conf=None)


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



def class_scores(logits: Tensor, objectness: Tensor) -> Tensor:
    """(..., N, C), (..., N, 1) -> every class's score of every query (..., N, C): sqrt(p_cls * p_obj)."""
    return (logits.sigmoid() * objectness.sigmoid()).sqrt()


def query_scores(logits: Tensor, objectness: Tensor) -> tuple[Tensor, Tensor]:
    """(..., N, C), (..., N, 1) -> score (..., N) and label (..., N): `class_scores`, max over C."""
    return class_scores(logits, objectness).max(dim=-1)


def resize_bilinear(x: Tensor, size: Any = None, scale_factor: float | None = None) -> Tensor:
    """F.interpolate (bilinear, align_corners=False: ONNX Resize half_pixel) of (B, K, h, w) that
    also takes K = 0: ONNX Resize does, eager PyTorch raises, so eagerly the empty result is made
    (no guard on K while exporting, where K is symbolic)."""
    if not torch.compiler.is_exporting() and x.shape[1] == 0:
        size = size or [int(s * scale_factor) for s in x.shape[-2:]]
        return x.new_zeros((*x.shape[:2], int(size[0]), int(size[1])))
    return F.interpolate(x, size=size, scale_factor=scale_factor, mode="bilinear", align_corners=False)


def gather_queries(x: Tensor, index: Tensor) -> Tensor:
    """x (B, N, ...) at the queries `index` (B, K) of each image -> (B, K, ...)."""
    idx = index.reshape(*index.shape, *(1,) * (x.dim() - 2))
    return x.gather(1, idx.expand(-1, -1, *x.shape[2:]))


def count_kept(passed: Tensor, upper: int) -> int:
    """The most True of any row of (B, n) `passed`, at most `upper` (a data-dependent size when
    exporting: the checks bound it for the exporter)."""
    k = int(passed.sum(1).clamp(max=upper).max())
    torch._check(k >= 0)
    torch._check(k <= upper)
    return k


def kernel_mask_logits(kernels: Tensor, mask_feats: Tensor, upsample: int = 2) -> Tensor:
    """One image's mask logits: kernels (K, E) . M (E, h, w) -> (K, upsample*h, upsample*w),
    bilinear (align_corners=False, SparseInst SCALE_FACTOR 2). K = 0 gives an empty result."""
    e, h, w = mask_feats.shape
    m = torch.bmm(kernels[None], mask_feats.reshape(1, e, h * w)).view(1, -1, h, w)  # (1, K, h, w)
    return resize_bilinear(m, scale_factor=float(upsample))[0]


def select_instances(logits: Tensor, objectness: Tensor, kernels: Tensor | None,
                     mask_feats: Tensor | None, cfg: InferenceConfig, upsample: int = 2,
                     cut: float | None = None, count=count_kept,
                     mask_logits: Tensor | None = None) -> dict[str, Tensor]:
    """THE decode of a batch, the work sized by what is kept (eager code and the export graph).

    logits (B, N, C), objectness (B, N, 1), kernels (B, N, E), mask_feats M (B, E, h, w);
    mask_logits (B, N, h, w): every query's kernels . M when already made (then kernels and M
    are not read). cut: the final-score cut (`--conf`); None keeps every candidate.
    1. candidates (`candidate_scores`: a query with its best class, or with cfg.multi_label
       every (query, class) pair), pre-score s; K1 = the most candidates with s > t, t =
       max(score_threshold, cut), of any image: only those K1 (in query order, so that equal
       scores rank as the query order) get mask logits, upsampled x `upsample`, sigmoid (with
       multi_label every query's mask once, shared by its candidates: work and memory as N);
    2. final = s * maskness (< 0 for another image's candidate, batch > 1), sorted; K = the most
       finals > cut (without cut: the image's candidates) of any image, at most max_detections.
    `count(passed, upper)` makes K1 and K (static exports: `upper`). Final <= s, so a query with
    s <= cut is never kept (`conf_config`). Returns, best first: scores (B, K) (0 = an empty slot
    of an image with fewer than K), labels (B, K), index (B, K) the query, keep (B, K) bool and
    mask_prob (B, K, upsample*h, upsample*w)."""
    threshold = cfg.score_threshold if cut is None else max(cfg.score_threshold, cut)
    pre, labels, per_query = candidate_scores(logits, objectness, cfg.multi_label)  # (B, N*L) each
    pre, order = pre.sort(dim=1, descending=True)  # (B, N*L)
    k1 = count(pre > threshold, pre.shape[1])
    order, by_query = order[:, :k1].sort(dim=1)  # (B, K1) the candidates, in query order
    pre = pre[:, :k1].gather(1, by_query)  # (B, K1)
    if per_query == 1:  # a mask per candidate: the candidates are K1 distinct queries
        query, rows, row_of = order, order, None  # (B, K1)
    else:  # several candidates share a query's mask: every query's mask once, (B, N)
        query = order // per_query  # (B, K1) each candidate's query
        rows = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
        row_of = query
    if mask_logits is None:  # kernels . M of the rows only
        b, e, h, w = mask_feats.shape
        m = torch.bmm(gather_queries(kernels, rows), mask_feats.flatten(2)).view(b, -1, h, w)
    else:
        m = gather_queries(mask_logits, rows)  # (B, R, h, w)
    prob = (m if upsample == 1 else resize_bilinear(m, scale_factor=float(upsample))).sigmoid()
    quality = maskness(prob, cfg.mask_threshold)  # (B, R)
    quality = quality if row_of is None else quality.gather(1, row_of)  # (B, K1)
    final = torch.where(pre > threshold, pre * quality, torch.full_like(pre, -1.0))  # (B, K1)
    final, rank = final.sort(dim=1, descending=True)  # (B, K1)
    passed = final > (-1.0 if cut is None else cut)
    k = count(passed, min(cfg.max_detections, k1))
    final, rank, keep = final[:, :k], rank[:, :k], passed[:, :k]  # (B, K)
    candidate = order.gather(1, rank)  # (B, K)
    kept_rows = rank if row_of is None else row_of.gather(1, rank)  # (B, K)
    return {"scores": torch.where(keep, final, torch.zeros_like(final)),
            "labels": labels.gather(1, candidate), "index": query.gather(1, rank), "keep": keep,
            "mask_prob": gather_queries(prob, kept_rows)}


def candidate_scores(logits: Tensor, objectness: Tensor, multi_label: bool = False
                     ) -> tuple[Tensor, Tensor, int]:
    """(B, N, C), (B, N, 1) -> the candidates' scores (B, N*L), labels (B, N*L) and L, the
    candidates per query: one per query (its best class, L = 1), or with `multi_label` one per
    (query, class) pair, candidate q*C + c (L = C)."""
    if not multi_label:
        score, label = query_scores(logits, objectness)
        return score, label, 1
    b, n, c = logits.shape
    labels = torch.arange(c, device=logits.device).repeat(b, n)  # (B, N*C)
    return class_scores(logits, objectness).flatten(1), labels, c


def maskness(mask_prob: Tensor, threshold: float) -> Tensor:
    """Mean foreground probability inside the binarised mask: (..., H, W) -> (...)."""
    fg = (mask_prob > threshold).to(mask_prob.dtype)
    return (mask_prob * fg).flatten(-2).sum(-1) / (fg.flatten(-2).sum(-1) + 1e-6)


def upsample_masks(mask_prob: Tensor, padded_size: tuple[int, int], image_size: tuple[int, int],
                   orig_size: tuple[int, int]) -> Tensor:
    """(K, h4, w4) probabilities -> (K, H0, W0): to the padded input, crop the image, to the original.
    The last resize is skipped when the image was not resized: bilinear to the same size is the
    identity (weights exactly 1 and 0), so the result is bit-identical and ~40% cheaper (tested)."""
    if len(mask_prob) == 0:  # F.interpolate rejects an empty channel dimension
        return mask_prob.new_zeros((0, *orig_size))
    m = F.interpolate(mask_prob[None], size=padded_size, mode="bilinear", align_corners=False)
    m = m[:, :, : image_size[0], : image_size[1]]
    if tuple(orig_size) != tuple(m.shape[-2:]):
        m = F.interpolate(m, size=orig_size, mode="bilinear", align_corners=False)
    return m[0]


def _linear_taps(in_size: int, out_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """PyTorch's bilinear taps (align_corners=False) along one axis, in its float32 arithmetic:
    output index o reads i0[o] and i1[o] with weights 1 - l1[o] and l1[o] (out_size,) each."""
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    src = ((torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    return i0, i1, (src - i0).clamp(0, 1)


def _composed_taps(n4: int, padded: int, size: int, orig: int) -> tuple[Tensor, Tensor]:
    """One axis of `upsample_masks` (1/4 -> padded, crop to `size`, -> orig) as ONE filter of 3
    taps: output o = sum_s w[o, s] * x[base[o] + s]. Two bilinear stages of 2 taps each compose
    to 3 adjacent taps because the first stage upsamples (its i0 grows by <= 1 per step).
    Returns base (orig,) int64 and w (orig, 3) float32."""
    a0, a1, la = _linear_taps(n4, padded)  # 1/4 -> padded, only [0, size) is used
    b0, b1, lb = _linear_taps(size, orig)  # size -> orig
    base = a0[b0]  # (orig,)
    idx = torch.stack([a0[b0], a1[b0], a0[b1], a1[b1]], 1) - base[:, None]  # (orig, 4) in 0..2
    val = torch.stack([(1 - lb) * (1 - la[b0]), (1 - lb) * la[b0], lb * (1 - la[b1]), lb * la[b1]], 1)
    w = torch.zeros(orig, 3).scatter_add_(1, idx, val)
    return base, w


BOX_BAND_BYTES = 16 << 20  # float32 of one band of an instance's box in `binary_masks`


def binary_masks(mask_prob: Tensor, padded_size: tuple[int, int], image_size: tuple[int, int],
                 orig_size: tuple[int, int], threshold: float) -> Tensor:
    """(K, h4, w4) probabilities -> (K, H0, W0) bool masks: `upsample_masks` > threshold, computed
    only where a mask can be, inside each instance's box.

    A bilinear value is a convex combination of its taps, so an output pixel whose taps all miss
    the instance's pixels > threshold at 1/4 is <= threshold: False, not computed. Inside the box
    both resizes run as one linear map per axis (`_composed_taps`, as small dense matrices: two
    matmuls per instance), the same map as the two `F.interpolate` calls, rounded differently:
    masks equal to `upsample_masks` > threshold but for pixels within rounding of the threshold
    (tests/test_postprocess_masks.py; none differed there). Work and float memory grow with the
    instances' boxes, not with K x H0 x W0, and a box is computed in bands of rows of at most
    `BOX_BAND_BYTES` of floats (a mask covering a 6000 x 6000 photo: 16 MiB, not 144); the
    matmuls use torch's threads."""
    k, h4, w4 = mask_prob.shape
    h0, w0 = orig_size
    out = torch.zeros((k, h0, w0), dtype=torch.bool, device=mask_prob.device)
    if k == 0:
        return out
    by, wy = _composed_taps(h4, padded_size[0], image_size[0], h0)  # (H0,), (H0, 3)
    bx, wx = _composed_taps(w4, padded_size[1], image_size[1], w0)  # (W0,), (W0, 3)
    my, mx = _dense(by, wy, h4).to(mask_prob), _dense(bx, wx, w4).to(mask_prob)  # (H0, h4), (W0, w4)
    rows, cols = mask_prob.amax(2) > threshold, mask_prob.amax(1) > threshold  # (K, h4), (K, w4)
    ys, xs = _spans(by, rows.cpu()), _spans(bx, cols.cpu())  # the boxes, [start, end) each
    byl, bxl = by.tolist(), bx.tolist()
    for i, ((y0, y1), (x0, x1)) in enumerate(zip(ys, xs)):
        if y1 <= y0 or x1 <= x0:
            continue
        c0, c1 = bxl[x0], min(bxl[x1 - 1] + 3, w4)
        fx = mx[x0:x1, c0:c1].T  # (c1 - c0, x1 - x0)
        step = max(1, BOX_BAND_BYTES // (4 * (x1 - x0)))  # rows of float32 box per band
        for ya in range(y0, y1, step):  # the box in bands of rows: a whole-photo mask is not one array
            yb = min(ya + step, y1)
            a0, a1 = byl[ya], min(byl[yb - 1] + 3, h4)
            fy, part = my[ya:yb, a0:a1], mask_prob[i, a0:a1, c0:c1]
            # (yb - ya, x1 - x0), the two products in their cheaper order
            band = (fy @ part) @ fx if yb - ya >= x1 - x0 else fy @ (part @ fx)
            out[i, ya:yb, x0:x1] = band > threshold
    return out


def _spans(base: Tensor, hit: Tensor) -> list[tuple[int, int]]:
    """hit (K, n4) bool at 1/4 -> per instance the output range [start, end) whose 3 taps
    (base .. base + 2, base nondecreasing) meet its first..last hit; empty when it has none."""
    n = hit.shape[1]
    idx = torch.arange(n)
    first = torch.where(hit, idx, n).min(1).values
    last = torch.where(hit, idx, -1).max(1).values
    start = torch.searchsorted(base, (first - 2).contiguous(), side="left")
    end = torch.searchsorted(base, last.contiguous(), side="right")
    end = torch.where(last < 0, start, end)
    return list(zip(start.tolist(), end.tolist()))


def _dense(base: Tensor, w: Tensor, n4: int) -> Tensor:
    """base (orig,), w (orig, 3) of `_composed_taps` -> the same filter as a dense (orig, n4) matrix."""
    idx = (base[:, None] + torch.arange(3)).clamp(max=n4 - 1)
    return torch.zeros(len(base), n4).scatter_add_(1, idx, w)


def postprocess_image(logits: Tensor, objectness: Tensor, mask_logits: Tensor,
                      padded_size: tuple[int, int], image_size: tuple[int, int],
                      orig_size: tuple[int, int], cfg: InferenceConfig = InferenceConfig()
                      ) -> dict[str, Tensor]:
    """One image's raw outputs with every query's mask -> instances sorted by score.

    logits (N, C), objectness (N, 1), mask_logits (N, h4, w4) at 1/4 of padded_size;
    image_size = the resized image inside the padding, orig_size = the original image.
    Returns labels (K,) int64, scores (K,) float, masks (K, H0, W0) bool.
    """
    picked = select_instances(logits[None].float(), objectness[None].float(), None, None, cfg, 1,
                              cfg.conf, mask_logits=mask_logits[None].float())
    return _image_instances(picked, padded_size, image_size, orig_size, cfg.mask_threshold)


def decode_instances(logits: Tensor, objectness: Tensor, kernels: Tensor, mask_feats: Tensor,
                     padded_size: tuple[int, int], image_size: tuple[int, int],
                     orig_size: tuple[int, int], cfg: InferenceConfig = InferenceConfig(),
                     mask_upsample: int = 2) -> dict[str, Tensor]:
    """THE decode step, from one image's raw outputs to its instances; evaluation in training,
    `predict` and `val` on every backend, and the tracker's drawing all go through here.

    logits (N, C), objectness (N, 1), kernels (N, E), mask_feats M (E, h, w) at 1/8 of
    padded_size: the raw graph's outputs (`MobileInst.inference_outputs`). `select_instances`
    (only the candidates get a mask) on this one image, with cfg.conf as the final-score cut,
    then `binary_masks` at the original size.
    Returns labels (K,) int64, scores (K,) float, masks (K, H0, W0) bool."""
    picked = decode_selected(logits, objectness, kernels, mask_feats, cfg, mask_upsample)
    masks = binary_masks(picked.pop("mask_prob"), padded_size, image_size, orig_size,
                         cfg.mask_threshold)
    return {**picked, "masks": masks}


def decode_selected(logits: Tensor, objectness: Tensor, kernels: Tensor, mask_feats: Tensor,
                    cfg: InferenceConfig = InferenceConfig(), mask_upsample: int = 2
                    ) -> dict[str, Tensor]:
    """`decode_instances` before its last step: labels (K,), scores (K,) and mask_prob
    (K, h4, w4), the probabilities `binary_masks` turns into the full-size masks. For callers
    that make those masks a few at a time (`val` on huge photos: `infer.results.MaskChunks`);
    `binary_masks` treats each instance on its own, so the masks are the same."""
    picked = select_instances(logits[None].float(), objectness[None].float(), kernels[None].float(),
                              mask_feats[None].float(), cfg, mask_upsample, cfg.conf)
    return {"labels": picked["labels"][0], "scores": picked["scores"][0],
            "mask_prob": picked["mask_prob"][0]}


def _image_instances(picked: dict[str, Tensor], padded_size: tuple[int, int],
                     image_size: tuple[int, int], orig_size: tuple[int, int],
                     threshold: float) -> dict[str, Tensor]:
    """`select_instances` of one image -> labels (K,), scores (K,), masks (K, H0, W0) bool."""
    masks = binary_masks(picked["mask_prob"][0], padded_size, image_size, orig_size, threshold)
    return {"labels": picked["labels"][0], "scores": picked["scores"][0], "masks": masks}
