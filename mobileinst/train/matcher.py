"""Bipartite matching of predicted instances to ground truth (SparseInst's matcher).

Source: /shared/spec/training.md §1 (hustvl/SparseInst `loss.py` SparseInstMatcher): the score of
pairing query i with target j is dice(i, j)^alpha * prob_i(class_j)^beta with alpha = 0.8,
beta = 0.2, computed in fp32, maximised with scipy's Hungarian solver per image.
"""
from __future__ import annotations

import logging

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

log = logging.getLogger("mobileinst.train")


def dice_score(inputs: Tensor, targets: Tensor) -> Tensor:
    """Pairwise dice: inputs (N, P) probabilities, targets (M, P) soft masks -> (N, M).

    2 * sum(p * t) / (sum(p^2) + sum(t^2) + 1e-4), squared terms in the denominator (SparseInst)."""
    numerator = 2 * inputs @ targets.t()  # (N, M)
    denominator = (inputs * inputs).sum(-1)[:, None] + (targets * targets).sum(-1)[None, :]
    return numerator / (denominator + 1e-4)


class HungarianMatcher:
    def __init__(self, alpha: float = 0.8, beta: float = 0.2) -> None:
        self.alpha, self.beta = alpha, beta
        self._warned = False

    @torch.no_grad()
    def __call__(self, outputs: dict[str, Tensor], targets: list[dict],
                 target_masks: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Per image (query indices, target indices), both int64.

        outputs: pred_logits (B, N, C), pred_masks (B, N, Hm, Wm) logits;
        targets[b]["labels"] (M_b,); target_masks[b] (M_b, Hm, Wm) soft, already at mask size."""
        with torch.autocast(outputs["pred_logits"].device.type, enabled=False):
            probs = outputs["pred_logits"].float().sigmoid()  # (B, N, C)
            masks = outputs["pred_masks"].float().sigmoid().flatten(2)  # (B, N, P)
            return [self._match_one(probs[b], masks[b], targets[b]["labels"], target_masks[b])
                    for b in range(len(targets))]

    def _match_one(self, prob: Tensor, mask: Tensor, labels: Tensor, tgt: Tensor
                   ) -> tuple[Tensor, Tensor]:
        empty = torch.empty(0, dtype=torch.int64)
        if len(labels) == 0:
            return empty, empty
        dice = dice_score(mask, tgt.flatten(1).float())  # (N, M)
        score = dice.clamp(min=0) ** self.alpha * prob[:, labels] ** self.beta  # (N, M)
        if not torch.isfinite(score).all():
            if not self._warned:
                log.warning("matcher: non-finite matching cost (NaN/inf predictions); "
                            "treating those pairs as the worst match")
                self._warned = True
            score = torch.nan_to_num(score, nan=-1.0, posinf=-1.0, neginf=-1.0)
        rows, cols = linear_sum_assignment(score.cpu().numpy(), maximize=True)
        return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)
