"""Strict pretrained-weight loading (mobileinst.models.weights) against fabricated official files.

The files are built from `official_layouts` (derived from the spec tables, not from our models),
so these tests check both that our backbones have the official layouts and that the loader fills
every tensor of them, or refuses with a readable message and loads nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mobileinst.errors import CheckpointError, MobileInstError
from mobileinst.models.mobilenetv2 import mobilenetv2
from mobileinst.models.weights import LoadReport, describe, load_backbone_weights

from golden import golden_path
from official_layouts import (
    MOBILENETV2_FEATURE_PARAMS, SEAFORMER_ENTRIES, SEAFORMER_PARAMS, TOPFORMER_PARAMS,
    fabricate_checkpoint, fabricate_state_dict, mobilenetv2_imagenet_layout, mobilenetv2_layout,
    param_count, seaformer_imagenet_layout, seaformer_layout, topformer_imagenet_layout,
    topformer_layout,
)



def build(family: str, variant: str) -> nn.Module:
    if family == "topformer":
        from mobileinst.models.topformer import topformer
        return topformer(variant)
    if family == "seaformer":
        from mobileinst.models.seaformer import seaformer
        return seaformer(variant)
    return mobilenetv2(variant)


def layout(family: str, variant: str) -> dict[str, tuple[int, ...]]:
    if family == "topformer":
        return topformer_layout(variant)
    if family == "seaformer":
        return seaformer_layout(variant)
    return mobilenetv2_layout()


def save(tmp_path: Path, obj: object, name: str = "ckpt.pth") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_equal_state(module: nn.Module, expected: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    """Every tensor of module (except under `skip`) equals expected's: nothing stayed random."""
    for key, value in module.state_dict().items():
        if key.startswith(skip):
            continue
        assert key in expected, key
        assert torch.equal(value, expected[key].to(value.dtype)), key


# --------------------------------------------------------------- the independent layouts vs the spec


@pytest.mark.parametrize("variant", ["t", "s", "b"])
def test_topformer_layout_matches_spec_counts(variant):
    assert param_count(topformer_layout(variant)) == TOPFORMER_PARAMS[variant]


@pytest.mark.parametrize("variant", ["t", "s", "b", "l"])
def test_seaformer_layout_matches_spec_counts(variant):
    lay = seaformer_layout(variant)
    assert param_count(lay) == SEAFORMER_PARAMS[variant]
    assert len(lay) == SEAFORMER_ENTRIES[variant]
    # the classifier adds Linear(C_last, 1000): the spec's 1,781,096 / 4,105,656 / 8,742,664 / 14,046,504
    cls = {"t": 1_781_096, "s": 4_105_656, "b": 8_742_664, "l": 14_046_504}[variant]
    assert param_count(seaformer_imagenet_layout(variant)) == cls


def test_layouts_match_spec_example_keys():
    top_b = topformer_layout("b")
    assert top_b["tpm.layer2.conv.0.c.weight"] == (64, 16, 1, 1)
    assert top_b["tpm.layer2.conv.2.c.weight"] == (64, 1, 3, 3)
    assert top_b["tpm.layer1.conv.0.c.weight"] == (16, 1, 3, 3)  # t = 1: depthwise first
    assert top_b["trans.transformer_blocks.3.attn.to_v.c.weight"] == (256, 384, 1, 1)
    assert top_b["SIM.1.local_embedding.conv.weight"] == (256, 64, 1, 1)
    for key in ("tpm.stem.0.c.weight", "tpm.stem.0.bn.running_mean",
                "trans.transformer_blocks.0.attn.proj.1.bn.weight",
                "trans.transformer_blocks.0.mlp.dwconv.bias", "SIM.3.global_act.bn.running_var"):
        assert key in top_b
    assert not any(k.startswith("SIM.0.") for k in top_b)
    sea_b = seaformer_layout("b")
    expected = {
        "smb1.stem_block.0.c.weight": (16, 3, 3, 3),
        "smb1.layer1.conv.0.c.weight": (16, 1, 3, 3),
        "smb1.layer2.conv.0.c.weight": (64, 16, 1, 1),
        "smb2.layer1.conv.2.c.weight": (96, 1, 5, 5),
        "smb5.layer1.conv.0.c.weight": (1152, 192, 1, 1),
        "trans1.transformer_blocks.0.attn.to_v.c.weight": (256, 192, 1, 1),
        "trans1.transformer_blocks.0.attn.pos_emb_rowq.pos_embed": (1, 128, 16),
        "trans1.transformer_blocks.0.attn.dwconv.c.weight": (512, 1, 3, 3),
        "trans2.transformer_blocks.3.attn.proj_encode_column.1.c.weight": (384, 384, 1, 1),
        "trans2.transformer_blocks.3.attn.proj.1.bn.weight": (256,),
        "trans2.transformer_blocks.3.mlp.fc1.c.weight": (1024, 256, 1, 1),
        "trans2.transformer_blocks.3.mlp.dwconv.bias": (1024,),
    }
    assert {k: sea_b[k] for k in expected} == expected
    assert seaformer_layout("l")["smb1.layer1.conv.0.c.weight"] == (96, 32, 1, 1)  # Large: t = 3


