"""Frozen BatchNorms folded into their convolutions (train/fold_bn.py): same outputs, same
gradients, same state_dict, the EMA and checkpoints untouched."""
from __future__ import annotations

import copy

import pytest
import torch

from mobileinst.models.factory import build_model
from mobileinst.train.engine import freeze_backbone, frozen_backbone_norms
from mobileinst.train.fold_bn import (FoldedBatchNorm2d, FoldedConv2d, fold_frozen_batchnorms,
                                      unfold_batchnorms)


STRIDE4 = {"mask_stride": 4}  # SeaFormer has no stride-4 level


def _model(name: str = "mobileinst-mobilenetv2", freeze_at: int = 3, overrides: dict = STRIDE4
           ) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, num_queries=8, query_proposal=True, **overrides)
    for m in model.backbone.modules():  # statistics away from (0, 1) so that the folding is exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.double()  # float64: the folding's rounding stays far below the tolerance
    frozen = frozen_backbone_norms(model)
    if freeze_at:
        freeze_backbone(model, freeze_at)
    model.train()
    for bn in frozen:
        bn.eval()
    return model, frozen


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-9) -> bool:
    """Equal up to float64 rounding across ~50 layers: the difference's norm within rel of the norm."""
    return float((got - want).norm()) <= rel * float(want.norm()) + 1e-8


def _outputs_and_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same drop-path draws (TopFormer) in both runs
    out = model(x)
    values = out.values() if isinstance(out, dict) else out
    tensors = [v for v in values if torch.is_tensor(v) and v.is_floating_point()]
    sum(t.float().square().mean() for t in tensors).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [t.detach() for t in tensors], grads


@pytest.mark.parametrize("name, freeze_at, pairs, overrides", [
    ("mobileinst-mobilenetv2", 3, 52, STRIDE4), ("mobileinst-efficientnet-lite0", 3, 49, STRIDE4),
    ("mobileinst-topformer-t", 0, 60, STRIDE4), ("mobileinst-seaformer-t", 0, 67, {})])
def test_folding_keeps_outputs_gradients_and_keys(name, freeze_at, pairs, overrides):
    model, frozen = _model(name, freeze_at, overrides)
    reference = copy.deepcopy(model)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 96, 128, dtype=torch.float64) * 255
    want_out, want_grads = _outputs_and_grads(reference, x)

    n = fold_frozen_batchnorms(model, frozen)
    assert n == len(frozen) == pairs  # every backbone BN follows a convolution
    got_out, got_grads = _outputs_and_grads(model, x)
    assert len(got_out) == len(want_out)
    assert all(_close(a, b) for a, b in zip(got_out, want_out))
    assert got_grads.keys() == want_grads.keys()
    assert any(k.startswith("backbone.") for k in got_grads)  # the trained stages get gradients
    assert [k for k in want_grads if not _close(got_grads[k], want_grads[k], 1e-7)] == []
    state = model.state_dict()
    assert state.keys() == keys.keys()
    # the backbone (every folded pair) unchanged; the decoder's BNs ran in training mode
    assert all(torch.equal(state[k], keys[k]) for k in keys if k.startswith("backbone."))
    ref_state = reference.state_dict()
    assert all(_close(state[k].double(), ref_state[k].double()) for k in keys)


def test_only_frozen_norms_fold_and_unfold_restores_the_classes():
    model, frozen = _model()
    some = frozen[:5]
    assert fold_frozen_batchnorms(model, some) == 5
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(FoldedConv2d) == 5 and kinds.count(FoldedBatchNorm2d) == 5
    folded_copy = copy.deepcopy(model)  # the copy's convolutions fold the copy's own BNs
    for conv in (m for m in folded_copy.modules() if type(m) is FoldedConv2d):
        assert any(conv.folded_bn is bn for bn in folded_copy.modules())
    unfold_batchnorms(model)
    assert not any(isinstance(m, (FoldedConv2d, FoldedBatchNorm2d)) for m in model.modules())
    assert not any(hasattr(m, "folded_bn") for m in model.modules())


def test_trainer_folds_only_its_training_model(tmp_path):
    from mobileinst.data.synthetic import make_synthetic_coco
    from mobileinst.train.config import TrainConfig
    from mobileinst.train.engine import Trainer

    data = make_synthetic_coco(tmp_path / "data", n_train=4, n_val=2, seed=0)
    common = dict(data=str(data), model="mobileinst-mobilenetv2", imgsz=96, batch=2, iters=2, workers=0,
                  device="cpu", freeze_backbone_bn=True, freeze_at=3, ema=True, num_queries=8)
    trainer = Trainer(TrainConfig(out_dir=str(tmp_path / "run"), **common))
    assert sum(type(m) is FoldedConv2d for m in trainer.model.modules()) == 52
    assert not any(type(m) is FoldedConv2d for m in trainer.ema.module.modules())
    trainer.lock.release()
    plain = Trainer(TrainConfig(out_dir=str(tmp_path / "plain"), fold_frozen_bn=False, **common))
    assert not any(type(m) is FoldedConv2d for m in plain.model.modules())
    plain.lock.release()
