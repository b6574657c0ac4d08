"""Training side of the image-conditioned queries (`models.query_proposal`): location constraint
for the matcher and the proposal loss of the per-pixel class head.

Source: junjiehe96/FastInst.
- `fastinst/modeling/matcher.py` `memory_efficient_forward`: cost_location = 1e3 (config
  `LOCATION_WEIGHT`) times -[the query's location lies in GT j's mask]: a query may only match an
  object that contains its location, unless no assignment can avoid it (the cost is finite);
- `memory_efficient_forward_for_proposal`: every pixel of the proposal map is matched to the GTs
  one to one with cost 2.0 (`CLASS_WEIGHT`) * -p(pixel, class_j) + 1e3 * -[pixel inside GT j],
  "inside" = the GT mask average-pooled to the proposal map is > 0 (the cell touches the object);
- `fastinst/modeling/criterion.py` `loss_proposals`: cross-entropy over C + 1 classes of every
  pixel of the map, the matched pixels' target being their GT's class and all others background,
  mean over the pixels; weight 20 (`fastinst/config.py` `PROPOSAL_WEIGHT = 20.0`).

Here the head is sigmoid (no background channel), so the loss is the per-pixel binary
cross-entropy summed over the C classes and averaged over the B * h * w pixels: its gradient on a
matched pixel's own class logit, 20 * (p - 1) / (B h w), is the one upstream's softmax CE gives.
A query's location is its cell of the proposal map (upstream's main matcher point-samples the
GT at the cell corner given by linspace(0, 1, h); the cell occupancy of its proposal matcher is
used here for both, so both matchings agree on what "inside" means).

GT masks come as `matcher.prepare_target_masks` makes them: soft (M, Hm, Wm) at stride 4 of the
padded input, zero-padded bottom/right.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

PROPOSAL_WEIGHT = 20.0  # FastInst `config.py` PROPOSAL_WEIGHT


def cell_scale(map_size: tuple[int, int], mask_size: tuple[int, int]) -> int:
    """Mask-grid cells per proposal-map cell: the smallest power of two r with (h r, w r) covering
    (Hm, Wm). Exact for maps made by stride-2 stages (ceil sizes), e.g. r = 4 for a stride-16
    map and r = 16 for a stride-64 map over stride-4 masks."""
    h, w = map_size
    hm, wm = mask_size
    r = 1
    while h * r < hm or w * r < wm:
        r *= 2
    return r


def cell_occupancy(target_masks: Tensor, map_size: tuple[int, int], scale: int | None = None) -> Tensor:
    """(M, Hm, Wm) soft masks -> (M, h * w) bool: does GT j touch cell p of the proposal map.

    Cell (i, k) covers the mask-grid rows [i r, (i + 1) r) and columns [k r, (k + 1) r); upstream's
    adaptive_avg_pool2d(mask) > 0 (any overlap), as a max-pool with ceil_mode (same for masks >= 0)."""
    h, w = map_size
    m = target_masks.shape[0]
    if m == 0:
        return torch.zeros((0, h * w), dtype=torch.bool, device=target_masks.device)
    r = scale or cell_scale(map_size, tuple(target_masks.shape[-2:]))
    occ = F.max_pool2d(target_masks.float()[None], r, stride=r, ceil_mode=True)[0] > 0  # (M, h', w')
    occ = occ[:, :h, :w]  # a mask grid larger than the map: crop (cannot happen with ceil sizes)
    occ = F.pad(occ, (0, w - occ.shape[-1], 0, h - occ.shape[-2]))  # smaller: the rest is padding
    return occ.flatten(1)  # (M, h*w)


def location_mask(query_index: Tensor, map_size: tuple[int, int], target_masks: list[Tensor],
                  query_valid: Tensor | None = None, scale: int | None = None) -> list[Tensor]:
    """Per image (N, M) bool: query i's cell lies inside GT j's mask.

    query_index (B, N) int64 flat indices into h*w (`QueryProposal`'s query_index); map_size (h, w);
    target_masks[b] (M_b, Hm, Wm) soft masks. Queries without a location (query_valid False,
    padding slots or learned queries) are inside every GT: the constraint does not apply to them."""
    out = []
    for b, tgt in enumerate(target_masks):
        occ = cell_occupancy(tgt.to(query_index.device), map_size, scale)  # (M, h*w)
        inside = occ[:, query_index[b]].t()  # (N, M)
        if query_valid is not None:
            inside = inside | ~query_valid[b].to(inside.device).unsqueeze(1)
        out.append(inside)
    return out


def constrain_scores(score: Tensor, inside: Tensor) -> Tensor:
    """Matching score (N, M) in [0, 1] (maximised) -> the score with FastInst's location cost.

    Allowed pairs (inside) gain min(N, M) + 1, more than any sum of scores of one assignment, so
    the Hungarian solver first maximises the number of allowed pairs, then the score among those
    assignments; forbidden pairs stay finite, so every GT is still matched when no query lies in
    it (upstream: cost 1e3 * -inside)."""
    bonus = float(min(score.shape) + 1)
    return score + bonus * inside.to(score.dtype)


@torch.no_grad()
def match_proposals(probs: Tensor, labels: Tensor, occupancy: Tensor) -> tuple[Tensor, Tensor]:
    """One image: pixel probs (C, P), labels (M,), occupancy (M, P) bool -> (pixels, gts) int64.

    Upstream's proposal matcher: each GT gets one pixel, the most probable for its class among
    the pixels it touches (one pixel per GT), any pixel when it touches none."""
    if len(labels) == 0:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    score = probs[labels.to(probs.device)].t()  # (P, M)
    score = constrain_scores(score, occupancy.t().to(score.device))  # (P, M)
    rows, cols = linear_sum_assignment(score.double().cpu().numpy(), maximize=True)
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def proposal_targets(proposal_logits: Tensor, targets: list[dict], target_masks: list[Tensor],
                     scale: int | None = None) -> Tensor:
    """The one-hot targets (B, C, h, w) of the per-pixel class head: each GT's matched pixel is 1
    at the GT's class, every other entry 0 (background)."""
    b, c, h, w = proposal_logits.shape
    probs = proposal_logits.detach().float().sigmoid().flatten(2)  # (B, C, P)
    onehot = torch.zeros_like(probs)  # (B, C, P)
    for i in range(b):
        labels = torch.as_tensor(targets[i]["labels"], dtype=torch.int64, device=probs.device)
        occ = cell_occupancy(target_masks[i].to(probs.device), (h, w), scale)  # (M, P)
        pix, gt = match_proposals(probs[i], labels, occ)
        onehot[i, labels[gt.to(probs.device)], pix.to(probs.device)] = 1.0
    return onehot.view(b, c, h, w)


def proposal_loss(proposal_logits: Tensor, targets: list[dict], target_masks: list[Tensor],
                  weight: float = PROPOSAL_WEIGHT, scale: int | None = None) -> Tensor:
    """Weighted proposal loss: weight * mean over the B*h*w pixels of the BCE summed over C.

    proposal_logits (B, C, h, w) (`QueryProposal`'s output); targets[b]["labels"] (M_b,) int64;
    target_masks[b] (M_b, Hm, Wm) soft masks (`prepare_target_masks`). Images without GT push every
    pixel to background. fp32, autocast off."""
    with torch.autocast(proposal_logits.device.type, enabled=False):
        logits = proposal_logits.float()
        onehot = proposal_targets(logits, targets, target_masks, scale)
        bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")  # (B, C, h, w)
        return weight * bce.sum(1).mean()
