"""The CPU recipe's levers: the time budget and its schedule, loss rows, frozen stages, stride-4
masks, training-only query groups and proposed queries (issue: a decoder that learns in minutes).

What is asserted: a --time run stops at its budget with its lr schedule ending there (a fake
clock, so the test is exact); every loss term is logged every log_interval iterations; frozen
backbone levels get no gradient; query groups change nothing at inference (eager and exported
outputs equal with and without them); a proposal + stride-4 model exports to ONNX and matches
PyTorch on onnxruntime.
"""
from __future__ import annotations

import copy
import csv
import math

import numpy as np
import pytest
import torch

from mobileinst import build_model
from mobileinst.checkpoint import load_checkpoint
from mobileinst.data.synthetic import make_synthetic_coco
from mobileinst.errors import MobileInstError
from mobileinst.export.onnx import export_onnx
from mobileinst.infer.onnx_graph import run_proto
from mobileinst.models.registry import get_config
from mobileinst.train.config import TrainConfig
from mobileinst.train.engine import Trainer
from mobileinst.train.schedule import lr_factor

from test_export import CLASSES, check_raw_parity, make_realistic, natural_batch, voc_image

TINY = dict(model="mobileinst-mobilenetv2", imgsz=128, batch=2, workers=0, lr=1e-3,
            warmup_iters=0, num_queries=8, seed=3, device="cpu")
LEVERS = dict(local_pool=2, mask_stride=4, query_groups=3, query_proposal=True, aux_loss=True,
              mask_pooled_cls=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("synth"), n_train=6, n_val=2, seed=0)


class FakeClock:
    """Seconds that advance only when a training step runs (`seconds_per_step` each)."""

    def __init__(self, seconds_per_step: float) -> None:
        self.now, self.step = 0.0, seconds_per_step

    def __call__(self) -> float:
        return self.now


def budget_trainer(data, out, minutes: float, seconds_per_step: float, **kw) -> tuple[Trainer, list]:
    clock = FakeClock(seconds_per_step)
    cfg = TrainConfig(data=str(data), out_dir=str(out), time=minutes, schedule="linear",
                      **{**TINY, **kw})
    trainer = Trainer(cfg, clock=clock)
    step = trainer.step

    def timed_step(images, targets):  # the only thing that moves the clock
        lrs.append(trainer._lr())
        clock.now += clock.step
        return step(images, targets)

    lrs: list[float] = []
    trainer.step = timed_step
    return trainer, lrs


# -- time budget and schedule ----------------------------------------------------------------------
def test_lr_factor_linear_ends_at_zero_and_warmup_is_capped():
    assert lr_factor("linear", 1000, 1.0, 10) == 0.0
    assert lr_factor("linear", 1000, 0.5, 10) == pytest.approx(0.5)
    assert lr_factor("step", 1000, 0.5, 10) == 1.0
    assert lr_factor("step", 1000, 0.8, 10) == pytest.approx(0.1)
    assert lr_factor("step", 1000, 0.95, 10) == pytest.approx(0.01)
    # a 1000-iteration warm-up in a run whose quarter has passed is over
    assert lr_factor("linear", 5, 0.25, 1000) == pytest.approx(0.75)
    assert lr_factor("linear", 0, 0.0, 1000) == pytest.approx(1e-3)


def test_time_budget_stops_the_run_and_its_schedule_ends_at_the_budget(data, tmp_path):
    trainer, lrs = budget_trainer(data, tmp_path / "run", minutes=1.0, seconds_per_step=6.0)
    result = trainer.train()
    trainer.lock.release()
    assert result["iterations"] == 10  # 60 s of budget at 6 s per step
    # step i ran at progress i / 10: lr = 1e-3 * (1 - i / 10), down to a tenth on the last step
    assert lrs == pytest.approx([1e-3 * (1 - i / 10) for i in range(10)])
    assert trainer._lr() == 0.0  # the schedule ends at the budget
    ckpt = load_checkpoint(tmp_path / "run" / "weights" / "last.pt")
    assert ckpt["elapsed"] == pytest.approx(60.0) and ckpt["iteration"] == 10
    rows = list(csv.DictReader(open(tmp_path / "run" / "results.csv")))
    assert rows[-1]["iteration"] == "10" and rows[-1]["AP"] != ""  # evaluated at the end


