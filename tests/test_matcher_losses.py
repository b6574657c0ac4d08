"""Matcher and losses against values worked out by hand (SparseInst's definitions, spec training.md §1, §2, §9).

Expected numbers are written as closed forms of the definitions, never by calling the code under test:
  focal(p, y)  = -alpha_t (1 - p_t)^2 log p_t, alpha_t = 0.25 (y = 1) / 0.75 (y = 0)
  dice(p, t)   = 2 sum(pt) / (sum p^2 + sum t^2 + 1e-4)
  match score  = dice^0.8 * prob^0.2, maximised
  weights      = cls 2, dice 2, pixel BCE 5, objectness 1
"""
import logging
import math

import pytest
import torch
import torch.multiprocessing as mp

from mobileinst.train.losses import (MobileInstCriterion, count_instances, dice_loss, dice_score, mask_iou,
                                     prepare_target_masks, sigmoid_focal_loss)
from mobileinst.train.matcher import HungarianMatcher

LN2 = math.log(2)
BIG = 20.0  # mask logit: sigmoid(20) = 1 - 2e-9, a binary mask for all purposes


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def focal(p: float, y: int) -> float:
    """Closed-form focal loss of one probability (alpha 0.25, gamma 2)."""
    return 0.25 * (1 - p) ** 2 * -math.log(p) if y else 0.75 * p ** 2 * -math.log(1 - p)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------------------------------------- pure functions

def test_dice_score_of_two_2x2_masks():
    p = torch.tensor([[1.0, 0.5], [0.0, 0.0]]).flatten()[None]  # (1, 4)
    t = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).flatten()[None]
    # sum(pt) = 1.5, sum(p^2) = 1.25, sum(t^2) = 2
    assert dice_score(p, t).item() == pytest.approx(3.0 / 3.2501, abs=1e-7)
    assert dice_loss(p, t).item() == pytest.approx(1 - 3.0 / 3.2501, abs=1e-7)
    # pairwise: (N=2, P) x (M=1, P) -> (2, 1); the second prediction is empty -> 0
    pair = dice_score(torch.cat([p, torch.zeros_like(p)]), t)
    assert pair.shape == (2, 1) and pair[1, 0].item() == 0.0
    # dice_loss sums over pairs
    assert dice_loss(torch.cat([p, p]), torch.cat([t, t])).item() == pytest.approx(2 * (1 - 3.0 / 3.2501), abs=1e-6)


def test_focal_loss_on_one_logit():
    # logit 0 -> p = 0.5: CE = ln 2, (1 - p_t)^2 = 1/4
    assert sigmoid_focal_loss(torch.zeros(1), torch.ones(1)).item() == pytest.approx(0.25 * 0.25 * LN2, rel=1e-6)
    assert sigmoid_focal_loss(torch.zeros(1), torch.zeros(1)).item() == pytest.approx(0.75 * 0.25 * LN2, rel=1e-6)
    # logit ln 3 -> p = 0.75: positive 0.25 * 0.25^2 * ln(4/3), negative 0.75 * 0.75^2 * ln 4
    x = torch.tensor([math.log(3.0)])
    assert sigmoid_focal_loss(x, torch.ones(1)).item() == pytest.approx(0.25 * 0.0625 * math.log(4 / 3), rel=1e-6)
    assert sigmoid_focal_loss(x, torch.zeros(1)).item() == pytest.approx(0.75 * 0.5625 * math.log(4), rel=1e-6)
    # stable at saturated logits: a confident wrong negative costs 0.75 * 1 * 100
    assert sigmoid_focal_loss(torch.tensor([100.0]), torch.zeros(1)).item() == pytest.approx(75.0, rel=1e-6)


def test_mask_iou_thresholds():
    probs = torch.tensor([[0.9, 0.4, 0.39, 0.1]])  # >= 0.4 -> [1, 1, 0, 0]
    tgt = torch.tensor([[0.9, 0.5, 0.8, 0.0]])  # > 0.5 -> [1, 0, 1, 0]
    assert mask_iou(probs, tgt).item() == pytest.approx(1 / 3, abs=1e-5)  # inter 1, union 3
    assert mask_iou(torch.zeros(1, 4), torch.zeros(1, 4)).item() == 0.0  # empty/empty: 0, not NaN


