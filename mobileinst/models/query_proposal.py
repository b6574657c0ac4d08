"""Image-conditioned queries: FastInst's instance-activation-guided query proposal.

Source: junjiehe96/FastInst, `fastinst/modeling/transformer_decoder/utils.py` (`QueryProposal`) and
`fastinst_decoder.py` (`FastInstDecoder.forward`); paper: He et al., "FastInst: A Simple Query-Based
Model for Real-Time Instance Segmentation", CVPR 2023, §3.2 (100 proposed + 8 learned queries).

A per-pixel class head (3x3 conv + ReLU + 1x1 conv, as upstream) on a token map x (B, D, h, w)
gives class logits; each pixel's score is its best class probability. Pixels that are a local
maximum of their own best class (3x3 window, upstream's `seek_local_maximum`) rank before every
other pixel, so one large object yields one peak and does not take every query; the rest rank by
score (upstream adds 1 to the peaks' probabilities: the same order). The N best pixels become the
queries: their features (then a Linear) and the sine position of their cell.

Differences from upstream, each for this project:
- sigmoid per class instead of a softmax over C + 1 (this project's class heads are sigmoid, focal);
- the ranking key is an int64 that is unique per pixel, so the selection does not depend on how a
  runtime's TopK breaks ties: ties (constant or saturated maps, padded borders) go to the lower
  raster index (top-left first), in PyTorch and in every exported graph alike;
- fewer pixels than queries (h * w < N, e.g. a 4x4 map at stride 64 of a 256 px input) is allowed:
  the surplus slots are "padding" (query_valid False); they take the caller's learned fallback
  queries when given, else repeat the best pixel.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .ops import sine_position_encoding

SCORE_BITS = 24  # scores in [0, 1] are ranked at 2^-24, float32's spacing in [0.5, 1)
INDEX_BITS = 24  # flat pixel index < 2^24 (h * w up to 16.7M cells)
PEAK_MIN_SCORE = 1e-6  # upstream `seek_local_maximum(epsilon=1e-6)`: a peak must score >= this
PRIOR_PROB = 0.01  # focal prior on the class bias, as this project's class head (instance_decoder)


def local_peaks(probs: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pixel best-class score and peak flag: probs (B, C, h, w) -> (B, h, w) float, (B, h, w) bool.

    A pixel is a peak when its score is the maximum of its best class's channel over its 3x3
    window, each pixel contributing only to its own best class (upstream's one-hot masking), so
    touching objects of different classes keep a peak each. Plateaus count as peaks (>=, as upstream)."""
    score, best = probs.max(1)  # (B, h, w), (B, h, w)
    classes = torch.arange(probs.shape[1], device=probs.device)
    onehot = (best.unsqueeze(1) == classes.view(1, -1, 1, 1)).to(probs.dtype)  # (B, C, h, w)
    pooled = F.max_pool2d(probs * onehot, 3, stride=1, padding=1)  # (B, C, h, w)
    window_max = (pooled * onehot).sum(1)  # (B, h, w): the max of the pixel's own class channel
    return score, (score >= window_max) & (score >= PEAK_MIN_SCORE)


def ranking_key(score: Tensor, peak: Tensor) -> Tensor:
    """Unique int64 key per pixel, larger = better: (peak, score, lower raster index) in that order.

    score, peak (B, h, w) -> (B, h*w). Scores are quantised to 2^-24 in float32 (exact: a power-of-two
    scale and a floor), so distinct scores in [0.5, 1] keep their order and lower ones closer
    than 6e-8 count as equal; equal ones go to the lower index. Key < 2^50."""
    q = torch.floor(score.flatten(1).float().clamp(0, 1) * float(1 << SCORE_BITS)).long()  # (B, P)
    q = q + peak.flatten(1).long() * ((1 << SCORE_BITS) + 1)  # every peak above every non-peak
    index = torch.arange(q.shape[1], device=q.device).unsqueeze(0)  # (1, P)
    return q * (1 << INDEX_BITS) + ((1 << INDEX_BITS) - 1 - index)


def select_top(key: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest keys of (B, P) -> flat indices (B, k) int64 and valid (B, k) bool.

    When P < k the last k - P slots are padding (valid False) and point to the best pixel, so a
    gather with them stays in range. The k candidates appended below every real key make topk
    legal for any P >= 1 without a data-dependent k."""
    b, p = key.shape
    filler = -1 - torch.arange(k, device=key.device, dtype=key.dtype)  # (k,) below every key >= 0
    cand = torch.cat((key, filler.unsqueeze(0).expand(b, -1)), dim=1)  # (B, P + k)
    index = torch.topk(cand, k, dim=1).indices  # (B, k), best first
    valid = index < p  # fillers have index >= P
    return torch.where(valid, index, index[:, :1]), valid


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """tokens (B or 1, P, D), index (B, k) -> (B, k, D)."""
    tokens = tokens.expand(index.shape[0], -1, -1)
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class QueryProposal(nn.Module):
    """Token map x (B, D, h, w) -> N image-conditioned queries (FastInst `QueryProposal`).

    forward(x, fallback_feat=None, fallback_pos=None) returns a dict:
      query_feat      (B, N, D)  features of the chosen pixels, through a Linear (padding slots:
                                 fallback_feat when given)
      query_pos       (B, N, D)  sine position of the chosen cells (`sine_position_encoding` of x,
                                 the encoding of the decoder's memory tokens; padding: fallback_pos)
      query_index     (B, N)     int64 flat index into h*w, best first (padding: the best pixel)
      query_valid     (B, N)     bool, False for padding slots (h * w < N)
      proposal_logits (B, C, h, w) per-pixel class logits (the proposal loss needs them)
    fallback_feat / fallback_pos: learned (N, D) embeddings for padding slots, e.g. the decoder's
    own `query_feat.weight` / `query_pos.weight`."""

    def __init__(self, dim: int, num_queries: int, num_classes: int) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.cls_head = nn.Sequential(  # upstream `conv_proposal_cls_logits`, sigmoid here
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, num_classes, 1),
        )
        self.feat_proj = nn.Linear(dim, dim)
        nn.init.constant_(self.cls_head[-1].bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))

    def forward(self, x: Tensor, fallback_feat: Tensor | None = None,
                fallback_pos: Tensor | None = None) -> dict[str, Tensor]:
        logits = self.cls_head(x)  # (B, C, h, w)
        with torch.no_grad():  # the selection is not differentiable; the head learns from its loss
            score, peak = local_peaks(logits.float().sigmoid())  # (B, h, w), (B, h, w)
            index, valid = select_top(ranking_key(score, peak), self.num_queries)  # (B, N), (B, N)
        feat = self.feat_proj(gather_tokens(x.flatten(2).transpose(1, 2), index))  # (B, N, D)
        pos = gather_tokens(sine_position_encoding(x, x.shape[1]), index)  # (B, N, D)
        if fallback_feat is not None:
            feat = torch.where(valid.unsqueeze(-1), feat, fallback_feat.to(feat.dtype).unsqueeze(0))
        if fallback_pos is not None:
            pos = torch.where(valid.unsqueeze(-1), pos, fallback_pos.to(pos.dtype).unsqueeze(0))
        return {"query_feat": feat, "query_pos": pos, "query_index": index, "query_valid": valid,
                "proposal_logits": logits}