def test_time_budget_resume_extends_the_run(data, tmp_path):
    out = tmp_path / "run"
    trainer, _ = budget_trainer(data, out, minutes=0.5, seconds_per_step=6.0)
    assert trainer.train()["iterations"] == 5
    trainer.lock.release()
    cfg = TrainConfig(data=str(data), out_dir=str(out), time=1.0, schedule="linear", **TINY)
    resumed = Trainer(cfg, resume="auto", clock=FakeClock(6.0))
    assert resumed.elapsed == pytest.approx(30.0) and resumed.progress() == pytest.approx(0.5)
    resumed.lock.release()


def test_request_stop_from_a_callback_ends_the_run_evaluated(data, tmp_path):
    trainer, _ = budget_trainer(data, tmp_path / "run", minutes=10.0, seconds_per_step=1.0)
    trainer.add_callback("on_step_end", lambda t: t.request_stop() if t.iteration == 3 else None)
    assert trainer.train()["iterations"] == 3
    trainer.lock.release()
    assert (tmp_path / "run" / "weights" / "last.pt").exists()
    with pytest.raises(MobileInstError, match="unknown trainer event"):
        trainer.add_callback("on_epoch", print)


def test_every_loss_term_is_logged_every_log_interval(data, tmp_path):
    cfg = TrainConfig(data=str(data), out_dir=str(tmp_path / "run"), iters=6, log_interval=2,
                      eval_interval=1000, model_overrides=dict(LEVERS), **TINY)  # evaluated at the end only
    trainer = Trainer(cfg)
    trainer.train()
    trainer.lock.release()
    rows = list(csv.DictReader(open(tmp_path / "run" / "results.csv")))
    assert [r["iteration"] for r in rows] == ["2", "4", "6"]
    for key in ("loss", "loss_cls", "loss_dice", "loss_mask", "loss_obj", "loss_aux", "loss_groups",
                "loss_proposal", "images_per_s"):
        assert all(float(r[key]) > 0 for r in rows), key
    assert rows[-1]["AP"] != "" and all(r["AP"] == "" for r in rows[:-1])
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0


def test_loss_options_train_and_are_checked(data, tmp_path):
    cfg = TrainConfig(data=str(data), out_dir=str(tmp_path / "run"), iters=2, log_interval=1,
                      eval_interval=1000, cls_loss="ia_bce", mask_loss_stride=2, **TINY)
    trainer = Trainer(cfg)
    trainer.train()
    trainer.lock.release()
    rows = list(csv.DictReader(open(tmp_path / "run" / "results.csv")))
    assert all(math.isfinite(float(r[k])) and float(r[k]) > 0 for r in rows
               for k in ("loss_cls", "loss_dice", "loss_mask", "loss_obj"))
    for bad, match in ((dict(cls_loss="softmax"), "cls_loss"), (dict(mask_loss_stride=3), "mask_loss_stride")):
        with pytest.raises(MobileInstError, match=match):
            TrainConfig.from_dict({"data": str(data), **bad})


def test_loss_weights_reach_the_criterion_and_are_checked(data, tmp_path):
    cfg = TrainConfig.from_dict({"data": str(data), "out_dir": str(tmp_path / "run"), "iters": 1,
                                 "loss_weights": {"dice": 5, "obj": 0.5}, **TINY})
    trainer = Trainer(cfg)
    trainer.lock.release()
    w = trainer.criterion.weights
    assert (w["loss_dice"], w["loss_obj"], w["loss_cls"], w["loss_mask"]) == (5.0, 0.5, 2.0, 5.0)
    for bad, match in (({"dcie": 5}, "unknown term 'dcie'"), ({"dice": -1}, "dice must be a number"),
                       ({"mask": "5"}, "mask must be a number"), ({"cls": float("nan")}, "cls must be")):
        with pytest.raises(MobileInstError, match=match):
            TrainConfig.from_dict({"data": str(data), "loss_weights": bad})

# -- frozen stages -------------------------------------------------------------------------------
def test_freeze_at_fixes_the_first_levels(data, tmp_path):
    cfg = TrainConfig(data=str(data), out_dir=str(tmp_path / "run"), iters=2, freeze_at=3, **TINY)
    trainer = Trainer(cfg)
    before = copy.deepcopy(trainer.model.backbone.state_dict())
    trainer.train()
    trainer.lock.release()
    after = trainer.model.backbone.state_dict()
    frozen = [k for k in before if k.split(".")[1].isdigit() and int(k.split(".")[1]) < 7]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # weights and BN stats
    assert not torch.equal(before["features.7.conv.0.0.weight"], after["features.7.conv.0.0.weight"])
    with pytest.raises(MobileInstError, match="cannot freeze stages .efficientnet-lite0 and mobilenetv2 can"):
        Trainer(TrainConfig(data=str(data), out_dir=str(tmp_path / "t"), iters=1, freeze_at=2,
                            **{**TINY, "model": "mobileinst-topformer-t"}))


