"""Training losses of MobileInst (SparseInst's criterion).

Source: /shared/spec/training.md §2 and §9 (hustvl/SparseInst `loss.py`):
  loss_cls  sigmoid focal loss (alpha 0.25, gamma 2) over all B*N queries x C classes, one-hot
            targets at the MATCHED query rows, summed / num_instances          weight 2.0
  loss_dice dice loss summed over matched pairs / num_instances                 weight 2.0
  loss_mask pixel BCE, mean over all matched pixels                            weight 5.0
  loss_obj  BCE of the objectness logit against the (detached) mask IoU of the
            matched pairs, mean over matched queries                           weight 1.0
num_instances = ground-truth instances in the batch, averaged over workers, at least 1.
Ground-truth masks are zero-padded to the padded input and bilinearly resized to the prediction
size (1/4), kept soft.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import dist
from .matcher import HungarianMatcher


def prepare_target_masks(targets: list[dict], mask_size: tuple[int, int], stride: int = 4
                         ) -> list[Tensor]:
    """Each image's masks (M, H, W) -> (M, Hm, Wm) soft masks on the padded-input grid."""
    hm, wm = mask_size
    hp, wp = hm * stride, wm * stride  # the padded input size
    out = []
    for t in targets:
        m = t["masks"].float()  # (M, H, W)
        if m.shape[0] == 0:
            out.append(m.new_zeros((0, hm, wm)))
            continue
        m = F.pad(m, (0, wp - m.shape[-1], 0, hp - m.shape[-2]))  # (M, Hp, Wp)
        out.append(F.interpolate(m[None], size=(hm, wm), mode="bilinear", align_corners=False)[0])
    return out


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0
                       ) -> Tensor:
    """Element-wise focal loss (RetinaNet), summed: FL = -alpha_t (1 - p_t)^gamma log(p_t)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * (1 - p_t) ** gamma * ce).sum()


def dice_loss(probs: Tensor, targets: Tensor) -> Tensor:
    """Sum over pairs of 1 - 2 sum(p t) / (sum(p^2) + sum(t^2) + 1e-4); probs, targets (K, P)."""
    numerator = 2 * (probs * targets).sum(-1)
    denominator = (probs * probs).sum(-1) + (targets * targets).sum(-1)
    return (1 - numerator / (denominator + 1e-4)).sum()


@torch.no_grad()
def mask_iou(probs: Tensor, targets: Tensor) -> Tensor:
    """IoU of predictions binarised at p >= 0.4 with targets binarised at > 0.5: (K, P) -> (K,)."""
    pred, tgt = (probs >= 0.4).float(), (targets > 0.5).float()
    inter = (pred * tgt).sum(-1)
    union = pred.sum(-1) + tgt.sum(-1) - inter
    return inter / (union + 1e-6)


class MobileInstCriterion(nn.Module):
    def __init__(self, matcher: HungarianMatcher | None = None, num_classes: int = 80,
                 weights: dict[str, float] | None = None) -> None:
        super().__init__()
        self.matcher = matcher or HungarianMatcher()
        self.num_classes = num_classes
        self.weights = {"loss_cls": 2.0, "loss_dice": 2.0, "loss_mask": 5.0, "loss_obj": 1.0,
                        **(weights or {})}

    def forward(self, outputs: dict[str, Tensor], targets: list[dict],
                num_instances: float | None = None) -> dict[str, Tensor]:
        logits = outputs["pred_logits"].float()  # (B, N, C)
        pred_masks = outputs["pred_masks"].float()  # (B, N, Hm, Wm)
        objectness = outputs["pred_scores"].float()  # (B, N, 1)
        tgt_masks = prepare_target_masks(targets, tuple(pred_masks.shape[-2:]))
        indices = self.matcher(outputs, targets, tgt_masks)
        if num_instances is None:
            num_instances = self.num_instances(targets, logits.device)

        losses = {"loss_cls": self.class_loss(logits, targets, indices) / num_instances}
        losses.update(self.mask_losses(pred_masks, objectness, tgt_masks, indices, num_instances))
        losses = {k: v * self.weights[k] for k, v in losses.items()}
        losses["loss"] = sum(losses.values())
        return losses

    @staticmethod
    def num_instances(targets: list[dict], device: torch.device) -> float:
        n = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        return max(dist.all_reduce_mean(n).item(), 1.0)

    @staticmethod
    def class_loss(logits: Tensor, targets: list[dict], indices: list[tuple[Tensor, Tensor]]
                   ) -> Tensor:
        """Focal loss; the one-hot target of GT j goes to the row of the query matched to j."""
        onehot = torch.zeros_like(logits)  # (B, N, C): unmatched queries are background
        for b, (q, j) in enumerate(indices):
            onehot[b, q.to(logits.device), targets[b]["labels"][j.to(logits.device)]] = 1.0
        return sigmoid_focal_loss(logits, onehot)

    @staticmethod
    def mask_losses(pred_masks: Tensor, objectness: Tensor, tgt_masks: list[Tensor],
                    indices: list[tuple[Tensor, Tensor]], num_instances: float) -> dict[str, Tensor]:
        dev = pred_masks.device
        src = [pred_masks[b, q.to(dev)] for b, (q, _) in enumerate(indices)]  # per image (K_b, Hm, Wm)
        tgt = [tgt_masks[b][j.to(dev)] for b, (_, j) in enumerate(indices)]
        obj = [objectness[b, q.to(dev), 0] for b, (q, _) in enumerate(indices)]
        src, tgt, obj = torch.cat(src).flatten(1), torch.cat(tgt).flatten(1), torch.cat(obj)
        if src.shape[0] == 0:  # no ground truth anywhere in the batch: keep the graph, add 0
            zero = pred_masks.sum() * 0.0 + objectness.sum() * 0.0
            return {"loss_dice": zero, "loss_mask": zero, "loss_obj": zero}
        probs = src.sigmoid()  # (K, P)
        return {
            "loss_dice": dice_loss(probs, tgt) / num_instances,
            "loss_mask": F.binary_cross_entropy_with_logits(src, tgt, reduction="mean"),
            "loss_obj": F.binary_cross_entropy_with_logits(obj, mask_iou(probs, tgt)),
        }
