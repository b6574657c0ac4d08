"""`mobileinst track --backend openvino|ncnn|executorch|litert`: the key-frame file and the
`--part features` file of one export run in their runtime's own Python package, and the tracks
equal the PyTorch tracker's on the same letterboxed input (same ids and labels every frame, mask
IoU >= 0.99, scores within test_track_onnx's SCORE_ATOL).

Skipped where a runtime's package is missing (`make test-runtimes` installs them); NCNN converts in
seconds and runs in the default suite where it is installed, the others are marked slow. The
runtimes compute in float32 (test_runtimes.py: raw outputs within ~2e-5 of PyTorch), as
onnxruntime does, so the onnxruntime tolerance holds for them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_runtimes import OUT, PACKAGES, RUNTIMES
from test_track_onnx import SCORE_ATOL, mask_iou, model, read_frames, video  # noqa: F401 - fixtures

from mobileinst.cli import main
from mobileinst.data.synthetic import CLASSES
from mobileinst.errors import MobileInstError
from mobileinst.export.formats import export_format
from mobileinst.infer.video import RuntimeVideoNet, VideoPredictor

HW = (256, 352)  # fixed input of the exports; the 240x320 test frames are letterboxed into it
CAT_IDS = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):  # noqa: F811 - the imported fixture
    """runtime -> (key-frame file, features file), exported once per module."""
    cache: dict = {}

    def get(name: str) -> tuple[Path, Path]:
        for module in PACKAGES[name]:
            pytest.importorskip(module)
        if name not in cache:
            folder = tmp_path_factory.mktemp(f"track_{name}")
            key = export_format(name, model, folder / OUT[name], HW, class_names=CLASSES,
                                cat_ids=CAT_IDS)
            feats = export_format(name, model, folder / f"features-{OUT[name]}", HW,
                                  class_names=CLASSES, cat_ids=CAT_IDS, part="features")
            cache[name] = key, feats
        return cache[name]
    return get


@pytest.mark.parametrize("name", RUNTIMES)
def test_runtime_tracks_equal_torch(name, model, video, files):  # noqa: F811
    key, feats = files(name)
    rt = VideoPredictor.from_weights(key, name, threads=1, features=feats, reuse=3, conf=0.5)
    assert isinstance(rt.net, RuntimeVideoNet) and rt.net.backend == name and rt.model is None
    assert rt.info.input.size == HW and rt.class_names == CLASSES
    pt = VideoPredictor(model, rt.info, reuse=3, conf=0.5)  # PyTorch, the same letterboxed input
    n_tracks = 0
    for i, image in enumerate(read_frames(video)):
        a, b = pt.step(image), rt.step(image)
        assert a.key == b.key == (i % 3 == 0)
        assert np.array_equal(a.track_ids, b.track_ids), i
        assert np.array_equal(a.labels, b.labels) and a.names == b.names
        np.testing.assert_allclose(a.scores, b.scores, atol=SCORE_ATOL)
        assert a.masks.shape == b.masks.shape == (len(a), *image.shape[:2])
        assert all(mask_iou(x, y) >= 0.99 for x, y in zip(a.masks, b.masks)), i
        n_tracks = max(n_tracks, len(a))
    assert 0 < n_tracks < 20, "conf keeps some slots and drops others"


def test_features_file_is_checked(model, files, tmp_path):  # noqa: F811
    key, feats = files("ncnn")
    assert json.loads((feats / "mobileinst.json").read_text())["graph"] == "features"
    with pytest.raises(MobileInstError, match="needs the features file"):
        VideoPredictor.from_weights(key, "ncnn", reuse=3)
    with pytest.raises(MobileInstError, match="features graph .* where the key-frame"):
        VideoPredictor.from_weights(feats, "ncnn", features=feats, reuse=3)
    with pytest.raises(MobileInstError, match="where the features graph is expected"):
        VideoPredictor.from_weights(key, "ncnn", features=key, reuse=3)
    other = export_format("ncnn", model, tmp_path / "other_ncnn", (256, 256), class_names=CLASSES,
                          cat_ids=CAT_IDS, part="features")
    with pytest.raises(MobileInstError, match="different input_size"):
        VideoPredictor.from_weights(key, "ncnn", features=other, reuse=3)
    with pytest.raises(MobileInstError, match="runs an exported file"):
        VideoPredictor.from_weights(tmp_path / "best.pt", "ncnn")
    vp = VideoPredictor.from_weights(key, "ncnn", reuse=1)  # reuse 1: the key-frame file alone
    assert vp.net.features_backend is None


def test_track_cli_ncnn(files, video, tmp_path, capsys):  # noqa: F811
    """`mobileinst track --backend ncnn --features F`: a complete run, named in the summary."""
    key, feats = files("ncnn")
    out = tmp_path / "out"
    assert main(["track", "--weights", str(key), "--features", str(feats), "--backend", "ncnn",
                 "--source", str(video), "--out-dir", str(out), "--reuse", "3", "--conf", "0.5",
                 "--threads", "1", "--no-video"]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "ncnn" and summary["complete"] and summary["frames_done"] == 8
    assert json.loads((out / "results.json").read_text()), "tracks were written"
