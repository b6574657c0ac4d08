"""Bipartite matching of predicted instances to ground truth (SparseInst's matcher).

Source: spec training.md §1 and §9.2 (hustvl/SparseInst `loss.py` SparseInstMatcher, `config.py` L57-59).
The score of pairing query i with target j is

    S(i, j) = dice(sigmoid(mask_i), t_j) ** alpha * sigmoid(logit_i)[label_j] ** beta,  alpha 0.8, beta 0.2

computed in fp32 with autocast off and maximised per image with scipy's Hungarian solver.
(The paper writes it p^(1-a) * Dice^a with a = 0.8: the same cost.)

Ground-truth masks are prepared once per batch by `prepare_target_masks` (spec §1, §9.1): zero-padded
bottom/right to the padded input, bilinearly resized to the prediction size (1/4), kept soft. The
criterion prepares them and hands them to the matcher, so the work is done once per iteration.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .proposal_loss import constrain_scores, location_mask

log = logging.getLogger("mobileinst.train")

MASK_STRIDE = 4  # pred_masks are at 1/4 of the padded input (spec training.md §0)
BAD_SCORE = -1e4  # stands in for NaN/inf matching scores; valid scores lie in [0, 1]


def prepare_target_masks(targets: list[dict], mask_size: tuple[int, int], stride: int = MASK_STRIDE,
                         device: torch.device | str | None = None) -> list[Tensor]:
    """Each image's GT masks (M, H, W) -> (M, Hm, Wm) fp32 soft masks on the prediction grid.

    Zero-pad bottom/right to the padded input (Hp, Wp) = stride * (Hm, Wm), then bilinear
    (align_corners=False) to (Hm, Wm); not re-binarised (SparseInst `loss.py` L124-139)."""
    hm, wm = mask_size
    hp, wp = hm * stride, wm * stride  # the padded input size
    out = []
    for b, t in enumerate(targets):
        m = torch.as_tensor(t["masks"], device=device).float()  # (M, H, W), uint8/bool -> {0, 1}
        if m.ndim != 3 or m.shape[-2] > hp or m.shape[-1] > wp:
            raise ValueError(f"targets[{b}]['masks'] has shape {tuple(m.shape)}; expected (M, H, W) with "
                             f"H <= {hp} and W <= {wp} (the padded input, {stride} x pred_masks' size)")
        if m.shape[0] == 0:
            out.append(m.new_zeros((0, hm, wm)))
            continue
        m = F.pad(m, (0, wp - m.shape[-1], 0, hp - m.shape[-2]))  # (M, Hp, Wp)
        out.append(F.interpolate(m[None], size=(hm, wm), mode="bilinear", align_corners=False)[0])
    return out


def dice_score(inputs: Tensor, targets: Tensor) -> Tensor:
    """Pairwise dice score: inputs (N, P) probabilities, targets (M, P) soft masks -> (N, M).

    2 * sum(p * t) / (sum(p^2) + sum(t^2) + 1e-4): squared terms in the denominator (SparseInst L31-37)."""
    numerator = 2 * inputs @ targets.t()  # (N, M)
    denominator = (inputs * inputs).sum(-1)[:, None] + (targets * targets).sum(-1)[None, :]  # (N, M)
    return numerator / (denominator + 1e-4)


class HungarianMatcher:
    """One-to-one assignment of the N queries to the M targets of each image (min(N, M) pairs)."""

    def __init__(self, alpha: float = 0.8, beta: float = 0.2) -> None:
        self.alpha, self.beta = alpha, beta  # spec training.md §1: dice^0.8 * prob^0.2
        self._warned = False

    @torch.no_grad()
    def __call__(self, outputs: dict[str, Tensor], targets: list[dict],
                 target_masks: list[Tensor] | None = None) -> list[tuple[Tensor, Tensor]]:
        """Per image (query indices, target indices), both int64 on the CPU, empty for 0 targets.

        outputs: pred_logits (B, N, C), pred_masks (B, N, Hm, Wm) logits;
        targets[b]["labels"]: (M_b,) int64; target_masks[b]: (M_b, Hm, Wm) soft masks as made by
        `prepare_target_masks` (prepared here when not given)."""
        logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
        if target_masks is None:
            target_masks = prepare_target_masks(targets, tuple(pred_masks.shape[-2:]), device=pred_masks.device)
        inside = [None] * len(targets)
        if "query_index" in outputs:  # proposed queries: only objects containing their location
            inside = location_mask(outputs["query_index"], outputs["proposal_size"], target_masks,
                                   outputs["query_valid"])
        with torch.autocast(logits.device.type, enabled=False):
            probs = logits.float().sigmoid()  # (B, N, C)
            masks = pred_masks.float().sigmoid().flatten(2)  # (B, N, P)
            return [self.match_one(probs[b], masks[b], targets[b]["labels"], target_masks[b], inside[b])
                    for b in range(len(targets))]

    def match_one(self, prob: Tensor, mask: Tensor, labels: Tensor, tgt: Tensor,
                  inside: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """prob (N, C), mask (N, P) probabilities; labels (M,), tgt (M, Hm, Wm) -> (rows, cols) int64.
        inside (N, M) bool: query i may match target j only if true, unless the assignment
        cannot avoid it (`proposal_loss.constrain_scores`)."""
        if len(labels) == 0:
            return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
        dice = dice_score(mask, tgt.to(mask).flatten(1))  # (N, M)
        cls = prob[:, torch.as_tensor(labels, device=prob.device)]  # (N, M)
        score = dice.clamp(min=0) ** self.alpha * cls ** self.beta  # (N, M), in [0, 1]
        if not torch.isfinite(score).all():  # scipy refuses NaN/inf (SparseInst#84 crashed here)
            if not self._warned:
                log.warning("matcher: non-finite matching score (NaN/inf in the predictions); "
                            "those pairs are treated as the worst possible match")
                self._warned = True
            score = torch.nan_to_num(score, nan=BAD_SCORE, posinf=BAD_SCORE, neginf=BAD_SCORE)
        if inside is not None:
            score = constrain_scores(score, inside.to(score.device))
        rows, cols = linear_sum_assignment(score.cpu().numpy(), maximize=True)
        return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)
