"""TopFormer and SeaFormer backbones: official key layout, golden outputs, shapes.

The golden files (found by `golden.py`; not in the repository) hold the official implementations'
(hustvl/TopFormer, fudan-zvg/SeaFormer) outputs
for stored state_dicts; a faithful backbone loads them strictly and matches to 1e-4.
"""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from mobileinst.models.layers import make_divisible
from mobileinst.models.seaformer import SEAFORMER_CONFIGS, SeaFormer, seaformer
from mobileinst.models.topformer import TOPFORMER_CONFIGS, TopFormer, topformer

from golden import golden_path

TOL = 1e-4

# official backbones' parameter counts (hustvl/TopFormer mmseg/models/backbones/topformer.py, fudan-zvg/SeaFormer
# seaformer-seg/mmseg/models/backbones/seaformer.py, with their local_configs): BN affine + pos embeddings,
# no running stats
TOPFORMER_PARAMS = {"t": 1_369_920, "s": 2_968_464, "b": 4_958_048}
SEAFORMER_PARAMS = {"t": 1_620_096, "s": 3_912_656, "b": 8_485_664, "l": 13_725_504}
SEAFORMER_SD_ENTRIES = {"t": 426, "s": 558, "b": 690, "l": 762}
OUT_CHANNELS = {
    ("topformer", "t"): (128, 128, 128, 208),
    ("topformer", "s"): (192, 192, 192, 296),
    ("topformer", "b"): (256, 256, 256, 384),
    ("seaformer", "t"): (32, 64, 128, 160),
    ("seaformer", "s"): (48, 96, 160, 192),
    ("seaformer", "b"): (64, 128, 192, 256),
    ("seaformer", "l"): (128, 192, 256, 320),
}
BUILDERS = {"topformer": topformer, "seaformer": seaformer}


@lru_cache(maxsize=None)
def golden(name: str) -> dict:
    return torch.load(golden_path(name), weights_only=True)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("variant", ["t", "s", "b"])
def test_topformer_param_count(variant: str) -> None:
    assert n_params(topformer(variant)) == TOPFORMER_PARAMS[variant]


@pytest.mark.parametrize("variant", ["t", "s", "b", "l"])
def test_seaformer_param_count_and_entries(variant: str) -> None:
    m = seaformer(variant)
    assert n_params(m) == SEAFORMER_PARAMS[variant]
    assert len(m.state_dict()) == SEAFORMER_SD_ENTRIES[variant]


@pytest.mark.parametrize("family,variant", list(OUT_CHANNELS))
def test_out_channels(family: str, variant: str) -> None:
    assert BUILDERS[family](variant).out_channels == OUT_CHANNELS[(family, variant)]


def test_topformer_configs() -> None:
    """embed_dim = sum(channels) (spec table: 208 / 296 / 384); kept layers have those widths."""
    assert {v: c.embed_dim for v, c in TOPFORMER_CONFIGS.items()} == {"t": 208, "s": 296, "b": 384}
    for cfg in TOPFORMER_CONFIGS.values():
        assert tuple(make_divisible(cfg.cfgs[i][2], 8) for i in cfg.embed_out_indice) == cfg.channels


def test_official_key_examples() -> None:
    """Example keys and shapes from the spec ("Example full keys", "State_dict keys")."""
    sd = topformer("b").state_dict()
    assert sd["tpm.layer2.conv.0.c.weight"].shape == (64, 16, 1, 1)
    assert sd["tpm.layer2.conv.2.c.weight"].shape == (64, 1, 3, 3)
    assert sd["tpm.layer1.conv.0.c.weight"].shape == (16, 1, 3, 3)
    assert sd["trans.transformer_blocks.3.attn.to_v.c.weight"].shape == (256, 384, 1, 1)
    assert "trans.transformer_blocks.0.attn.proj.1.bn.weight" in sd
    assert "trans.transformer_blocks.0.mlp.dwconv.bias" in sd
    assert sd["SIM.1.local_embedding.conv.weight"].shape == (256, 64, 1, 1)
    assert "SIM.3.global_act.bn.running_var" in sd
    assert not any(k.startswith("SIM.0.") for k in sd)  # nn.Identity at level 0

    sd = seaformer("b").state_dict()
    assert sd["smb1.stem_block.0.c.weight"].shape == (16, 3, 3, 3)
    assert sd["smb1.layer2.conv.0.c.weight"].shape == (64, 16, 1, 1)
    assert sd["smb2.layer1.conv.2.c.weight"].shape == (96, 1, 5, 5)
    assert sd["smb5.layer1.conv.0.c.weight"].shape == (1152, 192, 1, 1)
    assert sd["trans1.transformer_blocks.0.attn.pos_emb_rowq.pos_embed"].shape == (1, 128, 16)
    assert sd["trans1.transformer_blocks.0.attn.dwconv.c.weight"].shape == (512, 1, 3, 3)
    assert sd["trans2.transformer_blocks.3.attn.proj_encode_column.1.c.weight"].shape == (384, 384, 1, 1)
    assert sd["trans2.transformer_blocks.3.mlp.dwconv.bias"].shape == (1024,)
    assert seaformer("l").state_dict()["smb1.layer1.conv.0.c.weight"].shape == (96, 32, 1, 1)


def test_optional_key_prefixes_cover_exactly_sim() -> None:
    """An ImageNet TopFormer checkpoint (no SIM.*) misses only keys under optional_key_prefixes."""
    assert TopFormer.optional_key_prefixes == ("SIM.",)
    assert SeaFormer.optional_key_prefixes == ()
    m = topformer("t")
    cls_ckpt = {k: v for k, v in m.state_dict().items() if not k.startswith("SIM.")}
    missing, unexpected = topformer("t").load_state_dict(cls_ckpt, strict=False)
    assert missing and all(k.startswith(TopFormer.optional_key_prefixes) for k in missing)
    assert not unexpected