def test_mobilenetv2_layout_matches_torchvision_counts():
    lay = mobilenetv2_layout()
    assert param_count(lay) == MOBILENETV2_FEATURE_PARAMS == 2_223_872
    assert lay["features.1.conv.0.0.weight"] == (32, 1, 3, 3)  # t = 1: depthwise first
    assert lay["features.1.conv.1.weight"] == (16, 32, 1, 1)
    assert lay["features.2.conv.0.0.weight"] == (96, 16, 1, 1)
    assert lay["features.17.conv.2.weight"] == (320, 960, 1, 1)
    assert lay["features.18.0.weight"] == (1280, 320, 1, 1)


@pytest.mark.parametrize("name", ["topformer-t", "topformer-b", "seaformer-t", "seaformer-s",
                                  "seaformer-b", "seaformer-l"])
def test_layouts_match_golden_state_dicts(name):
    """The golden files hold state_dicts written by the official code: same keys and shapes."""
    state = torch.load(golden_path(name), map_location="cpu", weights_only=True)["state_dict"]
    family, variant = name.split("-")
    assert {k: tuple(v.shape) for k, v in state.items()} == layout(family, variant)


@pytest.mark.parametrize("name", ["topformer-t", "topformer-b", "seaformer-t", "seaformer-l"])
def test_golden_files_load(name):
    """A file written by the official code (wrapped under `state_dict`, with other entries) loads."""
    path = golden_path(name)
    family, variant = name.split("-")
    model = build(family, variant)
    report = load_backbone_weights(model, path)
    assert report.source == "state_dict" and report.fresh == [] and report.num_ignored == 0
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert_equal_state(model, state)


# ------------------------------------------------------------------------ our models vs the layouts

ALL_BACKBONES = [("topformer", v) for v in "tsb"] + [("seaformer", v) for v in "tsbl"] + [("mobilenetv2", "1.0")]


@pytest.mark.parametrize("family,variant", ALL_BACKBONES)
def test_model_state_dict_is_the_official_layout(family, variant):
    model = build(family, variant)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = layout(family, variant)
    assert sorted(set(ours) - set(official)) == []
    assert sorted(set(official) - set(ours)) == []
    assert {k for k in ours if ours[k] != official[k]} == set()
    names = {"topformer": "TopFormer", "seaformer": "SeaFormer"}
    expected_name = f"{names[family]}-{variant.upper()}" if family in names else "MobileNetV2"
    assert describe(ours) == expected_name


# ------------------------------------------------------------------------------- successful loads

LOAD_CASES = [
    ("topformer", "t", None, ""),
    ("topformer", "t", "state_dict", "module."),
    ("topformer", "t", "model", "backbone."),
    ("topformer", "t", "state_dict_ema", "module.backbone."),
    ("topformer", "s", "state_dict", "backbone."),
    ("topformer", "b", None, "module."),
    ("seaformer", "t", "state_dict_ema", ""),
    ("seaformer", "s", None, "backbone."),
    ("seaformer", "b", "model", "module."),
    ("seaformer", "l", "state_dict", "module.backbone."),
    ("mobilenetv2", "1.0", None, ""),
    ("mobilenetv2", "1.0", "state_dict_ema", "module."),
]
HEADS = {  # what published files carry besides the backbone, ignored by the loader
    "topformer": {"decode_head.conv_seg.weight": (150, 256, 1, 1), "decode_head.conv_seg.bias": (150,)},
    "seaformer": {"linear.weight": (1000, 0), "linear.bias": (1000,)},
    "mobilenetv2": {"classifier.1.weight": (1000, 1280), "classifier.1.bias": (1000,)},
}