def test_target_masks_padded_then_resized():
    # a 6x6 all-ones mask in a 16x16 padded input, down to 4x4. Bilinear (align_corners=False) samples the
    # input at 4i + 1.5: i=0 -> between pixels 1, 2 (both 1) = 1; i=1 -> between 5 (1) and 6 (0) = 0.5
    t = [{"labels": torch.tensor([0]), "masks": torch.ones(1, 6, 6, dtype=torch.bool)}]
    m = prepare_target_masks(t, (4, 4))[0][0]
    expected = torch.zeros(4, 4)
    expected[:2, :2] = torch.tensor([[1.0, 0.5], [0.5, 0.25]])
    assert m.dtype == torch.float32 and torch.equal(m, expected)  # soft, not re-binarised
    empty = prepare_target_masks([{"labels": torch.zeros(0, dtype=torch.int64),
                                   "masks": torch.zeros(0, 10, 12, dtype=torch.uint8)}], (4, 4))[0]
    assert empty.shape == (0, 4, 4)
    with pytest.raises(ValueError, match="padded input"):  # larger than the padded input: refuse, don't crop
        prepare_target_masks([{"labels": torch.tensor([0]), "masks": torch.ones(1, 17, 8)}], (4, 4))


# ---------------------------------------------------------------------------------------------- the matcher

def _blocks(row: list[int]) -> torch.Tensor:
    """A (1, 4) mask-grid row -> (4, 16) image mask of 4x4 blocks (prepared back to exactly `row`)."""
    return torch.tensor(row, dtype=torch.uint8).repeat_interleave(4)[None].repeat(4, 1)


