"""Matcher and losses against values worked out by hand (SparseInst's definitions, spec training.md)."""
import math

import pytest
import torch

from mobileinst.train.losses import (MobileInstCriterion, dice_loss, mask_iou, prepare_target_masks,
                                     sigmoid_focal_loss)
from mobileinst.train.matcher import HungarianMatcher, dice_score


def logit(p):
    return math.log(p / (1 - p))


def test_dice_score_by_hand():
    p = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    t = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    # 2 * |p.t| / (|p|^2 + |t|^2 + 1e-4) = 2 * 1 / (2 + 2 + 1e-4)
    assert dice_score(p, t).item() == pytest.approx(2 / 4.0001, abs=1e-7)
    assert dice_loss(p, t).item() == pytest.approx(1 - 2 / 4.0001, abs=1e-7)


def test_focal_loss_by_hand():
    # logit 0 -> p = 0.5; CE = ln 2; (1 - p_t)^2 = 0.25; alpha_t = 0.25 (positive) / 0.75 (negative)
    pos = sigmoid_focal_loss(torch.zeros(1), torch.ones(1)).item()
    neg = sigmoid_focal_loss(torch.zeros(1), torch.zeros(1)).item()
    assert pos == pytest.approx(0.25 * 0.25 * math.log(2), rel=1e-6)
    assert neg == pytest.approx(0.75 * 0.25 * math.log(2), rel=1e-6)


def test_mask_iou_by_hand():
    probs = torch.tensor([[0.9, 0.5, 0.3, 0.1]])  # >= 0.4 -> [1, 1, 0, 0]
    tgt = torch.tensor([[0.9, 0.2, 0.8, 0.0]])  # > 0.5 -> [1, 0, 1, 0]
    assert mask_iou(probs, tgt).item() == pytest.approx(1 / 3, abs=1e-5)  # inter 1, union 3


def _outputs(probs, n_pix=16, mask_logit=20.0):
    """3 queries predicting full masks; class probabilities given."""
    p = torch.tensor(probs)
    return {"pred_logits": torch.log(p / (1 - p))[None],
            "pred_scores": torch.zeros(1, len(probs), 1),
            "pred_masks": torch.full((1, len(probs), 4, n_pix // 4), mask_logit)}


def test_matcher_beats_greedy():
    # Equal masks everywhere, so the score is prob^0.2 up to a constant. Wanted scores:
    #   S = [[0.9, 0.8], [0.85, 0.1], [0.1, 0.1]]; greedy takes (0,0) then (1,1) = 1.0,
    #   the optimum is (0,1) + (1,0) = 1.65. prob = S^5 gives prob^0.2 = S.
    s = [[0.9, 0.8], [0.85, 0.1], [0.1, 0.1]]
    probs = [[v ** 5 for v in row] for row in s]
    out = _outputs(probs)
    targets = [{"labels": torch.tensor([0, 1]), "masks": torch.ones(2, 16, 16, dtype=torch.uint8)}]
    tgt_masks = prepare_target_masks(targets, (4, 4))
    (q, t), = HungarianMatcher()(out, targets, tgt_masks)
    assert q.dtype == torch.int64 and t.dtype == torch.int64
    assert dict(zip(q.tolist(), t.tolist())) == {0: 1, 1: 0}


def test_class_targets_land_on_matched_rows():
    # query 0 <-> target 1 (label 1), query 1 <-> target 0 (label 0): GT order != query order
    logits = torch.zeros(1, 3, 2)
    targets = [{"labels": torch.tensor([0, 1])}]
    indices = [(torch.tensor([0, 1]), torch.tensor([1, 0]))]
    loss = MobileInstCriterion.class_loss(logits, targets, indices).item()
    # 6 entries at p = 0.5: two positives ([0, 1] and [1, 0]) and four negatives
    expected = 2 * 0.25 * 0.25 * math.log(2) + 4 * 0.75 * 0.25 * math.log(2)
    assert loss == pytest.approx(expected, rel=1e-6)
    # the reproduction's bug (targets in GT order: [0, 0] and [1, 1]) gives the same count but not
    # the same placement; check the placement through non-uniform logits
    logits = torch.tensor([[[-2.0, 3.0], [1.0, -1.0], [0.0, 0.0]]])
    got = MobileInstCriterion.class_loss(logits, targets, indices)
    onehot = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]])
    assert got.item() == pytest.approx(sigmoid_focal_loss(logits, onehot).item(), rel=1e-6)
    wrong = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    assert got.item() != pytest.approx(sigmoid_focal_loss(logits, wrong).item(), rel=1e-3)


