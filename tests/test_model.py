"""The assembled network: every variant builds, runs, trains, and infers; the registry and info."""
import pytest
import torch

from mobileinst import build_model, list_models
from mobileinst.cli import main
from mobileinst.errors import MobileInstError
from mobileinst.models.registry import get_config

ALL = list_models()


def test_registry_names():
    assert len(ALL) == 18
    for b in ("topformer-t", "topformer-s", "topformer-b", "seaformer-t", "seaformer-s",
              "seaformer-b", "seaformer-l", "mobilenetv2", "efficientnet-lite0"):
        assert f"mobileinst-{b}" in ALL and f"mobileinst-{b}-repro" in ALL
    assert get_config("mobileinst-topformer-t-repro").mask_dim == 256
    with pytest.raises(MobileInstError, match="unknown model"):
        build_model("mobileinst-nope")


@pytest.mark.parametrize("name", ALL)
def test_forward_shapes_two_sizes_batch2(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=5).eval()
    for h, w in ((96, 160), (128, 64)):  # multiples of 32 that are not all multiples of 64
        with torch.no_grad():
            out = model.forward_raw(torch.rand(2, 3, h, w) * 255)
        n = model.cfg.num_queries
        assert out["pred_logits"].shape == (2, n, 5)
        assert out["pred_scores"].shape == (2, n, 1)
        assert out["pred_kernels"].shape == (2, n, model.cfg.kernel_dim)
        assert out["pred_masks"].shape == (2, n, h // 4, w // 4)
        assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("name", ["mobileinst-topformer-t", "mobileinst-seaformer-t",
                                  "mobileinst-mobilenetv2", "mobileinst-topformer-t-repro"])
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=3).train()
    # the official init zeroes a few BN gammas (attention projections); a pretrained checkpoint
    # has them non-zero, and only then can gradient reach the layers before them
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
    out = model(torch.rand(2, 3, 128, 96) * 255)
    loss = sum(v.float().pow(2).mean() for v in out.values())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:10]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    dead = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not dead, dead[:10]


def test_deterministic_under_seed():
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = build_model("mobileinst-seaformer-t", num_classes=4).eval()
        torch.manual_seed(7)
        x = torch.rand(1, 3, 96, 128) * 255
        with torch.no_grad():
            outs.append(model.forward_raw(x))
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k]), k


def test_inference_returns_full_resolution_instances():
    torch.manual_seed(0)
    model = build_model("mobileinst-topformer-t", num_classes=3).eval()
    model.inference = type(model.inference)(score_threshold=0.0)  # keep every query
    with torch.no_grad():
        res = model(torch.rand(2, 3, 128, 160) * 255, image_sizes=[(120, 150), (128, 160)],
                    orig_sizes=[(240, 300), (64, 80)])
    assert len(res) == 2
    for r, (h, w) in zip(res, [(240, 300), (64, 80)]):
        k = len(r["scores"])
        assert k == model.cfg.num_queries  # no NMS, nothing silently dropped
        assert r["masks"].shape == (k, h, w) and r["masks"].dtype == torch.bool
        assert r["labels"].dtype == torch.int64 and (r["labels"] < 3).all()
        assert (r["scores"][:-1] >= r["scores"][1:]).all()  # sorted


def test_state_dict_keys_are_stable():
    sd = build_model("mobileinst-topformer-t").state_dict()
    assert "backbone.tpm.stem.0.c.weight" in sd  # the official layout under backbone.
    assert "backbone.SIM.1.local_embedding.conv.weight" in sd
    assert "instance_decoder.class_head.bias" in sd
    assert "mask_decoder.mask_proj.weight" in sd
    assert not any("pixel_mean" in k for k in sd)  # normalisation constants are not weights


def test_class_bias_has_focal_prior():
    model = build_model("mobileinst-topformer-t")
    b = model.instance_decoder.class_head.bias
    assert torch.allclose(torch.sigmoid(b), torch.full_like(b, 0.01), atol=1e-6)


