"""Prediction under adversarial inputs: nothing above --conf, huge photos, clashing file names,
bad options, unreadable files (every backend: PyTorch, onnxruntime raw and post-processed graphs,
the video tracker).

The model is MobileInst-TopFormer-T with random weights and its class / objectness biases at 0:
at conf 0 every query with a non-empty mask is kept (~90 instances), at conf 0.3 about 14, and at
conf 1.0 none (a score is at most 1), which is the "nothing passes --conf" case.
"""
from __future__ import annotations

import logging
import os
import tracemalloc
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mobileinst.predict as predict_module
import mobileinst.models.postprocess as pp
from mobileinst import build_model
from mobileinst.checkpoint import save_checkpoint
from mobileinst.errors import MobileInstError
from mobileinst.export.onnx import POSTPROCESS_OUTPUTS, RAW_OUTPUTS, ExportGraph
from mobileinst.models.model_info import ModelInfo
from mobileinst.infer.ort import ExportedPredictor
from mobileinst.infer.predictor import TorchPredictor, decode_outputs
from mobileinst.infer.preprocess import preprocess
from mobileinst.infer.results import resize_masks
from mobileinst.infer.video import VideoPredictor
from mobileinst.models.postprocess import InferenceConfig, conf_config, maskness, query_scores
from mobileinst.predict import overlay_names, predict_source, source_root
from mobileinst.viz import _caption, color, draw_instances

IMGSZ = 64
CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("mobileinst-topformer-t", num_classes=3).eval()
    with torch.no_grad():
        m.instance_decoder.class_head.bias.zero_()
        m.instance_decoder.objectness_head.bias.zero_()
    return m


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint({"model": model.state_dict(), "model_config": model.cfg.to_dict(),
                     "class_names": CLASSES, "cat_ids": [1, 2, 3],
                     "train_config": {"imgsz": IMGSZ}}, path)
    return path


def info(model) -> ModelInfo:
    return ModelInfo.for_model(model.cfg, CLASSES, [1, 2, 3], IMGSZ)


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


# -- the old recipe, copied from before the change -------------------------------------------------
def old_postprocess(logits, obj, mask_logits, padded, size, orig, threshold, conf):
    """Rank every query above `threshold`, upsample all ranked masks at once, keep score > conf."""
    scores, labels = query_scores(logits.float(), obj.float())
    keep = scores > threshold
    scores, labels, prob = scores[keep], labels[keep], mask_logits[keep].float().sigmoid()
    scores = scores * maskness(prob, 0.45)
    order = scores.argsort(descending=True)[:100]
    scores, labels, prob = scores[order], labels[order], prob[order]
    masks = torch.zeros((0, *orig), dtype=torch.bool)
    if len(order):
        m = F.interpolate(prob[None], size=padded, mode="bilinear", align_corners=False)
        m = m[:, :, : size[0], : size[1]]
        masks = F.interpolate(m, size=orig, mode="bilinear", align_corners=False)[0] > 0.45
    keep = scores > conf
    return labels[keep].numpy(), scores[keep].numpy(), masks[keep].numpy()


@torch.no_grad()
def old_predict(model, img: np.ndarray, conf: float):
    batch, sizes = preprocess([img], IMGSZ, round(IMGSZ * 853 / 640))
    raw = model.forward_raw(batch)
    return old_postprocess(raw["pred_logits"][0], raw["pred_scores"][0], raw["pred_masks"][0],
                           tuple(batch.shape[-2:]), sizes[0], img.shape[:2],
                           min(model.inference.score_threshold, conf), conf)


def assert_same(got, ref) -> None:
    labels, scores, masks = ref
    assert got.masks.dtype == bool and got.masks.shape == masks.shape
    np.testing.assert_array_equal(got.labels, labels)
    np.testing.assert_allclose(got.scores, scores, rtol=1e-6)
    assert all(mask_iou(a, b) >= 0.99 for a, b in zip(got.masks, masks))


# -- 2. filtering on conf before the masks: the same results ---------------------------------------
@pytest.mark.parametrize("case,hw,conf,expect", [
    ("conf 0: every query", (90, 150), 0.0, "many"),
    ("conf below the eval threshold", (90, 150), 0.001, "many"),
    ("conf 0.3: a few", (90, 150), 0.3, "some"),
    ("upscaled photo, many masks", (500, 800), 0.0, "many"),
    ("nothing passes conf", (90, 150), 1.0, "none"),
])
def test_predictor_equals_the_old_recipe(model, case, hw, conf, expect):
    img = image(*hw)
    ref = old_predict(model, img, conf)
    got = TorchPredictor(model, info(model), imgsz=IMGSZ, conf=conf)(img)
    assert_same(got, ref)
    assert got.masks.shape[1:] == hw
    n = len(got)
    assert {"many": n > 50, "some": 0 < n < 50, "none": n == 0}[expect], (case, n)
    assert model.inference == InferenceConfig(), "the model's eval config is restored"


