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


# -- COCO images as pseudo-clips ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def coco_data(tmp_path_factory):
    from mobileinst.data.synthetic import make_synthetic_coco
    return make_synthetic_coco(tmp_path_factory.mktemp("coco"), n_train=3, n_val=1, seed=5)


def _mixed_yaml(video_data, coco_data, path, coco_json=None):
    import yaml
    cfg = yaml.safe_load(video_data.read_text())
    for split in ("train", "val"):
        cfg[split] = {k: str(video_data.parent / v) for k, v in cfg[split].items()}
    cfg["coco"] = {"json": str(coco_json or coco_data.parent / "annotations" / "instances_train.json"),
                   "images": str(coco_data.parent / "train")}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pseudo_clip_is_the_image_and_a_moved_copy(coco_data):
    import numpy as np
    from mobileinst.data.coco import CocoInstances
    from mobileinst.data.pseudo_clips import PseudoClips, random_motion
    from mobileinst.data.transforms import TrainTransform
    coco = CocoInstances(coco_data.parent / "annotations" / "instances_train.json", coco_data.parent / "train")
    image, labels, masks, ids = coco.load_with_ids(0)
    clip, (t0, t1) = PseudoClips(coco)[(0, 7)]
    assert clip.shape == (2, 3, *image.shape[:2]) and clip.dtype == torch.uint8
    assert torch.equal(clip[0], torch.from_numpy(image).permute(2, 0, 1))  # frame 0 = the image
    assert not torch.equal(clip[0], clip[1])  # frame 1 moved
    assert torch.equal(t0["labels"], torch.from_numpy(labels)) and torch.equal(t0["masks"], torch.from_numpy(masks))
    assert torch.equal(t0["track_ids"], torch.from_numpy(ids)) and len(set(ids.tolist())) == len(ids) > 0
    # frame 1's instances are frame 0's objects (same ids and labels), moved with the image
    keep = np.isin(ids, t1["track_ids"].numpy())
    assert torch.equal(t1["labels"], torch.from_numpy(labels[keep]))
    mask_iou = [(np.logical_and(a, b).sum() / np.logical_or(a, b).sum())
                for a, b in zip(masks[keep], t1["masks"].numpy())]
    assert min(mask_iou) < 0.95  # really moved
    again, _ = PseudoClips(coco)[(0, 7)]
    assert torch.equal(again, clip)  # deterministic under the seed
    # with the training transform both frames get the same draw: same size
    clip, (t0, t1) = PseudoClips(coco, TrainTransform(64))[(1, 3)]
    assert clip.shape[0] == 2 and t0["size"] == t1["size"] == tuple(clip.shape[-2:])
    moved, moved_masks = random_motion(image, masks, np.random.default_rng(0), 0.0, 0.0)
    assert np.array_equal(moved, image) and np.array_equal(moved_masks, masks)  # no motion = identity


def test_train_on_videos_with_coco_pseudo_clips(video_data, coco_data, tmp_path, capsys):
    from mobileinst.data.pseudo_clips import MixedClips
    from mobileinst.data.ytvis import YtvisClips
    from mobileinst.train.config import TrainConfig
    from mobileinst.train.data import build_train_loader
    data = _mixed_yaml(video_data, coco_data, tmp_path / "mixed.yaml")
    _, dataset = build_train_loader(TrainConfig(data=str(data), imgsz=64, batch=2, workers=0), 0, 1)
    assert isinstance(dataset.dataset, MixedClips)
    videos = YtvisClips(video_data.parent / "annotations" / "train.json", video_data.parent / "train" / "JPEGImages")
    assert len(dataset) == len(videos) + 3  # every frame of the videos, then the 3 images
    clip, targets = dataset[(len(videos) + 1, 0)]  # a pseudo-clip through the loader's view
    assert clip.shape[0] == 2 and targets[0]["video_id"] < 0
    out = tmp_path / "run"
    rc = main(["train", "--data", str(data), "--model", "mobileinst-topformer-t", "--iters", "2",
               "--imgsz", "64", "--batch", "2", "--workers", "0", "--num-queries", "8",
               "--eval-interval", "2", "--out-dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "iteration 2/2" in (out / "train.log").read_text()


def test_pseudo_clips_with_other_categories_are_refused(video_data, coco_data, tmp_path, capsys):
    import json
    gt = json.loads((coco_data.parent / "annotations" / "instances_train.json").read_text())
    for c in gt["categories"]:
        c["id"] += 10
    for a in gt["annotations"]:
        a["category_id"] += 10
    other = tmp_path / "other.json"
    other.write_text(json.dumps(gt))
    data = _mixed_yaml(video_data, coco_data, tmp_path / "mixed.yaml", coco_json=other)
    rc = main(["train", "--data", str(data), "--model", "mobileinst-topformer-t", "--iters", "1",
               "--imgsz", "64", "--batch", "2", "--workers", "0", "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and str(other) in err and "category ids" in err and "Traceback" not in err


def test_coco_key_needs_a_video_data_file(coco_data, tmp_path):
    import yaml
    from mobileinst.data.config import load_data_config
    from mobileinst.errors import DataError
    cfg = yaml.safe_load(coco_data.read_text())
    cfg["coco"] = cfg["train"]
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(DataError, match="needs format: ytvis"):
        load_data_config(path)