def test_info_cli(capsys):
    assert main(["info", "mobileinst-topformer-t", "--imgsz", "256"]) == 0
    out = capsys.readouterr().out
    assert "backbone" in out and "mask_decoder" in out and "instance_decoder" in out
    assert "1.370" in out  # TopFormer-T: 1,369,920 parameters (official layer tables)
    assert main(["info", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err


def _upsample_reference(prob, padded, size, orig):
    m = torch.nn.functional.interpolate(prob[None], size=padded, mode="bilinear", align_corners=False)
    m = m[:, :, : size[0], : size[1]]
    return torch.nn.functional.interpolate(m, size=orig, mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize("padded,size,orig", [((640, 640), (480, 640), (480, 640)),  # letterbox, no resize
                                              ((256, 320), (250, 320), (250, 320)),
                                              ((256, 320), (250, 320), (500, 641)),  # resized
                                              ((96, 64), (77, 35), (25, 17))])
def test_upsample_masks_is_the_plain_recipe_bit_for_bit(padded, size, orig):
    from mobileinst.models.postprocess import upsample_masks
    prob = torch.rand(3, padded[0] // 4, padded[1] // 4, generator=torch.Generator().manual_seed(0))
    got = upsample_masks(prob, padded, size, orig)
    assert got.shape == (3, *orig)
    assert torch.equal(got, _upsample_reference(prob, padded, size, orig))


def test_mask_pooled_objectness():
    """mask_pooled_obj adds to the objectness a linear map of the mean and spread of M under each
    query's own mask, with no gradient into the kernels; weights `mask_quality.*`, absent by
    default, zero at initialisation (the model starts as without it)."""
    torch.manual_seed(0)
    assert not any(k.startswith("mask_quality") for k in build_model("mobileinst-mobilenetv2").state_dict())
    model = build_model("mobileinst-mobilenetv2", num_classes=3, num_queries=6, mask_pooled_obj=True).train()
    images = torch.rand(2, 3, 96, 128) * 255
    mask_feats, f_mask, x6 = model.features(images)
    dec = model.instance_decoder(x6, f_mask)
    assert torch.equal(model.forward_raw(images)["pred_scores"], dec["pred_scores"])  # zero-initialised
    with torch.no_grad():
        model.mask_quality.weight.normal_()
        model.mask_quality.bias.fill_(0.3)
    out = model.forward_raw(images)
    m = mask_feats.flatten(2)  # (B, E, P)
    w = torch.einsum("bne,bep->bnp", dec["pred_kernels"], m).sigmoid()  # (B, N, P)
    norm = w.sum(-1, keepdim=True) + 1
    mean = torch.einsum("bnp,bep->bne", w, m) / norm
    spread = torch.einsum("bnp,bep->bne", w, m * m) / norm - mean ** 2
    expected = dec["pred_scores"] + torch.cat([mean, spread], -1) @ model.mask_quality.weight.T + 0.3
    assert torch.allclose(out["pred_scores"], expected, atol=1e-4)
    assert torch.equal(out["pred_logits"], dec["pred_logits"])  # the class is untouched
    assert (spread > -1e-4).all()  # a variance
    out["pred_scores"].sum().backward()
    assert model.instance_decoder.kernel_head.weight.grad is None  # no gradient into the kernels
    assert model.mask_quality.weight.grad.abs().sum() > 0
    assert model.eval().inference_outputs(images)[1].shape == (2, 6, 1)


def test_mask_pooled_class_logits():
    """mask_pooled_cls adds class evidence pooled under each query's own mask, with no class
    gradient into the kernels; the option's weights are `mask_class.*`, absent by default."""
    torch.manual_seed(0)
    assert not any(k.startswith("mask_class") for k in build_model("mobileinst-topformer-t").state_dict())
    model = build_model("mobileinst-topformer-t", num_classes=3, num_queries=6, mask_pooled_cls=True).train()
    with torch.no_grad():
        model.mask_class.weight.normal_()
    images = torch.rand(2, 3, 96, 128) * 255
    out = model.forward_raw(images)
    mask_feats, f_mask, x6 = model.features(images)
    dec = model.instance_decoder(x6, f_mask)
    weight = torch.einsum("bne,bep->bnp", dec["pred_kernels"], mask_feats.flatten(2)).sigmoid()  # (B, N, P)
    pooled = torch.einsum("bnp,bep->bne", weight, mask_feats.flatten(2)) / (weight.sum(-1, keepdim=True) + 1)
    expected = dec["pred_logits"] + pooled @ model.mask_class.weight.T + model.mask_class.bias
    assert torch.allclose(out["pred_logits"], expected, atol=1e-4)
    out["pred_logits"].sum().backward()
    assert model.instance_decoder.kernel_head.weight.grad is None  # no class gradient into the kernels
    assert model.mask_class.weight.grad.abs().sum() > 0