@pytest.mark.parametrize("family,variant,wrap,prefix", LOAD_CASES)
def test_official_checkpoint_loads_every_tensor(tmp_path, family, variant, wrap, prefix):
    lay = layout(family, variant)
    head = dict(HEADS[family])
    if family == "seaformer":
        head["linear.weight"] = seaformer_imagenet_layout(variant)["linear.weight"]
    path = save(tmp_path, fabricate_checkpoint(lay, seed=7, wrap=wrap, prefix=prefix, add_classifier=head))
    model = build(family, variant)

    report = load_backbone_weights(model, path)

    assert_equal_state(model, fabricate_state_dict(lay, seed=7))  # EMA values, not the decoy
    assert isinstance(report, LoadReport)
    assert report.num_loaded == len(lay) and report.fresh == []
    assert report.num_ignored == len(head) and report.unexpected == []
    assert report.source == (wrap or "<root>")
    assert report.prefix == prefix
    assert f"loaded {len(lay)} backbone tensors" in str(report) and path.name in str(report)


def test_topformer_imagenet_file_without_sim_reports_sim_fresh(tmp_path):
    lay = topformer_imagenet_layout("t")
    path = save(tmp_path, fabricate_checkpoint(lay, seed=3, wrap="state_dict_ema"))
    model = build("topformer", "t")
    sim_before = {k: v for k, v in snapshot(model).items() if k.startswith("SIM.")}

    report = load_backbone_weights(model, path)

    assert_equal_state(model, fabricate_state_dict(lay, seed=3), skip=("SIM.",))
    sim_keys = [k for k in topformer_layout("t") if k.startswith("SIM.")]
    assert sorted(report.fresh) == sorted(sim_keys)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sim_before.items())
    assert report.num_ignored == 4  # head.bn.*, classifier.*
    assert "initialised fresh (SIM.* x" in str(report)


def test_segmentor_checkpoint_loads_backbone_part(tmp_path):
    """An mmseg ADE20K file: backbone.* plus decode_head.*; the official loader loads nothing."""
    lay = seaformer_layout("t")
    head = {"decode_head.fuse1.local_embedding.conv.weight": (64, 32, 1, 1),
            "decode_head.conv_seg.weight": (150, 64, 1, 1)}
    ckpt = fabricate_checkpoint(lay, seed=5, wrap="state_dict", prefix="backbone.")
    ckpt["state_dict"] |= fabricate_state_dict(head, seed=6)  # no prefix stripped off these
    model = build("seaformer", "t")
    report = load_backbone_weights(model, save(tmp_path, ckpt))
    assert_equal_state(model, fabricate_state_dict(lay, seed=5))
    assert report.prefix == "backbone." and report.num_ignored == 2


def test_loads_into_module_with_backbone_attribute(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = build("topformer", "t")
            self.head = nn.Conv2d(128, 4, 1)

    net = Net()
    head_before = snapshot(net.head)
    lay = topformer_layout("t")
    # a full-network checkpoint: backbone.* and head.*; only the backbone is filled
    ckpt = fabricate_checkpoint(lay, seed=11, prefix="backbone.")
    ckpt |= {"head.weight": torch.ones(4, 128, 1, 1), "head.bias": torch.ones(4)}
    report = load_backbone_weights(net, save(tmp_path, {"model": ckpt}))
    assert_equal_state(net.backbone, fabricate_state_dict(lay, seed=11))
    assert all(torch.equal(net.head.state_dict()[k], v) for k, v in head_before.items())
    assert report.num_loaded == len(lay) and report.num_ignored == 2


def test_missing_num_batches_tracked_is_fine(tmp_path):
    lay = {k: s for k, s in mobilenetv2_layout().items() if not k.endswith("num_batches_tracked")}
    model = build("mobilenetv2", "1.0")
    report = load_backbone_weights(model, save(tmp_path, fabricate_checkpoint(lay, seed=2)))
    assert report.num_loaded == len(lay) and report.fresh == []
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in fabricate_state_dict(lay, seed=2).items())


# ---------------------------------------------------------------------------------- refused loads


