"""`mobileinst track --backend onnxruntime`: the features graph, the NumPy association reference,
and tracks from onnxruntime equal to the PyTorch tracker's."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mobileinst import build_model
from mobileinst.checkpoint import save_checkpoint
from mobileinst.cli import main
from mobileinst.data.synthetic import CLASSES
from mobileinst.data.synthetic_video import make_synthetic_ytvis
from mobileinst.errors import MobileInstError
from mobileinst.infer.preprocess import preprocess
from mobileinst.infer.video import TorchVideoNet, VideoPredictor
from mobileinst.infer.tracker import match_kernels
from mobileinst.track.association_np import association_cost, match_kernels_np
from mobileinst.track.video_io import open_frames

IMGSZ = 256  # dynamic graphs exported much smaller than this break on other sizes
# measured on the test video (8 frames, 20 queries, 1 thread), onnxruntime vs PyTorch: track
# scores differ by <= 6e-7 for the tracks kept at conf 0.5 and <= 2.7e-5 over all 20 slots
# (conf 0), class probabilities by <= 1.2e-6, slot mask logits by <= 4.0e-5; mask IoU >= 0.99996.
# 1e-4 is ~4x the worst slot's difference and far below the score gaps that order tracks.
SCORE_ATOL = 1e-4


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vid")
    make_synthetic_ytvis(root, n_train=0, n_val=1, length=8)
    return root / "val" / "JPEGImages" / "val_0000"


def read_frames(folder: Path) -> list[np.ndarray]:
    frames = open_frames(folder)
    try:
        return [image for _, image in frames]
    finally:
        frames.close()


@pytest.fixture(scope="module")
def model(video) -> torch.nn.Module:
    """Random weights edited so that masks cover parts of the frame and scores spread."""
    torch.manual_seed(0)
    m = build_model("mobileinst-topformer-t", num_classes=len(CLASSES), num_queries=20).eval()
    x, _ = preprocess(read_frames(video)[:1], IMGSZ, 341)
    with torch.no_grad():
        m.mask_decoder.mask_proj.bias.sub_(m.features(x)[0].mean((0, 2, 3)))
        raw = m.forward_raw(x)
        m.instance_decoder.kernel_head.weight.mul_(4.0 / raw["pred_masks"].std())
        m.instance_decoder.class_head.weight.mul_(2.0 / raw["pred_logits"].std())
        m.instance_decoder.class_head.bias.fill_(-1.0)
    return m


@pytest.fixture(scope="module")
def weights(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("w") / "best.pt"
    save_checkpoint({"model": model.state_dict(), "model_config": model.cfg.to_dict(),
                     "class_names": CLASSES, "cat_ids": [1, 2, 3, 4],
                     "train_config": {"imgsz": IMGSZ}}, path)
    return path


@pytest.fixture(scope="module")
def graphs(weights) -> tuple[Path, Path]:
    """The key-frame and features graphs of `weights`, exported once (~2-3 min here)."""
    from mobileinst.infer.factory import cached_onnx
    return cached_onnx(weights), cached_onnx(weights, part="features")


# -- association: NumPy reference == PyTorch ------------------------------------------------------
def test_association_np_equals_torch_on_random_kernels():
    g = np.random.default_rng(0)
    for n, e in ((1, 8), (10, 16), (100, 128)):
        prev = g.standard_normal((n, e)).astype(np.float32)
        for cur in (g.standard_normal((n, e)).astype(np.float32),  # unrelated: any assignment
                    prev[g.permutation(n)] * 2.5 + 0.05 * g.standard_normal((n, e)).astype(np.float32)):
            ref = match_kernels(torch.from_numpy(prev), torch.from_numpy(cur))
            assert np.array_equal(match_kernels_np(prev, cur), ref)
    cost = association_cost(prev, cur)
    assert cost.dtype == np.float32 and cost.shape == (100, 100) and 0 <= cost.min() <= cost.max() <= 2


def test_association_np_equals_torch_on_real_kernels(model, video):
    """Kernels of consecutive key frames of the test video, as the tracker sees them (slot order),
    and shuffled: the same permutation from both."""
    net = TorchVideoNet(model)
    prev = None
    g = np.random.default_rng(1)
    for image in read_frames(video):
        batch, _ = preprocess([image], IMGSZ, 341)
        cur = net.key(batch)[2][0]  # (N, E)
        if prev is not None:
            for c in (cur, cur[torch.from_numpy(g.permutation(len(cur)))]):
                perm = match_kernels(prev, c)
                assert np.array_equal(match_kernels_np(prev.numpy(), c.numpy()), perm)
            cur = cur[torch.from_numpy(match_kernels(prev, cur))]
        prev = cur


# -- graph checks: one-line errors (tiny stand-in graphs, no export) ---------------------------------
def fake_graph(path: Path, **meta: str) -> Path:
    """An Identity ONNX graph carrying mobileinst metadata (what OnnxVideoNet checks)."""
    import onnx
    from onnx import TensorProto, helper
    from mobileinst.models.model_info import ModelInfo
    base = {"producer": "mobileinst", "input_dtype": "float32", "dynamic": "true",
            "input_size": "null", "batch": "dynamic", "postprocess": "false", "graph": "raw",
            "model_config": json.dumps({"name": "a"}), "class_names": json.dumps(CLASSES)}
    names = ModelInfo.from_metadata(path, {**base, **meta}).outputs  # what opening checks
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", 3, "H", "W"])
    ys = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", 3, "H", "W"]) for n in names]
    nodes = [helper.make_node("Identity", ["images"], [n]) for n in names]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], ys),
                              opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 8
    for k, v in {**base, **meta}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, path)
    return path


@pytest.mark.parametrize("case, match", [
    ("features_as_key", "a features graph .* key-frame graph"),
    ("postprocess_as_key", "post-processed graph"),
    ("raw_as_features", "a raw graph where the features graph is expected"),
    ("other_model", "different model_config"),
    ("reuse_without_features", "needs the features graph"),
    ("fixed_batch", "batches of 4"),
])
def test_wrong_graphs_are_one_line_errors(tmp_path, case, match):
    raw = fake_graph(tmp_path / "raw.onnx")
    feats = fake_graph(tmp_path / "f.onnx", graph="features")
    key, second, reuse = raw, feats, 3
    if case == "features_as_key":
        key = feats
    elif case == "postprocess_as_key":
        key = fake_graph(tmp_path / "pp.onnx", postprocess="true", graph="postprocess")
    elif case == "raw_as_features":
        second = raw
    elif case == "other_model":
        second = fake_graph(tmp_path / "f2.onnx", graph="features", model_config='{"name": "b"}')
    elif case == "reuse_without_features":
        second = None
    else:
        key = fake_graph(tmp_path / "b4.onnx", batch="4")
    with pytest.raises(MobileInstError, match=match) as e:
        VideoPredictor.from_onnx(key, second, reuse=reuse)
    assert len(str(e.value).splitlines()) == 1


def test_cli_features_graph_as_weights(tmp_path, video, capsys):
    feats = fake_graph(tmp_path / "f.onnx", graph="features")
    rc = main(["track", "--weights", str(feats), "--source", str(video), "--out-dir",
               str(tmp_path / "o"), "--backend", "onnxruntime"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "features graph" in err
    rc = main(["track", "--weights", str(feats), "--source", str(video), "--out-dir",
               str(tmp_path / "o"), "--backend", "torch"])
    assert rc == 2 and "needs --backend onnxruntime" in capsys.readouterr().err


# -- onnxruntime == PyTorch (exports: slow) ----------------------------------------------------------
@pytest.mark.slow
def test_features_graph_equals_raw_mask_features(graphs, video):
    from mobileinst.export.onnx import graph_kind, read_metadata
    from mobileinst.infer.ort import open_session
    key, feats = graphs
    assert graph_kind(read_metadata(key)) == "raw" and graph_kind(read_metadata(feats)) == "features"
    assert list(json.loads(read_metadata(feats)["outputs"])) == ["mask_features"]
    (ks, _), (fs, _) = open_session(key), open_session(feats)
    for image in read_frames(video)[:2] + [np.zeros((300, 200, 3), np.uint8)]:  # another size too
        batch = preprocess([image], IMGSZ, 341)[0].numpy()
        raw = dict(zip([o.name for o in ks.get_outputs()], ks.run(None, {"images": batch})))
        (mf,) = fs.run(None, {"images": batch})
        assert mf.shape == raw["mask_features"].shape
        assert np.abs(mf - raw["mask_features"]).max() <= 1e-5 * max(1.0, np.abs(mf).max())


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.mark.slow
@pytest.mark.parametrize("reuse", [1, 3])
def test_onnx_tracks_equal_torch(weights, graphs, video, reuse):
    ort = VideoPredictor.from_weights(weights, "onnxruntime", threads=1, reuse=reuse, conf=0.5)
    assert ort.model is None and ort.net.key_path == graphs[0]
    pt = VideoPredictor.from_weights(weights, "torch", reuse=reuse, conf=0.5)
    n_tracks = 0
    for i, image in enumerate(read_frames(video)):
        a, b = pt.step(image), ort.step(image)
        assert a.key == b.key == (i % reuse == 0)
        assert np.array_equal(a.track_ids, b.track_ids), i
        assert np.array_equal(a.labels, b.labels) and a.names == b.names
        np.testing.assert_allclose(a.scores, b.scores, atol=SCORE_ATOL)
        assert a.masks.shape == b.masks.shape == (len(a), *image.shape[:2])
        assert all(mask_iou(x, y) >= 0.99 for x, y in zip(a.masks, b.masks))
        n_tracks = max(n_tracks, len(a))
    assert 0 < n_tracks < 20, "conf keeps some slots and drops others"


@pytest.mark.slow
def test_track_cli_onnxruntime(weights, graphs, video, tmp_path, capsys):
    """`mobileinst track --backend onnxruntime --threads 1` on the .pt: the cached graphs are
    reused; results.json as the torch backend's (ids, classes, per-frame masks)."""
    runs = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        assert main(["track", "--weights", str(weights), "--source", str(video), "--out-dir", str(out),
                     "--reuse", "3", "--conf", "0.5", "--backend", backend, "--threads", "1",
                     "--no-video"]) == 0, capsys.readouterr().err
        summary = json.loads((out / "summary.json").read_text())
        assert summary["backend"] == backend and summary["complete"]
        runs[backend] = json.loads((out / "results.json").read_text())
    a, b = runs["torch"], runs["onnxruntime"]
    assert len(a) == len(b) > 0
    for ra, rb in zip(a, b):
        assert ra["category_id"] == rb["category_id"] and abs(ra["score"] - rb["score"]) <= SCORE_ATOL
        assert [s is None for s in ra["segmentations"]] == [s is None for s in rb["segmentations"]]
