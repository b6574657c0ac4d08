"""Training losses of MobileInst (SparseInst's criterion).

Source: spec training.md §2 and §9.3 (hustvl/SparseInst `loss.py` L51-203, weights `config.py` L49-53):
  loss_cls  sigmoid focal loss (alpha 0.25, gamma 2) over all B*N queries x C classes, one-hot
            targets at the MATCHED query rows (not in GT order), summed / num_instances  weight 2.0
  loss_dice dice loss summed over matched pairs / num_instances                           weight 2.0
  loss_mask pixel BCE-with-logits against the soft target, mean over all matched pixels    weight 5.0
  loss_obj  BCE-with-logits of the objectness of matched queries against the detached mask
            IoU (pred sigmoid >= 0.4, target > 0.5), mean over matched queries           weight 1.0
num_instances = GT instances in the batch, summed over workers / world size, at least 1 (DETR).
With deep supervision (ModelConfig.aux_loss) every entry of outputs["aux_outputs"] is matched and
scored the same way and its weighted sum is added as loss_aux (DETR's auxiliary decoding losses).
With query groups (ModelConfig.query_groups, Group DETR: Chen et al., ICCV 2023) every extra group
in outputs["group_outputs"] is matched one-to-one on its own and its whole loss (its own loss_aux
included) is added as loss_groups: one-to-many supervision in training, one-to-one at inference.
With proposed queries (ModelConfig.query_proposal) the per-pixel class head gets FastInst's
proposal loss (train/proposal_loss.py, weight 20) as loss_proposal, and the matcher keeps each
query to the objects that contain its location.
With `mask_loss_stride` 2 (or 1) the dice, pixel BCE and objectness of the matched pairs are computed
on their mask probabilities upsampled bilinearly (as inference upsamples them) to that stride,
against ground truth prepared at that stride: the masks are scored on a finer grid than they are
predicted on, the way they are evaluated. Matching stays on the stride-4 grid.
With `cls_loss="ia_bce"` the class loss is the IoU-aware BCE of LW-DETR / RF-DETR (roboflow/rf-detr
`lwdetr.py`, `ia_bce_loss`) in place of the focal loss: the matched (query, class) entry's target is
t = p^alpha * IoU^(1 - alpha) (alpha 0.25, IoU = the pair's mask IoU as for loss_obj, detached) as a soft
BCE target, every other entry a negative weighted by p^gamma: the class score learns to rank a
query by the quality of its mask as well as by its class.
Everything is computed in fp32 with autocast off. A batch without any GT gives mask terms
`pred.sum() * 0` (graph kept, gradient 0) while the focal loss still pushes every query to background.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import dist
from .config import CLASS_LOSSES, MASK_LOSS_STRIDES
from .matcher import MASK_STRIDE, HungarianMatcher, dice_score, prepare_target_masks
from .proposal_loss import proposal_loss

__all__ = ["MobileInstCriterion", "count_instances", "dice_loss", "dice_score", "mask_iou", "prepare_target_masks",
           "sigmoid_focal_loss"]

WEIGHTS = {"loss_cls": 2.0, "loss_dice": 2.0, "loss_mask": 5.0, "loss_obj": 1.0}  # spec training.md §2


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal loss (RetinaNet), summed over all elements: -alpha_t * (1 - p_t)^gamma * log(p_t)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # -log(p_t), stable
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * (1 - p_t) ** gamma * ce).sum()


def dice_loss(probs: Tensor, targets: Tensor) -> Tensor:
    """Summed over the K pairs: 1 - 2 sum(p t) / (sum(p^2) + sum(t^2) + 1e-4); probs, targets (K, P)."""
    numerator = 2 * (probs * targets).sum(-1)  # (K,)
    denominator = (probs * probs).sum(-1) + (targets * targets).sum(-1)  # (K,)
    return (1 - numerator / (denominator + 1e-4)).sum()


@torch.no_grad()
def mask_iou(probs: Tensor, targets: Tensor) -> Tensor:
    """IoU of predictions binarised at p >= 0.4 with targets binarised at > 0.5: (K, P) -> (K,), detached."""
    pred, tgt = (probs >= 0.4).float(), (targets > 0.5).float()
    inter = (pred * tgt).sum(-1)
    union = pred.sum(-1) + tgt.sum(-1) - inter
    return inter / (union + 1e-6)


def count_instances(targets: list[dict], device: torch.device | str = "cpu") -> float:
    """GT instances in the local batch, summed over workers / world size, clamped to >= 1."""
    n = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    return max(dist.all_reduce_mean(n).item(), 1.0)  # all_reduce(sum) / world_size when distributed


class MobileInstCriterion(nn.Module):
    def __init__(self, matcher: HungarianMatcher | None = None, num_classes: int = 80,
                 weights: dict[str, float] | None = None, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, mask_loss_stride: int = MASK_STRIDE,
                 cls_loss: str = "focal") -> None:
        super().__init__()
        if cls_loss not in CLASS_LOSSES:
            raise ValueError(f"cls_loss must be one of {', '.join(CLASS_LOSSES)}, got {cls_loss!r}")
        self.cls_loss = cls_loss
        if mask_loss_stride not in MASK_LOSS_STRIDES:
            raise ValueError(f"mask_loss_stride must be one of {MASK_LOSS_STRIDES}, got {mask_loss_stride}")
        self.loss_upsample = MASK_STRIDE // mask_loss_stride  # 1: the prediction grid (SparseInst)
        self.matcher = matcher or HungarianMatcher()
        self.num_classes = num_classes
        self.weights = {**WEIGHTS, **(weights or {})}
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def forward(self, outputs: dict[str, Tensor], targets: list[dict],
                num_instances: float | None = None) -> dict[str, Tensor]:
        """outputs: pred_logits (B, N, C), pred_scores (B, N, 1), pred_masks (B, N, Hm, Wm), all logits.
        targets: B dicts with labels (M,) int64 in [0, C) and masks (M, H, W), H, W <= 4 * (Hm, Wm).
        Returns the weighted loss_cls, loss_dice, loss_mask, loss_obj and their sum `loss` (fp32)."""
        with torch.autocast(outputs["pred_logits"].device.type, enabled=False):
            logits = outputs["pred_logits"].float()  # (B, N, C)
            objectness = outputs["pred_scores"].float()  # (B, N, 1)
            pred_masks = outputs["pred_masks"].float()  # (B, N, Hm, Wm)
            self._check(logits, targets)
            hm, wm = pred_masks.shape[-2:]
            tgt_masks = prepare_target_masks(targets, (hm, wm), device=pred_masks.device)
            indices = self.matcher(outputs, targets, tgt_masks)  # prepared once, shared with the matcher
            u = self.loss_upsample
            loss_masks = tgt_masks if u == 1 else prepare_target_masks(
                targets, (hm * u, wm * u), stride=MASK_STRIDE // u, device=pred_masks.device)
            n_inst = max(float(num_instances), 1.0) if num_instances is not None else \
                count_instances(targets, logits.device)

            losses = self.mask_losses(pred_masks, objectness, loss_masks, indices, n_inst, u, with_iou=True)
            iou = losses.pop("matched_iou")  # (K,) detached, in the order of `indices`
            if self.cls_loss == "ia_bce":
                losses["loss_cls"] = self.ia_bce_loss(logits, targets, indices, iou, self.focal_alpha,
                                                      self.focal_gamma) / n_inst
            else:
                losses["loss_cls"] = self.class_loss(logits, targets, indices, self.focal_alpha,
                                                     self.focal_gamma) / n_inst
            losses = {k: v * self.weights[k] for k, v in losses.items()}
            for aux in outputs.get("aux_outputs", []):  # deep supervision: own matching, same weights
                losses["loss_aux"] = losses.get("loss_aux", 0.0) + self.forward(aux, targets, n_inst)["loss"]
            if "proposal_logits" in outputs:  # the per-pixel class head of proposed queries (weighted)
                losses["loss_proposal"] = proposal_loss(outputs["proposal_logits"], targets, tgt_masks)
            for group in outputs.get("group_outputs", []):  # Group DETR: each group matched on its own
                losses["loss_groups"] = losses.get("loss_groups", 0.0) + self.forward(group, targets, n_inst)["loss"]
            losses["loss"] = sum(losses.values())
        return losses

    def _check(self, logits: Tensor, targets: list[dict]) -> None:
        if len(targets) != logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {logits.shape[0]} predictions")
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"pred_logits has {logits.shape[-1]} classes, the criterion {self.num_classes}")
        for b, t in enumerate(targets):
            labels = t["labels"]
            if len(labels) != len(t["masks"]):
                raise ValueError(f"targets[{b}]: {len(labels)} labels but {len(t['masks'])} masks")
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"targets[{b}]['labels'] must lie in [0, {self.num_classes}), "
                                 f"got {labels.min().item()}..{labels.max().item()}")

    @staticmethod
    def class_loss(logits: Tensor, targets: list[dict], indices: list[tuple[Tensor, Tensor]],
                   alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
        """Focal loss summed over all B*N*C entries (not normalised). The one-hot target of GT j goes to
        the row of the query matched to j (the reproduction wrote them in GT order: a bug)."""
        onehot = torch.zeros_like(logits)  # (B, N, C): unmatched queries are background
        for b, (q, j) in enumerate(indices):
            labels = torch.as_tensor(targets[b]["labels"], device=logits.device)  # (M,)
            onehot[b, q.to(logits.device), labels[j.to(logits.device)]] = 1.0
        return sigmoid_focal_loss(logits, onehot, alpha, gamma)

    @staticmethod
    def ia_bce_loss(logits: Tensor, targets: list[dict], indices: list[tuple[Tensor, Tensor]],
                    iou: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
        """IoU-aware BCE summed over all B*N*C entries (not normalised). Matched entries (query q
        of GT j, class label_j): BCE against t = clamp(p^alpha * iou^(1 - alpha), 0.01), detached;
        every other entry: -p^gamma * log(1 - p). iou (K,) the matched pairs' mask IoU, in the
        order of `indices`."""
        p = logits.sigmoid()
        pos = torch.zeros_like(logits)  # (B, N, C) weight of -log(p)
        neg = p.detach() ** gamma  # (B, N, C) weight of -log(1 - p)
        b_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(logits.device)
        q_idx = torch.cat([q for q, _ in indices]).to(logits.device)
        c_idx = torch.cat([torch.as_tensor(t["labels"])[j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        t = (p[b_idx, q_idx, c_idx].detach() ** alpha * iou.to(p) ** (1 - alpha)).clamp(min=0.01)  # (K,)
        pos[b_idx, q_idx, c_idx] = t
        neg[b_idx, q_idx, c_idx] = 1 - t
        # -pos * log(p) - neg * log(1 - p), with log(1 - p) = log(p) - x: stable in the logits x
        return (neg * logits - F.logsigmoid(logits) * (pos + neg)).sum()

    @staticmethod
    def mask_losses(pred_masks: Tensor, objectness: Tensor, tgt_masks: list[Tensor],
                    indices: list[tuple[Tensor, Tensor]], num_instances: float,
                    upsample: int = 1, with_iou: bool = False) -> dict[str, Tensor]:
        """Unweighted dice (/ num_instances), pixel BCE (pixel mean) and objectness BCE (matched mean).

        pred_masks (B, N, Hm, Wm), objectness (B, N, 1) logits; tgt_masks[b] (M_b, u*Hm, u*Wm) soft,
        u = upsample: the matched masks' probabilities are upsampled bilinearly by u before scoring.
        with_iou: also "matched_iou" (K,), each pair's mask IoU (detached; not a loss)."""
        dev = pred_masks.device
        # gather per image (K_b matched pairs), no global offsets: safe when M_b > N
        src = torch.cat([pred_masks[b, q.to(dev)] for b, (q, _) in enumerate(indices)])  # (K, Hm, Wm)
        tgt = torch.cat([tgt_masks[b][j.to(dev)] for b, (_, j) in enumerate(indices)]).flatten(1)  # (K, u*u*P)
        obj = torch.cat([objectness[b, q.to(dev), 0] for b, (q, _) in enumerate(indices)])  # (K,)
        if src.shape[0] == 0:  # no GT anywhere in the batch: keep the graph, add exactly 0
            zero = pred_masks.sum() * 0.0 + objectness.sum() * 0.0
            return {"loss_dice": zero, "loss_mask": zero, "loss_obj": zero,
                    **({"matched_iou": zero.new_zeros(0).detach()} if with_iou else {})}
        if upsample == 1:
            src = src.flatten(1)  # (K, P) logits
            probs, bce = src.sigmoid(), F.binary_cross_entropy_with_logits(src, tgt, reduction="mean")
        else:  # probabilities upsampled as inference does (bilinear, align_corners=False)
            probs = F.interpolate(src[None].sigmoid(), scale_factor=float(upsample), mode="bilinear",
                                  align_corners=False)[0].flatten(1)  # (K, u*u*P)
            bce = F.binary_cross_entropy(probs.clamp(1e-6, 1 - 1e-6), tgt, reduction="mean")
        iou = mask_iou(probs, tgt)  # (K,) detached
        return {
            "loss_dice": dice_loss(probs, tgt) / num_instances,
            "loss_mask": bce,
            "loss_obj": F.binary_cross_entropy_with_logits(obj, iou, reduction="mean"),
            **({"matched_iou": iou} if with_iou else {}),
        }