# Scene used below: mask grid 1x4 (input 4x16), 3 queries, 2 targets, C = 2.
#   q0 = [0,0,0,0]  q1 = [1,1,1,0]  q2 = [1,0,0,0];   t0 = [1,1,0,0] (label 0)  t1 = [0,0,1,1] (label 1)
#   dice: q0-* = 0, q1-t0 = 4/5, q1-t1 = 2/5, q2-t0 = 2/3, q2-t1 = 0
#   class probs: q0 = [0.5, 0.5], q1 = [0.5, 0.8], q2 = [0.8, 0.5]
#   S = dice^0.8 * p^0.2:  q0-* 0,  q1-t0 0.8^.8 * 0.5^.2 = 0.728,  q1-t1 0.4^.8 * 0.8^.2 = 0.459,
#                          q2-t0 (2/3)^.8 * 0.8^.2 = 0.691, q2-t1 0
#   greedy (best pair first): q1-t0, then t1 -> 0 (q0 or q2): total 0.728
#   "identity" (q0-t0, q1-t1): total 0.459;  optimum q1-t1 + q2-t0: total 1.151 (rows 1, 2: not 0, 1)
Q_MASKS = [[0, 0, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]
Q_PROBS = [[0.5, 0.5], [0.5, 0.8], [0.8, 0.5]]
Q_OBJ = [0.5, 0.75, 0.5]  # objectness probabilities


def _scene_outputs(requires_grad: bool = False) -> dict[str, torch.Tensor]:
    out = {"pred_logits": torch.tensor([[[logit(p) for p in row] for row in Q_PROBS]]),
           "pred_scores": torch.tensor([[[logit(p)] for p in Q_OBJ]]),
           "pred_masks": (torch.tensor(Q_MASKS, dtype=torch.float32) * 2 * BIG - BIG).view(1, 3, 1, 4)}
    return {k: v.requires_grad_(requires_grad) for k, v in out.items()}


def _scene_target() -> dict[str, torch.Tensor]:
    return {"labels": torch.tensor([0, 1]), "masks": torch.stack([_blocks([1, 1, 0, 0]), _blocks([0, 0, 1, 1])])}


def test_matcher_optimum_is_neither_identity_nor_greedy():
    dice = [[0.0, 0.0], [0.8, 0.4], [2 / 3, 0.0]]
    prob = [[0.5, 0.5], [0.5, 0.8], [0.8, 0.5]]  # prob of each target's label: t0 -> class 0, t1 -> class 1
    s = [[dice[i][j] ** 0.8 * prob[i][j] ** 0.2 for j in range(2)] for i in range(3)]
    assert s[1][1] + s[2][0] > s[1][0] + max(s[0][1], s[2][1]) + 0.4  # optimum beats greedy/identity clearly

    out, targets = _scene_outputs(), [_scene_target()]
    (q, t), = HungarianMatcher()(out, targets)
    assert q.dtype == torch.int64 and t.dtype == torch.int64
    assert dict(zip(q.tolist(), t.tolist())) == {1: 1, 2: 0}
    # prepared masks given by the criterion give the same answer
    (q2, t2), = HungarianMatcher()(out, targets, prepare_target_masks(targets, (1, 4)))
    assert q2.tolist() == q.tolist() and t2.tolist() == t.tolist()


def test_matcher_exponents_dice_08_prob_02():
    # q0 = t0 = [1,1,0,0], q1 = t1 = [0,1,1,0]: dice 1 on the diagonal, 2*1/(2+2) = 1/2 off it.
    # class probs of the targets' labels: diagonal 0.1, off-diagonal 0.9.
    #   dice^0.8 * p^0.2: diagonal 2 * 0.1^0.2 = 1.262 > swapped 2 * 0.5^0.8 * 0.9^0.2 = 1.124
    #   dice^0.2 * p^0.8 (exponents the wrong way round): diagonal 2 * 0.1^0.8 = 0.317 < swapped 1.601
    assert 2 * 0.1 ** 0.2 > 2 * 0.5 ** 0.8 * 0.9 ** 0.2 and 2 * 0.1 ** 0.8 < 2 * 0.5 ** 0.2 * 0.9 ** 0.8
    out = {"pred_logits": torch.tensor([[[logit(0.1), logit(0.9)], [logit(0.9), logit(0.1)]]]),
           "pred_masks": (torch.tensor([[1.0, 1, 0, 0], [0, 1, 1, 0]]) * 2 * BIG - BIG).view(1, 2, 1, 4)}
    targets = [{"labels": torch.tensor([0, 1]), "masks": torch.stack([_blocks([1, 1, 0, 0]), _blocks([0, 1, 1, 0])])}]
    (q, t), = HungarianMatcher()(out, targets)
    assert dict(zip(q.tolist(), t.tolist())) == {0: 0, 1: 1}
    (q, t), = HungarianMatcher(alpha=0.2, beta=0.8)(out, targets)  # configurable
    assert dict(zip(q.tolist(), t.tolist())) == {0: 1, 1: 0}


def test_matcher_class_term_breaks_greedy():
    # equal masks everywhere, so S = prob^0.2 up to a constant: S = [[0.9, 0.8], [0.85, 0.1], [0.1, 0.1]]
    # greedy (0,0) + (1,1) = 1.0; optimum (0,1) + (1,0) = 1.65.  prob = S^5 gives prob^0.2 = S.
    s = [[0.9, 0.8], [0.85, 0.1], [0.1, 0.1]]
    p = torch.tensor([[v ** 5 for v in row] for row in s])
    out = {"pred_logits": torch.log(p / (1 - p))[None], "pred_masks": torch.full((1, 3, 4, 4), BIG)}
    targets = [{"labels": torch.tensor([0, 1]), "masks": torch.ones(2, 16, 16, dtype=torch.uint8)}]
    (q, t), = HungarianMatcher()(out, targets)
    assert dict(zip(q.tolist(), t.tolist())) == {0: 1, 1: 0}


def test_matcher_empty_targets_are_int64():
    out = _scene_outputs()
    out = {k: torch.cat([v, v]) for k, v in out.items()}
    none = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 4, 16, dtype=torch.uint8)}
    for targets in ([_scene_target(), none], [none, none]):
        indices = HungarianMatcher()(out, targets)
        q, t = indices[1]
        assert q.dtype == t.dtype == torch.int64 and q.numel() == t.numel() == 0