def test_masks_are_made_only_for_kept_instances(model, monkeypatch):
    calls = []
    real = pp.binary_masks

    def spy(prob, padded, size, orig, threshold):
        calls.append((len(prob), orig))
        return real(prob, padded, size, orig, threshold)

    monkeypatch.setattr(pp, "binary_masks", spy)
    img = image(1500, 2000)
    result = TorchPredictor(model, info(model), imgsz=IMGSZ, conf=0.3)(img)
    assert 0 < len(result) < 50
    assert calls == [(len(result), (1500, 2000))], "only the instances above conf get a mask"
    calls.clear()
    result = TorchPredictor(model, info(model), imgsz=IMGSZ, conf=1.0)(img)
    assert len(result) == 0 and calls == [(0, (1500, 2000))]


def test_evaluation_config_is_unchanged(model):
    """val keeps every query above 0.005 ranked, final score or not (no conf cut)."""
    assert InferenceConfig().score_threshold == 0.005 and InferenceConfig().conf is None
    x, sizes = preprocess([image(90, 150)], IMGSZ, 85)
    with torch.no_grad():
        raw = model.forward_raw(x)
        out = model(x, image_sizes=sizes, orig_sizes=[(90, 150)])[0]
    ref = old_postprocess(raw["pred_logits"][0], raw["pred_scores"][0], raw["pred_masks"][0],
                          tuple(x.shape[-2:]), sizes[0], (90, 150), 0.005, -1.0)
    np.testing.assert_array_equal(out["labels"].numpy(), ref[0])
    np.testing.assert_array_equal(out["scores"].numpy(), ref[1])
    masks = out["masks"].numpy()
    assert all(mask_iou(a, b) >= 0.99 for a, b in zip(masks, ref[2]))
    assert (masks != ref[2]).mean() <= 1e-4, "only pixels within rounding of the threshold differ"


