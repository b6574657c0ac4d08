"""MobileNetV2 backbone: torchvision layout and size, X3..X6 strides and widths."""
from __future__ import annotations

import pytest
import torch

from mobileinst.models.mobilenetv2 import MobileNetV2, mobilenetv2


def test_parameter_count_is_torchvision_features():
    model = mobilenetv2()
    # torchvision mobilenet_v2: 3,504,872 with the classifier (1280 * 1000 + 1000)
    assert sum(p.numel() for p in model.parameters()) == 3_504_872 - 1_281_000 == 2_223_872
    assert model.out_channels == (32, 96, 320, 1280)
    assert MobileNetV2.optional_key_prefixes == ()


@pytest.mark.parametrize("hw", [(224, 288), (160, 96), (100, 70)])
def test_forward_strides_and_channels(hw):
    model = mobilenetv2("1.0").eval()
    h, w = hw
    with torch.no_grad():
        outs = model(torch.randn(2, 3, h, w))
    assert len(outs) == 4
    for out, c, stride in zip(outs, model.out_channels, (8, 16, 32, 64)):
        assert out.shape == (2, c, -(-h // stride), -(-w // stride))
    # X6 is the average of features[18]'s stride-32 map over 2x2 bins (exact when sides divide)
    if h % 64 == 0 and w % 64 == 0:
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            x32 = model.features(x)
            ref = torch.nn.functional.avg_pool2d(x32, 2)
            assert torch.allclose(model(x)[3], ref, atol=1e-6)


def test_pooled_x6_matches_adaptive_pool():
    model = mobilenetv2().eval()
    x = torch.randn(1, 3, 224, 288)
    with torch.no_grad():
        x32 = model.features(x)  # (1, 1280, 7, 9)
        ref = torch.nn.functional.adaptive_avg_pool2d(x32, (4, 5))
        assert torch.allclose(model(x)[3], ref, atol=1e-5)


def test_init_is_torchvision_like():
    model = mobilenetv2()
    bn = model.features[0][1]
    assert torch.equal(bn.weight, torch.ones(32)) and torch.equal(bn.bias, torch.zeros(32))
    conv = model.features[18][0]  # kaiming normal, fan_out = 1280: std sqrt(2 / 1280)
    assert abs(conv.weight.std().item() - (2 / 1280) ** 0.5) < 0.002


def test_unknown_width_is_refused():
    with pytest.raises(ValueError):
        mobilenetv2("0.5")