def test_matcher_survives_nan(caplog):
    out = _scene_outputs()
    out["pred_masks"][0, 1] = float("nan")  # query 1 (the best one) is broken
    targets = [_scene_target()]
    m = HungarianMatcher()
    with caplog.at_level(logging.WARNING, logger="mobileinst.train"):
        (q, t), = m(out, targets)
        m(out, targets)
    assert dict(zip(q.tolist(), t.tolist())) == {0: 1, 2: 0}  # the NaN query 1 is the worst match
    assert sum("non-finite" in r.message for r in caplog.records) == 1  # warned once


def test_more_targets_than_queries():
    # N = 2 queries on a 1x8 grid predicting pixels 3 and 6; M = 5 one-pixel targets at 0, 3, 5, 6, 7
    pm = torch.full((1, 2, 1, 8), -BIG)
    pm[0, 0, 0, 3] = pm[0, 1, 0, 6] = BIG
    out = {"pred_logits": torch.zeros(1, 2, 2, requires_grad=True), "pred_scores": torch.zeros(1, 2, 1),
           "pred_masks": pm.requires_grad_()}
    masks = torch.zeros(5, 4, 32, dtype=torch.uint8)
    for k, px in enumerate([0, 3, 5, 6, 7]):
        masks[k, :, 4 * px:4 * px + 4] = 1
    targets = [{"labels": torch.tensor([1, 0, 1, 1, 1]), "masks": masks}]
    (q, t), = HungarianMatcher()(out, targets)
    assert dict(zip(q.tolist(), t.tolist())) == {0: 1, 1: 3}

    losses = MobileInstCriterion(num_classes=2)(out, targets)
    # num_instances = 5; matched labels: q0 -> class 0, q1 -> class 1; all probs 0.5
    assert losses["loss_cls"].item() == pytest.approx(2 * (2 * focal(0.5, 1) + 2 * focal(0.5, 0)) / 5, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(2 * 2 * (1 - 2 / 2.0001) / 5, rel=1e-3)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert torch.isfinite(out["pred_masks"].grad).all()


# ---------------------------------------------------------------------------------------------- the criterion

# Expected losses of the scene (matched q1-t1, q2-t0; num_instances 2), weights applied:
#   cls:  positives q1/class 1 and q2/class 0 at p = 0.8, four negatives at p = 0.5, 2 * sum / 2
#   dice: q1-t1: 1 - 2/(3 + 2 + 1e-4), q2-t0: 1 - 2/(1 + 2 + 1e-4), 2 * sum / 2
#   mask: 8 matched pixels, 4 wrong (BCE softplus(20)), 4 right (softplus(-20)), mean, x 5
#   obj:  IoU targets q1-t1 = 1/4, q2-t0 = 1/2; q1 at p = 0.75, q2 at p = 0.5; mean
SCENE = {
    "loss_cls": 2 * (2 * focal(0.8, 1) + 4 * focal(0.5, 0)) / 2,
    "loss_dice": 2 * ((1 - 2 / 5.0001) + (1 - 2 / 3.0001)) / 2,
    "loss_mask": 5 * (4 * softplus(BIG) + 4 * softplus(-BIG)) / 8,
    "loss_obj": (-(0.25 * math.log(0.75) + 0.75 * math.log(0.25)) + LN2) / 2,
}


def _check(losses: dict, expected: dict, rel: float = 1e-5) -> None:
    for k, v in expected.items():
        assert losses[k].item() == pytest.approx(v, rel=rel, abs=1e-7), k
    assert losses["loss"].item() == pytest.approx(sum(losses[k].item() for k in expected), rel=1e-6)


def test_scene_losses_by_hand():
    losses = MobileInstCriterion(num_classes=2)(_scene_outputs(), [_scene_target()])
    _check(losses, SCENE)
    # class targets written in GT order (the reproduction's bug): row 1 -> class 0, row 2 -> class 1.
    # positives at p = 0.5, negatives q1/class 1 and q2/class 0 at p = 0.8: a different number.
    bug = 2 * (2 * focal(0.5, 1) + 2 * focal(0.8, 0) + 2 * focal(0.5, 0)) / 2
    assert abs(losses["loss_cls"].item() - bug) > 0.1


def test_class_targets_land_on_matched_rows():
    # query 0 <-> target 1 (label 1), query 2 <-> target 0 (label 0), query 1 unmatched; each cell differs
    logits = torch.tensor([[[logit(0.1), logit(0.7)], [logit(0.6), logit(0.2)], [logit(0.3), logit(0.4)]]])
    targets = [{"labels": torch.tensor([0, 1])}]
    indices = [(torch.tensor([0, 2]), torch.tensor([1, 0]))]
    got = MobileInstCriterion.class_loss(logits, targets, indices).item()
    # one-hot rows: q0 = [0, 1], q1 = [0, 0], q2 = [1, 0]
    expected = (focal(0.1, 0) + focal(0.7, 1) + focal(0.6, 0) + focal(0.2, 0) + focal(0.3, 1) + focal(0.4, 0))
    assert got == pytest.approx(expected, rel=1e-6)


def test_objectness_target_is_the_iou():
    # soft target and a prediction on the 0.4 threshold: pred >= 0.4 -> [1, 1, 0, 0], target > 0.5 -> [1, 0, 1, 0]
    pred = torch.tensor([logit(0.9), logit(0.4), logit(0.3), logit(0.1)]).view(1, 1, 2, 2)
    tgt = [torch.tensor([[0.9, 0.5], [0.8, 0.0]])[None]]
    obj = torch.full((1, 1, 1), logit(0.8), requires_grad=True)
    losses = MobileInstCriterion.mask_losses(pred, obj, tgt, [(torch.tensor([0]), torch.tensor([0]))], 1.0)
    iou = 1 / 3  # inter 1, union 3
    assert losses["loss_obj"].item() == pytest.approx(-(iou * math.log(0.8) + (1 - iou) * math.log(0.2)), rel=1e-5)
    losses["loss_obj"].backward()
    assert obj.grad.item() == pytest.approx(0.8 - iou, rel=1e-5)  # d BCE / d logit = p - y: the target is IoU


def test_empty_image_in_a_batch():
    out = {k: torch.cat([v, torch.zeros_like(v)]).requires_grad_() for k, v in _scene_outputs().items()}
    none = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 4, 12, dtype=torch.uint8)}
    losses = MobileInstCriterion(num_classes=2)(out, [_scene_target(), none])
    # image 2 only adds 3 x 2 background entries at p = 0.5 to the focal sum; num_instances stays 2
    _check(losses, dict(SCENE, loss_cls=SCENE["loss_cls"] + 2 * 6 * focal(0.5, 0) / 2))
    losses["loss"].backward()
    assert out["pred_masks"].grad[1].abs().sum() == 0 and out["pred_scores"].grad[1].abs().sum() == 0


