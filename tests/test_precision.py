"""`amp: auto` (train/precision.py): bf16 on CPUs that compute it natively, fp16 on CUDA, else fp32."""
from __future__ import annotations

import pytest
import torch

from mobileinst.errors import MobileInstError
from mobileinst.train import precision
from mobileinst.train.config import TrainConfig

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_cpu(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert precision.use_amp("auto", CPU) is native
    assert precision.use_amp("auto", CUDA) is True
    assert precision.use_amp(True, CPU) is True and precision.use_amp(False, CUDA) is False
    line = precision.describe("auto", native, CPU)
    assert line == ("amp: auto -> bf16 (this CPU computes bf16 natively)" if native else
                    "amp: auto -> fp32 (this CPU has no AVX512-BF16 or AMX)")


def test_the_probe_answers_a_bool():
    assert isinstance(precision.cpu_has_native_bf16(), bool)


def test_amp_takes_true_false_or_auto_and_nothing_else(tmp_path):
    assert TrainConfig.from_dict({"amp": "auto"}).amp == "auto"
    assert TrainConfig.from_dict({"amp": True}).amp is True
    with pytest.raises(MobileInstError, match=r"amp must be true, false or auto, got 'yes'"):
        TrainConfig.from_dict({"amp": "yes"})
    with pytest.raises(MobileInstError, match=r"amp must be true or false or a string, got 1"):
        TrainConfig.from_dict({"amp": 1})
    with pytest.raises(MobileInstError, match=r"batch must be an integer, got 'two'"):
        TrainConfig.from_dict({"batch": "two"})


def test_the_cpu_preset_asks_for_auto():
    assert TrainConfig.from_yaml("hard_cpu").amp == "auto"


def _trained_model() -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    from mobileinst.models.factory import build_model
    from mobileinst.train.engine import freeze_backbone, frozen_backbone_norms
    from mobileinst.train.fold_bn import fold_frozen_batchnorms

    torch.manual_seed(0)
    model = build_model("mobileinst-mobilenetv2", num_classes=3, num_queries=8, query_proposal=True,
                        mask_stride=4)
    frozen = frozen_backbone_norms(model)
    freeze_backbone(model, 3)
    model.train()
    for bn in frozen:
        bn.eval()
    fold_frozen_batchnorms(model, frozen)
    return model, frozen


def test_trained_depthwise_convolutions_compute_in_fp32_under_bf16_autocast():
    model, _ = _trained_model()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    depthwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)
                 and m.groups > 1 and m.groups == m.in_channels]
    trained = [m for m in depthwise if m.weight.requires_grad]
    assert 0 < len(trained) < len(depthwise)  # the frozen stages' ones stay as they are
    assert precision.depthwise_in_fp32(model) == len(trained)
    assert all(isinstance(m, precision.Fp32Conv) for m in trained)
    assert not any(isinstance(m, precision.Fp32Conv) for m in depthwise if not m.weight.requires_grad)
    assert any(type(m) is precision.Fp32FoldedConv2d for m in trained)  # a fold kept its fold
    state = model.state_dict()
    assert state.keys() == keys.keys() and all(torch.equal(state[k], keys[k]) for k in keys)

    dtypes = {}
    for m in depthwise:
        m.register_forward_hook(lambda mod, inp, out: dtypes.__setitem__(mod, out.dtype) and None)
    x = torch.randn(2, 3, 96, 128).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", torch.bfloat16):
        out = model(x)
    assert all(dtypes[m] is torch.float32 for m in trained)
    assert all(dtypes[m] is torch.bfloat16 for m in depthwise if m not in trained)
    sum(v.float().sum() for v in out.values() if torch.is_tensor(v) and v.is_floating_point()).backward()
    assert all(m.weight.grad is not None and torch.isfinite(m.weight.grad).all() for m in trained)


def test_depthwise_in_fp32_is_the_same_function_in_fp32_and_restores():
    model, _ = _trained_model()
    model.double()
    x = torch.randn(2, 3, 96, 128, dtype=torch.float64)
    want = model(x)["pred_masks"]
    precision.depthwise_in_fp32(model)
    for m in model.modules():  # fp32 inside, so compare an fp32 model
        m.float()
    got = model(x.float())["pred_masks"].double()
    assert (got - want).norm() <= 1e-4 * want.norm()
    precision.restore_depthwise(model)
    assert not any(isinstance(m, precision.Fp32Conv) for m in model.modules())


def test_trainer_computes_depthwise_in_fp32_only_under_cpu_bf16(tmp_path, monkeypatch):
    from mobileinst.data.synthetic import make_synthetic_coco
    from mobileinst.train.engine import Trainer

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    data = make_synthetic_coco(tmp_path / "data", n_train=4, n_val=2, seed=0)
    common = dict(data=str(data), model="mobileinst-mobilenetv2", imgsz=96, batch=2, iters=2, workers=0,
                  device="cpu", freeze_backbone_bn=True, freeze_at=3, ema=True, num_queries=8)
    runs = {}
    for name, extra in {"auto": {"amp": "auto"}, "off": {"amp": False},
                        "kept": {"amp": "auto", "depthwise_fp32": False}}.items():
        trainer = Trainer(TrainConfig(out_dir=str(tmp_path / name), **common, **extra))
        runs[name] = sum(isinstance(m, precision.Fp32Conv) for m in trainer.model.modules())
        assert not any(isinstance(m, precision.Fp32Conv) for m in trainer.ema.module.modules())
        trainer.lock.release()
    assert runs["auto"] > 0 and runs["off"] == 0 and runs["kept"] == 0
