"""`mobileinst info`'s cost table: every part of the network is counted, and the parts add up."""
import pytest

from mobileinst.models.factory import build_model
from mobileinst.profile import PARTS, summarize


@pytest.mark.parametrize("name", ["mobileinst-topformer-t", "mobileinst-mobilenetv2"])
def test_every_part_has_its_flops_and_the_parts_add_up(name):
    s = summarize(build_model(name, num_classes=80), 256)
    for part in PARTS:  # the instance decoder's layers are called through its methods: still counted
        assert s.flops[part] > 0, (part, s.flops)
    assert s.flops["mask_head"] > 0
    assert sum(s.flops[p] for p in PARTS) + s.flops["mask_head"] == s.flops["total"]
    # the dual-transformer decoder of 100 queries is a share, not nothing: 3% at 640, 12% at 256
    assert 0.005 < s.flops["instance_decoder"] / s.flops["total"] < 0.25, s.flops