def test_all_empty_batch():
    out = {"pred_logits": torch.zeros(2, 3, 2, requires_grad=True),
           "pred_scores": torch.zeros(2, 3, 1, requires_grad=True),
           "pred_masks": torch.randn(2, 3, 2, 2, requires_grad=True)}
    none = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 8, 8, dtype=torch.bool)}
    losses = MobileInstCriterion(num_classes=2)(out, [none, none])
    # focal: 12 background entries at p = 0.5, num_instances clamped to 1, weight 2
    _check(losses, {"loss_cls": 2 * 12 * focal(0.5, 0), "loss_dice": 0.0, "loss_mask": 0.0, "loss_obj": 0.0})
    losses["loss"].backward()
    for k in ("pred_masks", "pred_scores"):
        assert out[k].grad is not None and torch.equal(out[k].grad, torch.zeros_like(out[k]))
    g = out["pred_logits"].grad
    assert torch.isfinite(g).all() and (g > 0).all()  # every query pushed towards background


def test_num_instances_normalisation():
    crit = MobileInstCriterion(num_classes=2)
    out, tgt = _scene_outputs(), [_scene_target()]
    double = crit({k: torch.cat([v, v]) for k, v in out.items()}, tgt + tgt)  # 4 instances
    _check(double, SCENE)  # per-instance normalisation: the duplicated batch has the same losses
    given = crit(out, tgt, num_instances=4.0)  # explicit (e.g. computed over a larger batch)
    _check(given, dict(SCENE, loss_cls=SCENE["loss_cls"] / 2, loss_dice=SCENE["loss_dice"] / 2))
    assert count_instances(tgt + tgt) == 4.0 and count_instances([]) == 1.0