def test_objectness_target_is_the_iou():
    crit = MobileInstCriterion(num_classes=1)
    pred = torch.tensor([logit(0.9), logit(0.5), logit(0.3), logit(0.1)]).view(1, 1, 2, 2)
    tgt = [torch.tensor([[0.9, 0.2], [0.8, 0.0]])[None]]
    obj = torch.zeros(1, 1, 1)  # sigmoid 0.5
    losses = crit.mask_losses(pred, obj, tgt, [(torch.tensor([0]), torch.tensor([0]))], 1.0)
    iou = 1 / 3
    expected = -(iou * math.log(0.5) + (1 - iou) * math.log(0.5))  # BCE at p = 0.5
    assert losses["loss_obj"].item() == pytest.approx(expected, rel=1e-5)


def _random_outputs(b, n, c, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*shape, generator=g, requires_grad=True) for k, shape in
            (("pred_logits", (b, n, c)), ("pred_scores", (b, n, 1)), ("pred_masks", (b, n, h, w)))}


def _target(labels, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"labels": torch.tensor(labels, dtype=torch.int64),
            "masks": (torch.rand(len(labels), h, w, generator=g) > 0.5).to(torch.uint8)}


def test_empty_image_and_empty_batch():
    crit = MobileInstCriterion(num_classes=3)
    out = _random_outputs(2, 5, 3)
    losses = crit(out, [_target([0, 2]), _target([])])
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()

    out = _random_outputs(2, 5, 3)
    losses = crit(out, [_target([]), _target([])])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_dice"].item() == 0 and losses["loss_mask"].item() == 0
    losses["loss"].backward()
    assert out["pred_masks"].grad is not None and out["pred_masks"].grad.abs().sum() == 0
    assert out["pred_logits"].grad.abs().sum() > 0  # focal loss pushes every query to background


def test_more_targets_than_queries():
    crit = MobileInstCriterion(num_classes=2)
    out = _random_outputs(1, 2, 2)
    losses = crit(out, [_target([0, 1, 0, 1, 1])])
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()


def test_bf16_autocast_is_finite():
    crit = MobileInstCriterion(num_classes=3)
    out = _random_outputs(2, 5, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf = {k: v.to(torch.bfloat16) for k, v in out.items()}
        losses = crit(bf, [_target([0, 2]), _target([1])])
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())


def test_normalised_per_instance():
    crit = MobileInstCriterion(num_classes=3)
    out = _random_outputs(1, 6, 3)
    tgt = [_target([0, 2, 1])]
    single = crit(out, tgt)
    double = crit({k: torch.cat([v, v]) for k, v in out.items()}, tgt + tgt)
    for k in ("loss_cls", "loss_dice", "loss_mask", "loss_obj"):
        assert double[k].item() == pytest.approx(single[k].item(), rel=1e-5), k


def test_target_masks_padded_then_resized():
    # a 6x6 all-ones mask in a 16x16 padded input, at mask size 4x4 (stride 4)
    t = [{"labels": torch.tensor([0]), "masks": torch.ones(1, 6, 6, dtype=torch.uint8)}]
    m = prepare_target_masks(t, (4, 4))[0][0]
    assert m[0, 0] == 1.0 and m[3, 3] == 0.0  # inside / padding
    assert 0 < m[1, 1] < 1  # soft at the border, not re-binarised