# -- the model options ----------------------------------------------------------------------------
def test_stride4_masks_and_config_checks():
    model = build_model("mobileinst-mobilenetv2", num_classes=3, num_queries=8, mask_stride=4).eval()
    x = torch.rand(1, 3, 128, 192) * 255
    mask_feats, f_mask, _ = model.features(x)
    assert mask_feats.shape[-2:] == (32, 48) and f_mask.shape[-2:] == (16, 24)
    assert model.cfg.mask_upsample == 1 and model.mask_decoder.mask_proj is None
    assert model.train().forward_raw(x)["pred_masks"].shape[-2:] == (32, 48)  # stride 4, as before
    with pytest.raises(MobileInstError, match="mask_stride"):
        get_config("mobileinst-mobilenetv2", mask_stride=16)
    with pytest.raises(MobileInstError, match="query_groups"):
        get_config("mobileinst-mobilenetv2", query_groups=0)


def group0_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights in a model without the training-only groups."""
    cfg = {k: v for k, v in model.cfg.to_dict().items() if k not in ("name", "backbone")}
    plain = build_model(model.cfg.name, **{**cfg, "query_groups": 1})
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("instance_decoder.group_") for k in unexpected)
    return plain.eval()


def test_groups_change_nothing_at_inference(tmp_path):
    torch.manual_seed(0)
    grouped = build_model("mobileinst-mobilenetv2", num_classes=80, num_queries=12, query_groups=4,
                          local_pool=2).eval()
    plain = group0_copy(grouped)
    x = torch.from_numpy(natural_batch(128, 160).transpose(0, 3, 1, 2).copy()).float()
    with torch.no_grad():
        for a, b in zip(grouped.inference_outputs(x), plain.inference_outputs(x)):
            assert torch.equal(a, b)
    import onnx
    images = natural_batch(128, 128).transpose(0, 3, 1, 2).copy()  # (1, 3, H, W) uint8
    outs = [run_proto(onnx.load(export_onnx(m, tmp_path / f"{i}.onnx", imgsz=128, class_names=CLASSES)),
                      images) for i, m in enumerate((grouped, plain))]
    assert outs[0].keys() == outs[1].keys()
    for k in outs[0]:
        np.testing.assert_array_equal(outs[0][k], outs[1][k])


def test_proposal_stride4_model_exports_and_matches_pytorch(tmp_path):
    from mobileinst.models.model_info import ModelInfo
    from mobileinst.infer.ort import OnnxPredictor
    torch.manual_seed(0)
    model = make_realistic(build_model("mobileinst-mobilenetv2", num_classes=80, num_queries=20,
                                       **LEVERS), voc_image())
    path = export_onnx(model, tmp_path / "proposal.onnx", imgsz=(256, 256), dynamic=True,
                       input_dtype="float32", class_names=CLASSES)  # verify=True: ORT == PyTorch
    predictor = OnnxPredictor(path)
    assert predictor.info.mask_upsample == 1
    for h, w in ((256, 256), (192, 320)):
        check_raw_parity(model, predictor, h, w)
    assert ModelInfo.for_model(model.cfg, CLASSES).mask_upsample == 1


def test_cli_iters_replace_the_presets_time_budget(data, tmp_path):
    from mobileinst.cli import main
    out = tmp_path / "run"
    assert main(["train", "--cfg", "hard_cpu", "--data", str(data), "--out-dir", str(out),
                 "--iters", "2", "--batch", "2", "--workers", "0", "--imgsz", "128",
                 "--copy-paste", "0.25"]) == 0
    import yaml
    saved = yaml.safe_load((out / "config.yaml").read_text())
    train_cfg = saved["train"]
    assert train_cfg["time"] == 0.0 and train_cfg["iters"] == 2
    assert train_cfg["copy_paste"] == 0.25 and saved["model"]["mask_stride"] == 4  # CLI over preset
    assert "iteration 2/2" in (out / "train.log").read_text()