def test_weights_are_configurable():
    crit = MobileInstCriterion(num_classes=2, weights={"loss_mask": 1.0})
    losses = crit(_scene_outputs(), [_scene_target()])
    _check(losses, dict(SCENE, loss_mask=SCENE["loss_mask"] / 5))


def test_bf16_autocast_is_finite():
    crit = MobileInstCriterion(num_classes=2)
    out = _scene_outputs(requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf = {k: v.to(torch.bfloat16) for k, v in out.items()}
        losses = crit(bf, [_scene_target()])
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
    _check(losses, SCENE, rel=2e-2)  # bf16 inputs (8-bit mantissa), fp32 arithmetic
    losses["loss"].backward()
    assert all(torch.isfinite(v.grad).all() for v in out.values())


def test_bad_targets_are_refused():
    crit = MobileInstCriterion(num_classes=2)
    bad = dict(_scene_target(), labels=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        crit(_scene_outputs(), [bad])
    with pytest.raises(ValueError, match="targets for a batch"):
        crit(_scene_outputs(), [_scene_target(), _scene_target()])


def _count_worker(rank: int, path: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    labels = torch.zeros(3 if rank == 0 else 0, dtype=torch.int64)  # 3 instances on rank 0, none on rank 1
    n = count_instances([{"labels": labels}])
    torch.distributed.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        f.write(str(n))


def test_num_instances_is_averaged_over_workers(tmp_path):
    mp.spawn(_count_worker, args=(str(tmp_path / "pg"), str(tmp_path / "n")), nprocs=2, join=True)
    # (3 + 0) / 2 workers = 1.5 on both ranks (the DETR recipe); rank 1 alone would have clamped to 1
    assert [float(open(tmp_path / f"n.{r}").read()) for r in (0, 1)] == [1.5, 1.5]


def test_mask_losses_on_a_finer_grid_score_the_upsampled_probabilities():
    # a 2x2 prediction upsampled x2 (bilinear, align_corners=False) has known values: the corners of
    # [[1, 0], [0, 0]] become [[1, .75, .25, 0], [.75, .5625, .1875, 0], ...]; scored against a 4x4 target
    p = torch.tensor([[0.98, 0.02], [0.02, 0.02]])
    pred = torch.logit(p).view(1, 1, 2, 2)
    obj = torch.zeros(1, 1, 1)
    tgt = torch.zeros(1, 4, 4)
    tgt[0, :2, :2] = 1
    up = torch.nn.functional.interpolate(p[None, None], scale_factor=2.0, mode="bilinear", align_corners=False)
    up = up.flatten()
    losses = MobileInstCriterion.mask_losses(pred, obj, [tgt], [(torch.tensor([0]), torch.tensor([0]))], 1.0,
                                             upsample=2)
    t = tgt.flatten()
    dice = 2 * (up * t).sum() / ((up * up).sum() + (t * t).sum() + 1e-4)
    bce = -(t * up.log() + (1 - t) * (1 - up).log()).mean()
    assert losses["loss_dice"].item() == pytest.approx(1 - dice.item(), rel=1e-5)
    assert losses["loss_mask"].item() == pytest.approx(bce.item(), rel=1e-5)


def test_a_finer_loss_grid_fits_a_small_object_more_closely():
    """A free 8x8 logit map fitted to a 32x32 disc (radius 5, off the coarse grid) by the stride-4
    losses and by the stride-1 ones; inference upsamples the probabilities x4 and binarises > 0.45.
    The fine-grid fit must reach a higher IoU with the disc: that is what the option is for."""
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disc = (((yy - 13.5) ** 2 + (xx - 17.5) ** 2) <= 25).to(torch.uint8)[None]  # (1, 32, 32)
    targets = [{"labels": torch.tensor([0]), "masks": disc}]

    def fitted_iou(stride: int) -> float:
        torch.manual_seed(0)
        masks = torch.zeros(1, 1, 8, 8, requires_grad=True)
        criterion = MobileInstCriterion(num_classes=1, mask_loss_stride=stride)
        opt = torch.optim.Adam([masks], lr=0.1)
        for _ in range(300):
            out = {"pred_logits": torch.zeros(1, 1, 1), "pred_scores": torch.zeros(1, 1, 1), "pred_masks": masks}
            opt.zero_grad()
            criterion(out, targets)["loss"].backward()
            opt.step()
        up = torch.nn.functional.interpolate(masks.detach().sigmoid(), scale_factor=4.0, mode="bilinear",
                                             align_corners=False)[0, 0] > 0.45
        d = disc[0].bool()
        return ((up & d).sum() / (up | d).sum()).item()

    coarse, fine = fitted_iou(4), fitted_iou(1)
    assert fine > coarse + 0.03, (coarse, fine)


def test_mask_loss_stride_must_divide_the_prediction_stride():
    with pytest.raises(ValueError, match="mask_loss_stride"):
        MobileInstCriterion(num_classes=1, mask_loss_stride=3)


def test_ia_bce_targets_the_mask_quality_of_the_matched_entry():
    # 1 image, 2 queries x 2 classes; query 1 matched to a GT of class 0 whose mask IoU is 0.5
    probs = [[0.3, 0.6], [0.8, 0.1]]
    logits = torch.tensor([[[logit(p) for p in row] for row in probs]])  # (1, 2, 2)
    targets = [{"labels": torch.tensor([0])}]
    got = MobileInstCriterion.ia_bce_loss(logits, targets, [(torch.tensor([1]), torch.tensor([0]))],
                                          torch.tensor([0.5])).item()
    t = 0.8 ** 0.25 * 0.5 ** 0.75
    expected = (-(t * math.log(0.8) + (1 - t) * math.log(0.2))  # the matched entry: soft BCE
                + sum(-p ** 2 * math.log(1 - p) for p in (0.3, 0.6, 0.1)))  # negatives, weight p^2
    assert got == pytest.approx(expected, rel=1e-5)


def test_ia_bce_ranks_the_better_mask_higher():
    """Two queries on the same object with the same class logit: trained with ia_bce, the one whose
    mask fits better ends with the higher class score; with the focal loss only the matched one
    rises, whatever its mask."""
    torch.manual_seed(0)
    logits = torch.zeros(1, 2, 1, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=1.0)
    for step in range(200):  # the matcher alternates which query is matched; IoUs 0.9 and 0.3
        q = step % 2
        iou = torch.tensor([0.9 if q == 0 else 0.3])
        loss = MobileInstCriterion.ia_bce_loss(logits, [{"labels": torch.tensor([0])}],
                                               [(torch.tensor([q]), torch.tensor([0]))], iou)
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = logits.detach().sigmoid().flatten()
    assert p[0] > p[1] + 0.1, p


def test_cls_loss_option_is_checked():
    with pytest.raises(ValueError, match="cls_loss"):
        MobileInstCriterion(num_classes=1, cls_loss="softmax")
