"""Video tracking: kernel association, track life cycle, kernel reuse, the `track` CLI."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mobileinst import build_model
from mobileinst.checkpoint import save_checkpoint
from mobileinst.cli import main
from mobileinst.data.synthetic import CLASSES
from mobileinst.data.synthetic_video import make_synthetic_ytvis
from mobileinst.errors import MobileInstError
from mobileinst.evaluate.ytvis_eval import evaluate_ytvis
from mobileinst.models.postprocess import upsample_masks
from mobileinst.infer.preprocess import preprocess
from mobileinst.infer.video import VideoPredictor
from mobileinst.infer.tracker import Tracker, TrackerConfig, match_kernels
from mobileinst.infer.video_results import TrackResults
from mobileinst.track.run import track_source


# -- association ---------------------------------------------------------------------------------
def test_match_kernels_recovers_a_permutation():
    g = torch.Generator().manual_seed(0)
    prev = torch.randn(8, 16, generator=g)
    order = torch.randperm(8, generator=g)
    cur = prev[order] * 3.0 + 0.01 * torch.randn(8, 16, generator=g)  # scaled: cosine ignores norm
    perm = match_kernels(prev, cur)
    assert np.array_equal(order[perm].numpy(), np.arange(8))  # cur[perm[i]] is prev[i]


def test_ids_follow_permuted_identity_kernels():
    """Identity kernels, shuffled on every key frame: each track keeps its id through the shuffles."""
    n, c = 6, 3
    tr = Tracker(TrackerConfig(start_score=0.5))
    eye = torch.eye(n)
    probs = np.full((n, c), 0.01)
    probs[[0, 2, 4], 1] = 0.9  # three real objects, on rows (= kernels e0, e2, e4)
    g = np.random.default_rng(0)
    seen: dict[int, int] = {}  # kernel (basis vector) -> track id
    for frame in range(5):
        order = g.permutation(n) if frame else np.arange(n)
        kernels = eye[order]  # query q holds basis vector order[q]
        perm = tr.associate(kernels)
        slot_basis = order[perm]  # basis vector in each slot
        slot_probs = probs[slot_basis]
        alive = tr.update(frame, slot_probs, np.ones(n))
        assert np.array_equal(slot_basis, np.arange(n))  # slots stay in the first frame's order
        for t in alive:
            seen.setdefault(int(slot_basis[t.slot]), t.id)
            assert seen[int(slot_basis[t.slot])] == t.id
    assert sorted(seen) == [0, 2, 4] and sorted(seen.values()) == [1, 2, 3]


def test_start_threshold_patience_and_new_ids():
    tr = Tracker(TrackerConfig(start_score=0.5, keep_score=0.3, patience=2))
    k = torch.eye(2)

    def step(frame, s0, s1=0.0):
        tr.associate(k)
        probs = np.array([[s0], [s1]])
        return {t.slot: t.id for t in tr.update(frame, probs, np.ones(2))}

    assert step(0, 0.4) == {}  # below the start threshold: no track
    assert step(1, 0.6) == {0: 1}  # starts
    assert step(2, 0.35) == {0: 1}  # between keep and start: continues (hysteresis)
    assert step(3, 0.1) == {}  # lost, not ended
    assert step(4, 0.1) == {} and 0 in tr.tracks  # lost for 2 frames = patience: still waiting
    assert step(5, 0.6) == {0: 1}  # recovered within patience: same id
    for f in (6, 7, 8):
        step(f, 0.1)
    assert 0 not in tr.tracks and [t.id for t in tr.ended] == [1]  # 3 frames > patience: ended
    assert step(9, 0.35) == {}  # an ended slot needs the START score again
    assert step(10, 0.7, 0.8) == {0: 2, 1: 3}  # new ids, never reused


def test_track_class_and_score_average_over_frames():
    tr = Tracker(TrackerConfig(start_score=0.1))
    for frame, p in enumerate(([0.6, 0.2], [0.1, 0.5], [0.1, 0.5])):
        tr.associate(torch.eye(1))
        (t,) = tr.update(frame, np.array([p]), np.array([0.5]))
    assert t.label == 1 and t.score == pytest.approx((0.2 + 0.5 + 0.5) / 3 * 0.5)


# -- the video predictor ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("mobileinst-topformer-t", num_classes=3, num_queries=10).eval()


def frames(n=4, h=70, w=90, seed=0):
    g = np.random.default_rng(seed)
    return [g.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_reuse_1_equals_the_per_frame_full_model(model):
    vp = VideoPredictor(model, imgsz=64, reuse=1, conf=0.0)  # conf 0: every slot is a track
    for image in frames(3, 61, 83):  # odd sizes: padded to multiples of 32
        out = vp.step(image)
        batch, sizes = preprocess([image], 64, vp.max_size)
        with torch.no_grad():
            raw = model.forward_raw(batch)
        kernels = raw["pred_kernels"][0]
        perm = torch.from_numpy(match_kernels(vp.kernels, kernels))
        assert torch.equal(raw["pred_kernels"][0][perm], vp.kernels)
        assert torch.equal(raw["pred_masks"][0][perm], out.slot_mask_logits)  # exactly
        assert out.key and out.masks.shape[1:] == image.shape[:2]
        slots = [t.slot for t in out.tracks]
        ref = upsample_masks(raw["pred_masks"][0][perm][slots].sigmoid(), tuple(batch.shape[-2:]),
                             sizes[0], image.shape[:2]) > 0.45
        assert np.array_equal(out.masks, ref.numpy())


def test_reuse_k_runs_the_instance_decoder_on_key_frames_only(model):
    calls = []
    hook = model.instance_decoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        vp = VideoPredictor(model, imgsz=64, reuse=3, conf=0.0)
        outs = [vp.step(f) for f in frames(7)]
    finally:
        hook.remove()
    assert [o.key for o in outs] == [True, False, False, True, False, False, True]
    assert len(calls) == 3
    # a non-key frame dots ITS mask features with the key frame's kernels
    image = frames(7)[4]
    batch, _ = preprocess([image], 64, vp.max_size)
    with torch.no_grad():
        mask_feats, _, _ = model.features(batch)
        vp2 = VideoPredictor(model, imgsz=64, reuse=3, conf=0.0)
        for f in frames(4):
            vp2.step(f)  # key frame 3 sets the kernels for frames 3, 4, 5
        expect = model.masks(vp2.kernels[None], mask_feats)[0]
    assert torch.equal(outs[4].slot_mask_logits, expect)


def test_key_frame_classes_include_the_mask_pooled_term():
    """With mask_pooled_cls the tracker's key-frame class probabilities are the full model's."""
    torch.manual_seed(1)
    m = build_model("mobileinst-topformer-t", num_classes=3, num_queries=10, mask_pooled_cls=True).eval()
    with torch.no_grad():
        m.mask_class.weight.normal_()
    vp = VideoPredictor(m, imgsz=64, reuse=1, conf=0.0)
    image = frames(1)[0]
    vp.step(image)
    batch, _ = preprocess([image], 64, vp.max_size)
    with torch.no_grad():
        raw = m.forward_raw(batch)
    perm = torch.from_numpy(match_kernels(vp.kernels, raw["pred_kernels"][0]))
    probs = (raw["pred_logits"][0].sigmoid() * raw["pred_scores"][0].sigmoid()).sqrt()[perm]
    assert torch.allclose(vp.class_probs, probs, atol=1e-6)


def test_bad_reuse_interval(model):
    with pytest.raises(MobileInstError, match="reuse"):
        VideoPredictor(model, reuse=0)


# -- the CLI --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("vid")
    data = make_synthetic_ytvis(root, n_train=0, n_val=1, length=5)
    torch.manual_seed(0)
    m = build_model("mobileinst-topformer-t", num_classes=4, num_queries=10)
    weights = root / "w.pt"
    save_checkpoint({"model": m.state_dict(), "model_config": m.cfg.to_dict(),
                     "class_names": CLASSES, "cat_ids": [1, 2, 3, 4],
                     "train_config": {"imgsz": 96}}, weights)
    return root, data, weights


def test_track_cli_end_to_end(clip, tmp_path, capsys):
    root, _, weights = clip
    src = root / "val" / "JPEGImages" / "val_0000"
    rc = main(["track", "--weights", str(weights), "--source", str(src), "--out-dir",
               str(tmp_path / "o"), "--reuse", "2", "--conf", "0.01"])
    assert rc == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results and all(len(r["segmentations"]) == 5 for r in results)
    assert {r["category_id"] for r in results} <= {1, 2, 3, 4}
    evaluate_ytvis(root / "annotations" / "val.json", results)  # accepted by the evaluator
    cap = cv2.VideoCapture(str(tmp_path / "o" / "val_0000.mp4"))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    assert n == 5
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["complete"] and summary["frames_done"] == 5
    # the mp4 itself is a valid source; a glob too
    assert main(["track", "--weights", str(weights), "--source", str(tmp_path / "o" / "val_0000.mp4"),
                 "--out-dir", str(tmp_path / "o2"), "--no-video"]) == 0
    assert json.loads((tmp_path / "o2" / "summary.json").read_text())["frames_done"] == 5
    assert main(["track", "--weights", str(weights), "--source", str(src / "0000[0-2].jpg"),
                 "--out-dir", str(tmp_path / "o3"), "--no-video"]) == 0
    assert json.loads((tmp_path / "o3" / "summary.json").read_text())["frames_done"] == 3


@pytest.mark.parametrize("kind", ["video", "folder", "missing"])
def test_bad_sources_give_one_line_errors(clip, tmp_path, capsys, kind):
    _, _, weights = clip
    if kind == "video":
        src = tmp_path / "broken.mp4"
        src.write_bytes(b"not a video at all")
    elif kind == "folder":
        src = tmp_path / "empty"
        src.mkdir()
    else:
        src = tmp_path / "nothing_here"
    rc = main(["track", "--weights", str(weights), "--source", str(src), "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(src) in err


def test_interrupted_run_leaves_valid_output(clip, tmp_path, monkeypatch):
    root, _, weights = clip
    vp = VideoPredictor.from_checkpoint(weights, conf=0.01)
    real_step, count = vp.step, []

    def step(image):
        if len(count) == 3:
            raise KeyboardInterrupt
        count.append(1)
        return real_step(image)

    monkeypatch.setattr(vp, "step", step)
    with pytest.raises(KeyboardInterrupt):
        track_source(vp, root / "val" / "JPEGImages" / "val_0000", tmp_path / "o", progress=False)
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["frames_done"] == 3 and summary["complete"] is False
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results and all(len(r["segmentations"]) == 3 for r in results)
    cap = cv2.VideoCapture(str(tmp_path / "o" / "val_0000.mp4"))
    assert cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 3  # finalised
    cap.release()


def test_results_pad_frames_without_pixels():
    class T:  # a Track stand-in
        id, label, score = 7, 1, 0.5

    class F:
        def __init__(self, i, on):
            self.index, self.tracks = i, [T()]
            self.masks = np.ones((1, 4, 4), bool) if on else np.zeros((1, 4, 4), bool)

    r = TrackResults(3, [10, 20], ["a", "b"])
    for i, on in enumerate((False, True, False)):
        r.add(F(i, on))
    (rec,) = r.records()
    assert rec["category_id"] == 20 and rec["video_id"] == 3
    assert [s is None for s in rec["segmentations"]] == [True, False, True]


def test_benchmark_id_switch_count():
    """benchmarks/track_eval.py's metric: a GT track whose matched predicted id changes."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "track_eval", Path(__file__).resolve().parents[1] / "benchmarks" / "track_eval.py")
    te = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(te)
    from mobileinst.data.rle import encode_mask
    box = np.zeros((8, 8), bool)
    box[2:6, 2:6] = True
    other = np.zeros((8, 8), bool)
    other[0:2, 0:2] = True
    m, o = encode_mask(box), encode_mask(other)
    gt = {"videos": [{"id": 1, "height": 8, "width": 8, "length": 4}],
          "annotations": [{"id": 1, "video_id": 1, "segmentations": [m, m, None, m]}]}
    recs = [{"video_id": 1, "segmentations": [m, None, None, o]},  # frames 0; 3 does not overlap
            {"video_id": 1, "segmentations": [None, m, None, m]}]  # takes over at frame 1
    assert te.id_switches(gt, recs) == (1, 3, 3)  # 0 -> 1 at frame 1, then 1 stays; 3 tracked
    recs[1]["segmentations"][1] = None
    assert te.id_switches(gt, recs) == (1, 2, 3)  # frame 1 unmatched: 0 at frame 0, 1 at frame 3