def test_fresh_init() -> None:
    """Conv weights N(0, 2 / fan_out); BN gamma 1 except the zero-initialised attention projections."""
    m = seaformer("t")
    attn = m.trans1.transformer_blocks[0].attn
    for proj in (attn.proj, attn.proj_encode_row, attn.proj_encode_column):
        assert torch.all(proj[1].bn.weight == 0)
    assert torch.all(attn.to_q.bn.weight == 1) and torch.all(attn.to_q.bn.bias == 0)
    w = m.smb5.layer1.conv[0].c.weight  # 1x1 expand 128 -> 768: std sqrt(2 / 768)
    assert w.shape == (768, 128, 1, 1)
    assert abs(w.std().item() / (2 / 768) ** 0.5 - 1) < 0.05
    t = topformer("t")
    assert torch.all(t.trans.transformer_blocks[0].attn.proj[1].bn.weight == 0)
    assert torch.all(t.SIM[1].global_act.bn.weight == 1)
    assert torch.all(t.trans.transformer_blocks[0].mlp.dwconv.bias == 0)


def test_configs_match_golden_seaformer() -> None:
    for v, cfg in SEAFORMER_CONFIGS.items():
        ref = golden(f"seaformer-{v}")["config"]
        assert [[tuple(r) for r in stage] for stage in ref["cfgs"]] == [list(s) for s in cfg.cfgs]
        assert tuple(ref["channels"]) == cfg.channels
        assert tuple(ref["emb_dims"]) == cfg.emb_dims
        assert tuple(ref["key_dims"]) == cfg.key_dims
        assert tuple(ref["depths"]) == cfg.depths
        assert ref["num_heads"] == cfg.num_heads
        assert tuple(ref["mlp_ratios"]) == cfg.mlp_ratios
        assert ref["attn_ratios"] == cfg.attn_ratio
        assert ref["drop_path_rate"] == cfg.drop_path_rate


def test_make_divisible() -> None:
    assert [make_divisible(c, 8) for c in (16, 24, 32, 96, 160, 320)] == [16, 24, 32, 96, 160, 320]
    assert make_divisible(10, 8) == 16 and make_divisible(3, 8) == 8


# ---------------------------------------------------------------- golden outputs


@pytest.mark.parametrize("variant", ["t", "b"])
@torch.no_grad()
def test_topformer_matches_official(variant: str) -> None:
    g = golden(f"topformer-{variant}")
    m = topformer(variant).eval()
    m.load_state_dict(g["state_dict"], strict=True)
    x3, x4, x5, x6 = m(g["input"])
    for ours, ref in zip((x3, x4, x5), g["local_outputs"]):
        assert max_diff(ours, ref) < TOL
    assert max_diff(x6, g["global_output"]) < TOL
    official = m.forward_official(g["input"])
    assert len(official) == 3 and all(torch.equal(a, b) for a, b in zip(official, (x3, x4, x5)))


@pytest.mark.parametrize("variant", ["t", "s", "b", "l"])
@torch.no_grad()
def test_seaformer_matches_official(variant: str) -> None:
    g = golden(f"seaformer-{variant}")
    m = seaformer(variant).eval()
    m.load_state_dict(g["state_dict"], strict=True)

    # intermediates (T/S/B only; empty for Large) captured by hooks during the same forward
    captured: dict[str, torch.Tensor] = {}
    handles = [
        m.get_submodule(name).register_forward_hook(lambda _m, _i, out, name=name: captured.setdefault(name, out))
        for name in g["intermediates"]
    ]
    outputs = m.forward_official(g["input"])
    for h in handles:
        h.remove()

    assert len(outputs) == len(g["outputs"])
    for ours, ref in zip(outputs, g["outputs"]):
        assert max_diff(ours, ref) < TOL
    for name, ref in g["intermediates"].items():
        assert max_diff(captured[name], ref) < TOL, name

    features = m(g["input"])
    for ours, stride in zip(features, (8, 16, 32, 64)):
        assert max_diff(ours, g["features"][f"stride{stride}"]) < TOL

    odd = m.forward_official(g["input_odd"])  # sides not multiples of 64: pos-embed lengths != 16
    assert len(odd) == len(g["outputs_odd"])
    for ours, ref in zip(odd, g["outputs_odd"]):
        assert max_diff(ours, ref) < TOL


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("family,variant", list(OUT_CHANNELS))
@torch.no_grad()
def test_shapes_multiple_of_32(family: str, variant: str) -> None:
    m = BUILDERS[family](variant).eval()
    for h, w in ((224, 288), (160, 96)):  # multiples of 32, not of 64
        feats = m(torch.randn(2, 3, h, w))
        assert len(feats) == 4
        for f, stride, c in zip(feats, (8, 16, 32, 64), m.out_channels):
            assert f.shape == (2, c, -(-h // stride), -(-w // stride)), (stride, f.shape)
            assert torch.isfinite(f).all()


@pytest.mark.parametrize("family", ["topformer", "seaformer"])
def test_train_mode_backward(family: str) -> None:
    """Training mode (BN batch statistics, drop path active) runs and back-propagates."""
    m = BUILDERS[family]("t").train()
    feats = m(torch.randn(2, 3, 128, 96))
    sum(f.square().mean() for f in feats).backward()
    assert all(p.grad is not None for p in m.parameters())