def refuse(model: nn.Module, path: Path) -> str:
    """Load, expect CheckpointError naming the file, and check nothing changed in the model."""
    before = snapshot(model)
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(model, path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    assert info.value.__cause__ is None  # no chained stack trace
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # no partial load
    return message


def test_other_variant_is_refused(tmp_path):
    path = save(tmp_path, fabricate_checkpoint(topformer_layout("b"), seed=1, wrap="state_dict_ema"),
                "topformer-b.pth")
    message = refuse(build("topformer", "t"), path)
    # layer2 is [3, 4, c, 2] from 16 channels: the expand conv is 16 -> 64 in both, the projection differs
    assert "'tpm.layer2.conv.4.c.weight': checkpoint (32, 64, 1, 1) vs model (16, 64, 1, 1)" in message
    assert "'tpm.layer3.conv.0.c.weight': checkpoint (96, 32, 1, 1) vs model (48, 16, 1, 1)" in message
    assert "shape-mismatched" in message
    assert "looks like a TopFormer-B backbone" in message and "TopFormer-T" in message
    assert "Nothing was loaded" in message


def test_other_family_is_refused(tmp_path):
    path = save(tmp_path, fabricate_checkpoint(seaformer_imagenet_layout("t"), seed=1), "sea-t.pth")
    message = refuse(build("topformer", "t"), path)
    assert "missing" in message and "'tpm.stem.0.c.weight'" in message
    assert "looks like a SeaFormer-T backbone" in message

    path = save(tmp_path, fabricate_checkpoint(mobilenetv2_imagenet_layout(), seed=1), "mnv2.pth")
    message = refuse(build("seaformer", "t"), path)
    assert "looks like a MobileNetV2 backbone" in message


def test_missing_backbone_tensor_is_refused(tmp_path):
    lay = topformer_imagenet_layout("s")
    del lay["trans.transformer_blocks.2.mlp.dwconv.weight"]
    path = save(tmp_path, fabricate_checkpoint(lay, seed=1, wrap="model"))
    message = refuse(build("topformer", "s"), path)
    assert "1 missing" in message and "'trans.transformer_blocks.2.mlp.dwconv.weight'" in message


def test_partial_sim_is_refused(tmp_path):
    lay = {k: s for k, s in topformer_layout("t").items() if not k.startswith("SIM.2.")}
    message = refuse(build("topformer", "t"), save(tmp_path, fabricate_checkpoint(lay, seed=1)))
    assert "'SIM.2.local_embedding.conv.weight'" in message


def test_unknown_prefix_is_refused_with_hint(tmp_path):
    path = save(tmp_path, fabricate_checkpoint(seaformer_layout("t"), seed=1, prefix="encoder."))
    message = refuse(build("seaformer", "t"), path)
    assert "unknown prefix 'encoder.'" in message


def test_non_finite_values_are_refused(tmp_path):
    ckpt = fabricate_checkpoint(mobilenetv2_layout(), seed=0)
    ckpt["features.5.conv.1.1.running_var"][3] = float("nan")
    message = refuse(build("mobilenetv2", "1.0"), save(tmp_path, ckpt))
    assert "NaN or infinite" in message and "'features.5.conv.1.1.running_var'" in message


def test_bad_files_are_refused(tmp_path):
    model = build("mobilenetv2", "1.0")
    good = save(tmp_path, fabricate_checkpoint(mobilenetv2_layout(), seed=0), "good.pth")
    data = good.read_bytes()

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in refuse(model, truncated)

    as_json = tmp_path / "weights.json"
    as_json.write_text(json.dumps({"features.0.0.weight": [1.0, 2.0]}))
    assert "not a PyTorch checkpoint" in refuse(model, as_json)

    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    assert "not a PyTorch checkpoint" in refuse(model, text)

    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert "empty" in refuse(model, empty)

    assert "not found" in refuse(model, tmp_path / "does-not-exist.pth")
    assert "not a file" in refuse(model, tmp_path)

    no_tensors = save(tmp_path, {"epoch": 3, "state_dict": {}}, "no-tensors.pth")
    assert "holds no tensors" in refuse(model, no_tensors)

    a_tensor = save(tmp_path, torch.zeros(3), "tensor.pth")
    assert "not a state_dict" in refuse(model, a_tensor)


class _Config:  # a pickled Python object: a weights_only load refuses it
    lr = 0.1


def test_file_needing_pickled_objects_is_refused(tmp_path):
    ckpt = fabricate_checkpoint(mobilenetv2_layout(), seed=0, wrap="state_dict")
    ckpt["cfg"] = _Config()
    message = refuse(build("mobilenetv2", "1.0"), save(tmp_path, ckpt))
    assert "pickled Python objects" in message and "_Config" in message


def test_checkpoint_error_is_a_mobileinst_error():
    assert issubclass(CheckpointError, MobileInstError)