# -- 1. nothing above conf: an empty Result on every path ------------------------------------------
def raw_outputs(n: int = 6, c: int = 3, e: int = 8, h: int = 8, w: int = 12, bias: float = 0.0,
                seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {"logits": (g.normal(size=(1, n, c)) + bias).astype(np.float32),
            "objectness": (g.normal(size=(1, n, 1)) + bias).astype(np.float32),
            "kernels": g.normal(size=(1, n, e)).astype(np.float32),
            "mask_features": g.normal(size=(1, e, h, w)).astype(np.float32)}


@pytest.mark.parametrize("case,bias,cfg", [
    ("no query above the eval threshold", -30.0, InferenceConfig()),
    ("none above conf", 0.0, InferenceConfig(1.0, 0.45, 100, conf=1.0)),
])
def test_decode_outputs_with_nothing_kept(case, bias, cfg):
    out = decode_outputs(raw_outputs(bias=bias), (32, 48), [(30, 45)], [(300, 450)], cfg)[0]
    assert out["masks"].shape == (0, 300, 450) and out["masks"].dtype == torch.bool
    assert out["labels"].shape == (0,) and out["scores"].shape == (0,)


@pytest.mark.parametrize("conf", [0.0, 0.001, 0.3, 0.9])
def test_decode_outputs_with_conf_equals_the_old_recipe(conf):
    raw = raw_outputs(n=40, seed=1)
    got = decode_outputs(raw, (32, 48), [(30, 45)], [(310, 440)], conf_config(InferenceConfig(), conf))[0]
    masks = torch.nn.functional.interpolate(  # MobileInst.masks: kernels . M, upsampled x2
        torch.bmm(torch.from_numpy(raw["kernels"]), torch.from_numpy(raw["mask_features"]).flatten(2))
        .view(1, 40, 8, 12), scale_factor=2.0, mode="bilinear", align_corners=False)[0]
    ref = old_postprocess(torch.from_numpy(raw["logits"][0]), torch.from_numpy(raw["objectness"][0]),
                          masks, (32, 48), (30, 45), (310, 440), min(0.005, conf), conf)
    np.testing.assert_array_equal(got["labels"].numpy(), ref[0])
    np.testing.assert_allclose(got["scores"].numpy(), ref[1], rtol=1e-6)
    assert all(mask_iou(a, b) >= 0.99 for a, b in zip(got["masks"].numpy(), ref[2]))


class EagerGraphPredictor(ExportedPredictor):
    """The onnxruntime backend's code path (input cast and checks, decode or post-processed
    outputs) over a dynamic float32 export's graph run as its PyTorch module (`ExportGraph`, what
    `export_onnx` exports; test_export checks that onnxruntime agrees with it): everything but
    onnxruntime itself, without a minutes-long export."""

    def __init__(self, model, postprocess: bool, conf: float) -> None:
        self.path = Path("eager.onnx")
        self.graph = ExportGraph(model, postprocess).eval()
        self.names = list(POSTPROCESS_OUTPUTS if postprocess else RAW_OUTPUTS)
        kind = "postprocess" if postprocess else "raw"
        super().__init__(replace(info(model), graph=kind), conf=conf)

    def execute(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {k: v.numpy() for k, v in zip(self.names, self.graph(torch.from_numpy(batch)))}


def eager_onnx_predictor(model, postprocess: bool, conf: float) -> EagerGraphPredictor:
    return EagerGraphPredictor(model, postprocess, conf)


@pytest.mark.parametrize("case,postprocess,hw", [
    ("raw graph", False, (90, 150)),
    ("raw graph, large photo", False, (900, 1500)),
    ("post-processed graph, resized masks", True, (90, 150)),
    ("post-processed graph, input size", True, (64, 96)),
])
def test_onnx_predictor_nothing_above_conf(model, case, postprocess, hw):
    for img in (image(*hw), np.zeros((*hw, 3), np.uint8)):
        r = eager_onnx_predictor(model, postprocess, conf=1.0)(img)
        assert len(r) == 0 and r.masks.shape == (0, *hw) and r.masks.dtype == bool
        assert r.labels.shape == (0,) and r.scores.shape == (0,) and r.names == []
    r = eager_onnx_predictor(model, postprocess, conf=0.0)(image(*hw))
    assert len(r) > 0 and r.masks.shape[1:] == hw


def test_onnx_predictor_raw_equals_the_old_recipe(model):
    img = image(500, 800)
    for conf in (0.0, 0.3):
        assert_same(eager_onnx_predictor(model, False, conf)(img), old_predict(model, img, conf))


def test_resize_masks_chunks_and_empty():
    g = np.random.default_rng(0)
    masks = (g.random((9, 32, 48)) > 0.5).astype(np.uint8)
    ref = resize_masks(masks, (30, 45), (120, 170), chunk_bytes=1 << 40)
    assert np.array_equal(resize_masks(masks, (30, 45), (120, 170), chunk_bytes=1), ref)
    assert resize_masks(masks[:0], (30, 45), (120, 170)).shape == (0, 120, 170)
    assert resize_masks(masks[:0], (32, 48), (32, 48)).shape == (0, 32, 48)


def test_video_predictor_nothing_above_conf(model, tmp_path):
    from mobileinst.track.run import overlay, track_source
    vp = VideoPredictor(model, info(model), imgsz=IMGSZ, conf=1.0)
    for i in range(3):
        out = vp.step(image(70, 90, seed=i))
        assert len(out) == 0 and out.masks.shape == (0, 70, 90) and out.masks.dtype == bool
        assert np.array_equal(overlay(image(70, 90, seed=i), out), image(70, 90, seed=i))
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        cv2.imwrite(str(frames / f"{i:05d}.png"), image(70, 90, seed=i))
    summary = track_source(vp, frames, tmp_path / "out", save_video=False, progress=False)
    assert summary["complete"] and summary["tracks"] == 0


# -- 2. overlays: no float copy of a huge photo ----------------------------------------------------
def old_draw_instances(img, masks, labels, colors, alpha=0.5):
    """The overlay before the change (a copy): a float32 canvas, full-size temporaries."""
    out = img.astype(np.float32)
    for m, c in zip(masks, colors):
        out[m] = out[m] * (1 - alpha) + np.asarray(c, np.float32) * alpha
    out = out.clip(0, 255).astype(np.uint8)
    for m, text, c in zip(masks, labels, colors):
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, c, 1, cv2.LINE_AA)
        ys, xs = np.nonzero(m)
        if len(xs):
            _caption(out, text, (int(xs.min()), int(ys.min())), c)
    return out


def disc_masks(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return np.stack([(yy - cy) ** 2 + (xx - cx) ** 2 < r * r for cy, cx, r in
                     ((h // 3, w // 3, h // 5), (h // 2, w // 2, h // 4), (h - 20, 30, 40))])


def test_draw_instances_matches_the_old_overlay():
    img, masks = image(300, 400), disc_masks(300, 400)  # overlapping discs, one at the border
    colors = [color(k) for k in range(3)]
    labels = ["a 0.91", "b 0.52", "c 0.33"]
    got = draw_instances(img, masks, labels, colors)
    ref = old_draw_instances(img, masks, labels, colors)
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.5  # uint8 rounding per layer vs one truncation
    outside = ~masks.any(0)  # the image there, the same outlines and captions drawn on it
    assert np.array_equal(got[outside], ref[outside]) and not np.array_equal(got, img)
    assert np.array_equal(draw_instances(img, masks[:0], [], []), img)


def test_draw_instances_memory_on_a_large_photo():
    h, w = 2000, 3000
    img = image(h, w)
    masks = np.zeros((3, h, w), bool)  # a few instances, one covering most of the photo
    masks[0, 100:1900, 100:2900] = True
    masks[1, 50:400, 2000:2500] = True
    masks[2, 1500:1990, 10:300] = True
    tracemalloc.start()
    out = draw_instances(img, masks, ["x 0.9", "y 0.8", "z 0.7"], [color(k) for k in range(3)])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.shape == img.shape and out.dtype == np.uint8
    # the output (1x the image) plus one box as uint8 0/1 (<= 1/3x); the old code held a
    # float32 copy (4x) and float per-instance temporaries on top
    assert peak < 1.5 * img.nbytes, f"peak {peak / 1e6:.0f} MB for a {img.nbytes / 1e6:.0f} MB image"


# -- 3. overlay names ------------------------------------------------------------------------------
@pytest.mark.parametrize("case,files,expected", [
    ("a jpg keeps its name", ["a.jpg"], ["a.jpg"]),
    ("other suffixes are kept", ["a.png", "b.jpeg", "c.JPG"], ["a.png.jpg", "b.jpeg.jpg", "c.JPG.jpg"]),
    ("same stem, different suffix", ["a.jpg", "a.jpeg", "a.png"], ["a.jpg", "a.jpeg.jpg", "a.png.jpg"]),
    ("same name in a subfolder", ["a.jpg", "sub/a.jpg"], ["a.jpg", "sub/a.jpg"]),
    ("a.png beside a.png.jpg", ["a.png", "a.png.jpg"], ["a.png~2.jpg", "a.png.jpg"]),
    ("~2 already an image's name", ["a.png", "a.png.jpg", "a.png~2.jpg"],
     ["a.png~3.jpg", "a.png.jpg", "a.png~2.jpg"]),
])
def test_overlay_names(case, files, expected):
    paths = [Path("photos") / f for f in files]
    names = overlay_names(paths, Path("photos"))
    assert [str(names[p]) for p in paths] == expected
    assert len(set(names.values())) == len(paths)


@pytest.mark.parametrize("case,source,root", [
    ("a folder", "{d}", "{d}"),
    ("a file", "{d}/a.png", "{d}"),
    ("a recursive glob", "{d}/**/*.jpg", "{d}"),
    ("a glob in the working folder", "*.jpg", "."),
])
def test_source_root(tmp_path, case, source, root):
    (tmp_path / "a.png").write_bytes(b"")
    assert source_root(source.format(d=tmp_path)) == Path(root.format(d=tmp_path))


def write_images(folder: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / name), image(60, 80, seed=i))


@pytest.mark.parametrize("case,source,expected", [
    ("a folder", "{d}", ["a.jpg", "a.png.jpg"]),
    ("a recursive glob", "{d}/**/*", ["a.jpg", "a.png.jpg", "sub/a.jpg"]),
])
def test_predict_source_overlays_do_not_collide(checkpoint, tmp_path, case, source, expected):
    src = tmp_path / "src"
    write_images(src, ["a.jpg", "a.png", "sub/a.jpg"])
    out = tmp_path / "out"
    summary = predict_source(checkpoint, source.format(d=src), out, conf=0.0)
    assert summary["images"] == len(expected) and summary["instances"] > 0
    got = sorted(str(p.relative_to(out / "overlays")) for p in (out / "overlays").rglob("*.jpg"))
    assert got == expected


# -- 4. options checked before any work -----------------------------------------------------------
def _file(tmp_path: Path) -> Path:
    (tmp_path / "f.txt").write_text("x")
    return tmp_path / "f.txt"


def _overlays_file(tmp_path: Path) -> Path:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "overlays").write_text("x")
    return tmp_path / "run"


@pytest.mark.parametrize("case,kwargs,error", [
    ("conf nan", {"conf": float("nan")}, r"conf \(--conf\) must be a finite number in \[0, 1\]"),
    ("conf inf", {"conf": float("inf")}, r"conf .*finite number"),
    ("conf negative", {"conf": -0.1}, r"conf .*\[0, 1\].*-0\.1"),
    ("conf above 1", {"conf": 1.5}, r"conf .*\[0, 1\].*1\.5"),
    ("conf a string", {"conf": "0.3"}, r"conf .*'0\.3'"),
    ("conf a bool", {"conf": True}, r"conf .*True"),
    ("imgsz 0", {"imgsz": 0}, r"imgsz \(--imgsz\) must be an integer .*\[32, 4096\].*got 0"),
    ("imgsz too small", {"imgsz": 16}, r"imgsz .*got 16"),
    ("imgsz too large", {"imgsz": 10000}, r"imgsz .*got 10000"),
    ("imgsz a float", {"imgsz": 320.5}, r"imgsz .*integer.*320\.5"),
    ("threads 0", {"threads": 0}, r"threads \(--threads\) must be an integer >= 1, got 0"),
    ("threads negative", {"threads": -2}, r"threads .*got -2"),
    ("threads a float", {"threads": 1.5}, r"threads .*got 1\.5"),
    ("out_dir is a file", {"out_dir": _file}, r"f\.txt: the output folder \(--out-dir\) is an existing file"),
    ("out_dir under a file", {"out_dir": lambda t: _file(t) / "run"},
     r"f\.txt/run: cannot create the output folder"),
    ("overlays is a file", {"out_dir": _overlays_file}, r"run/overlays: in the way of predict's output"),
    ("ok: conf 0", {"conf": 0.0}, None),
    ("ok: conf 1", {"conf": 1}, None),
    ("ok: imgsz 32, threads 1", {"imgsz": 32, "threads": 1}, None),
    ("ok: numpy numbers", {"conf": np.float32(0.5), "imgsz": np.int64(4096)}, None),
])
def test_predict_source_checks_options_before_loading(tmp_path, monkeypatch, case, kwargs, error):
    def loaded(*a, **k):
        raise RuntimeError("the model was loaded")

    monkeypatch.setattr(predict_module, "load_predictor", loaded)
    write_images(tmp_path / "src", ["a.jpg"])
    kwargs = {k: (v(tmp_path) if callable(v) else v) for k, v in kwargs.items()}
    kwargs.setdefault("out_dir", tmp_path / "out")
    if error is None:
        with pytest.raises(RuntimeError, match="the model was loaded"):
            predict_source("missing.pt", tmp_path / "src", **kwargs)
        assert Path(kwargs["out_dir"]).is_dir() and not any(Path(kwargs["out_dir"]).iterdir())
    else:
        with pytest.raises(MobileInstError, match=error) as e:
            predict_source("missing.pt", tmp_path / "src", **kwargs)
        assert "\n" not in str(e.value)


def test_predict_source_read_only_out_dir(tmp_path, monkeypatch):
    """A folder os.access says is read-only (as root every chmod passes: the check is simulated)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    monkeypatch.setattr(predict_module, "load_predictor", lambda *a, **k: pytest.fail("loaded"))
    write_images(tmp_path / "src", ["a.jpg"])
    with pytest.raises(MobileInstError, match=r"ro: the output folder \(--out-dir\) is not writable"):
        predict_source("missing.pt", tmp_path / "src", ro)


def test_predict_source_names_skipped_files(checkpoint, tmp_path, caplog):
    src = tmp_path / "src"
    write_images(src, ["good.jpg"])
    (src / "bad.jpg").write_bytes(b"not a jpeg" * 10)
    (src / "empty.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="mobileinst.predict"):
        summary = predict_source(checkpoint, src, tmp_path / "out", conf=0.3)
    bad, empty = str(src / "bad.jpg"), str(src / "empty.png")
    assert summary["images"] == 1 and summary["skipped"] == 2
    assert summary["skipped_files"] == [bad, empty]
    per_file = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped:")]
    assert len(per_file) == 2 and bad in per_file[0] and empty in per_file[1]
    assert any(f"2 unreadable image(s) skipped: {bad}, {empty}" in r.getMessage() for r in caplog.records)
