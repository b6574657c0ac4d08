"""Video training: temporal query passing, the video branch of `train`, video `val`."""
from __future__ import annotations

import pytest
import torch

from mobileinst import build_model
from mobileinst.cli import main
from mobileinst.data.synthetic_video import make_synthetic_ytvis
from mobileinst.train.losses import MobileInstCriterion
from mobileinst.train.matcher import HungarianMatcher
from mobileinst.train.video import TemporalQueryPassing, VideoCriterion


def _targets(b, h, w, classes, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(b):
        m = torch.zeros(2, h, w, dtype=torch.uint8)
        m[0, 4:20, 4:24] = 1
        m[1, 30:50, 20:60] = 1
        out.append({"labels": torch.randint(0, classes, (2,), generator=g), "masks": m})
    return out


def _model():
    torch.manual_seed(0)
    model = build_model("mobileinst-topformer-t", num_classes=3, num_queries=8)
    # as test_model: the official init zeroes a few BN gammas (attention projections), which
    # blocks gradient to the layers before them until trained / pretrained weights fill them
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
    return model


def test_temporal_query_passing_uses_frame_t_queries_and_trains_everything():
    model = _model()
    net = TemporalQueryPassing(model).train()
    images = torch.rand(4, 3, 64, 96) * 255  # B = 2 clips: frames t (0, 1), frames t + d (2, 3)
    out_t, out_d = net(images)
    assert out_t["pred_masks"].shape == out_d["pred_masks"].shape == (2, 8, 16, 24)
    # frame t's output is the ordinary image path
    with torch.no_grad():
        model.eval()
        ref = model.forward_raw(images[:2])
        out_t_eval, out_d_eval = net.eval()(images)
        assert torch.allclose(out_t_eval["pred_masks"], ref["pred_masks"], atol=1e-5)
        # frame t + d's output uses frame t's queries: replacing frames t changes it
        swapped = torch.cat([images[2:], images[2:]])
        _, out_d_swapped = net(swapped)
        assert not torch.allclose(out_d_swapped["pred_logits"], out_d_eval["pred_logits"])
    net.train()
    crit = VideoCriterion(MobileInstCriterion(HungarianMatcher(), num_classes=3))
    losses = crit((out_t, out_d), _targets(2, 64, 96, 3, 0) + _targets(2, 64, 96, 3, 1))
    assert set(losses) >= {"loss", "loss_cls", "loss_dice", "loss_mask", "loss_obj", "loss_t", "loss_d"}
    assert torch.isfinite(losses["loss"])
    assert losses["loss"].item() == pytest.approx((losses["loss_t"] + losses["loss_d"]).item() / 2, rel=1e-5)
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert list(net.parameters()) and not [n for n, _ in net.named_parameters() if not n.startswith("model.")]


def test_passed_queries_reach_the_later_frame_loss():
    """The loss of frame t + d alone gives gradient to the GLOBAL layer (through q_t) and to the
    backbone via frame t's X6: the queries really are passed."""
    model = _model()
    net = TemporalQueryPassing(model).train()
    _, out_d = net(torch.rand(2, 3, 64, 64) * 255)
    loss = MobileInstCriterion(HungarianMatcher(), num_classes=3)(out_d, _targets(1, 64, 64, 3, 0))["loss"]
    loss.backward()
    assert model.instance_decoder.global_cross.attn.in_proj_weight.grad.abs().sum() > 0
    assert model.instance_decoder.global_proj.weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def video_data(tmp_path_factory):
    return make_synthetic_ytvis(tmp_path_factory.mktemp("vtrain"), n_train=2, n_val=1, length=4)


def test_train_and_val_on_a_video_data_file(video_data, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--data", str(video_data), "--model", "mobileinst-topformer-t", "--iters", "2",
               "--imgsz", "64", "--batch", "2", "--workers", "0", "--num-queries", "8",
               "--eval-interval", "2", "--out-dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    log = (out / "train.log").read_text()
    assert "iteration 2/2" in log and "mask AP" in log
    ckpt = torch.load(out / "weights" / "last.pt", weights_only=False)
    assert not any(k.startswith("model.") for k in ckpt["model"])  # the inner model's keys
    assert ckpt["cat_ids"] == [1, 2, 3, 4]
    capsys.readouterr()
    assert main(["val", "--weights", str(out / "weights" / "last.pt"), "--data", str(video_data),
                 "--workers", "0", "--out", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "YouTube-VIS video mask AP" in printed and "AR1" in printed and "AR10" in printed
    assert (tmp_path / "r.json").is_file()
