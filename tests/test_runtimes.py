"""Each mobile runtime loads its own export, in its own Python package, and matches PyTorch.

Per runtime (skipped where its package is missing; `make test-runtimes` installs them) and per
size: the file of `export_format` runs in the runtime on a letterboxed synthetic COCO image; its
raw outputs are compared with PyTorch's `ExportGraph` on the same batch, and
`RuntimePredictor`'s instances with `decode_raw` of PyTorch's outputs (same labels, mask IoU >=
0.99, score within 1e-4 plus the one-pixel maskness allowance of `assert_same_instances`; both
directions, for the ~60 instances above CONF).

Raw tolerance: every runtime here computes in float32 (NCNN and OpenVINO with their fp16 / bf16
defaults turned off). Measured max abs differences, all four runtimes, both sizes: logits <= 1.9e-5
and kernels <= 2.4e-5 (magnitudes ~7), objectness <= 5.1e-6 (~2), mask_features <= 2.4e-6 (<1),
i.e. <= 4e-6 relative to max(1, |output|); 1e-4 relative is a 25x margin that still catches any
fp16 path (NCNN's default fp16 storage is off by ~5e-2). The weights are seeded random ones made "realistic"
(`make_realistic`: sharp masks, spread scores), so that masks and scores are not all borderline.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_export import assert_raw_close, assert_same_instances, make_realistic

from mobileinst.data.synthetic import make_synthetic_coco
from mobileinst.errors import CheckpointError, MobileInstError
from mobileinst.infer import runtimes as backends
from mobileinst.infer.runtimes import RuntimePredictor, file_kind, open_backend
from mobileinst.export.formats import export_format, graph_and_input, metadata_path
from mobileinst.export.onnx import RAW_OUTPUTS
from mobileinst.infer.predictor import decode_outputs
from mobileinst.infer.preprocess import to_input
from mobileinst import build_model

SIZES = [(256, 256), (320, 256)]
CONF = 0.5  # the realistic weights score 0.18..0.79 here: ~60 of 100 pass, so the cut matters
NAMES = ["circle", "square", "triangle"]
OUT = {"openvino": "m.xml", "ncnn": "m_ncnn", "executorch": "m.pte", "litert": "m.tflite"}
PACKAGES = {"openvino": ["openvino"], "ncnn": ["pnnx", "ncnn"], "executorch": ["executorch"],
            "litert": ["litert_torch", "ai_edge_litert"]}
SLOW = {"openvino", "executorch", "litert"}  # conversions of 15-30, 90-200, 70-110 s here (NCNN: 5 s)
RUNTIMES = [pytest.param(name, marks=[pytest.mark.slow] if name in SLOW else [])
            for name in OUT]


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image(tmp_path_factory) -> np.ndarray:
    """A synthetic COCO val image, RGB uint8."""
    root = tmp_path_factory.mktemp("coco")
    make_synthetic_coco(root, n_train=2, n_val=2)
    path = sorted((root / "val").iterdir())[0]
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def model(image) -> torch.nn.Module:
    torch.manual_seed(0)
    model = make_realistic(build_model("mobileinst-topformer-t", num_classes=3), image).eval()
    return model


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(runtime, (H, W)) -> the exported path, converted once per module."""
    cache: dict = {}

    def get(model: torch.nn.Module, name: str, hw: tuple[int, int]) -> Path:
        for module in PACKAGES[name]:
            pytest.importorskip(module)
        if (name, hw) not in cache:
            out = tmp_path_factory.mktemp(f"{name}_{hw[0]}x{hw[1]}") / OUT[name]
            cache[name, hw] = export_format(name, model, out, hw, class_names=NAMES)
        return cache[name, hw]
    return get


def torch_reference(model, predictor: RuntimePredictor, image: np.ndarray):
    """(the letterboxed batch, PyTorch's raw outputs on it, its decoded instances above CONF)."""
    batch, sizes = predictor.prepare([image])  # (1, 3, H, W) float 0..255
    batch = to_input(batch, predictor.info.input.dtype)  # what the runtime is fed
    graph, _ = graph_and_input(model, predictor.info.input.size)
    with torch.no_grad():
        raw = dict(zip(RAW_OUTPUTS, (t.numpy() for t in graph(torch.from_numpy(batch)))))
    inst = decode_outputs(raw, tuple(batch.shape[-2:]), sizes, [image.shape[:2]], predictor.info.inference)[0]
    keep = inst["scores"] > CONF
    return batch, raw, {k: v[keep].numpy() for k, v in inst.items()}


# -- parity --------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", SIZES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
@pytest.mark.parametrize("name", RUNTIMES)
def test_runtime_parity(name, hw, model, image, exports):
    path = exports(model, name, hw)
    predictor = RuntimePredictor(path, conf=CONF)
    assert type(predictor.backend) is backends.BACKENDS[name]
    assert predictor.info.input.size == hw and predictor.class_names == NAMES
    batch, ref_raw, ref = torch_reference(model, predictor, image)
    got_raw = predictor.run(batch)
    assert {k: v.shape for k, v in got_raw.items()} == {k: v.shape for k, v in ref_raw.items()}
    diffs = {k: f"{np.abs(got_raw[k] - ref_raw[k]).max():.1e}" for k in RAW_OUTPUTS}
    print(f"{name} {hw}: max abs diff {diffs}")  # `pytest -s` shows them
    assert_raw_close(got_raw, ref_raw, rtol=1e-4)
    result = predictor(image)
    assert result.masks.shape[1:] == image.shape[:2]
    assert len(ref["scores"]) >= 3, "too few instances above CONF for a meaningful comparison"
    got = {"labels": result.labels, "scores": result.scores, "masks": result.masks}
    matched = assert_same_instances(ref, got, min_score=CONF)
    print(f"{name} {hw}: {matched} of {len(result)} instances matched")
    assert matched >= 3
    assert result.names == [NAMES[j] for j in result.labels]


def test_export_writes_metadata_beside_the_file(model, exports):
    path = exports(model, "ncnn", SIZES[0])
    assert metadata_path(path) == path / "mobileinst.json" == metadata_path(path / "model.ncnn.param")
    meta = json.loads(metadata_path(path).read_text())
    assert meta["producer"] == "mobileinst" and meta["format"] == "ncnn"
    assert json.loads(meta["input_size"]) == list(SIZES[0]) and meta["input_dtype"] == "float32"
    assert json.loads(meta["class_names"]) == NAMES
    assert metadata_path(path.with_name("m.xml")) == path.with_name("m.xml.json")


@pytest.mark.slow
def test_openvino_ir_is_float32_with_named_ports(model, exports):
    ov = pytest.importorskip("openvino")
    ir = ov.Core().read_model(str(exports(model, "openvino", SIZES[0])))
    assert [p.get_any_name() for p in ir.outputs] == list(RAW_OUTPUTS)
    assert ir.inputs[0].get_any_name() == "images"
    weights = [op for op in ir.get_ops() if op.get_type_name() == "Constant"]
    assert weights and all(op.get_element_type() == ov.Type.f32 for op in weights
                           if op.get_element_type().is_real())


@pytest.mark.slow
def test_openvino_runs_an_onnx_export_like_onnxruntime(model, image, tmp_path):
    """OpenVINO reads `export_onnx`'s file (uint8 input, metadata inside) directly."""
    pytest.importorskip("openvino")
    from mobileinst.export.onnx import export_onnx
    from mobileinst.infer.ort import OnnxPredictor
    onnx_path = export_onnx(model, tmp_path / "m.onnx", imgsz=SIZES[1], class_names=NAMES)
    a = OnnxPredictor(onnx_path, conf=CONF)(image)
    b = RuntimePredictor(onnx_path, conf=CONF)  # the kind says: openvino
    assert isinstance(b.backend, backends.OpenVinoBackend)
    b = b(image)
    assert len(a) >= 3
    assert assert_same_instances(vars(a), vars(b), min_score=CONF) == len(a)


@pytest.mark.slow
@pytest.mark.parametrize("conf", [CONF, None], ids=["conf", "no-conf"])
def test_openvino_runs_the_postprocessed_onnx_graph(model, image, tmp_path, conf):
    """The `--postprocess` graph (instance count K decided by the data) in OpenVINO: the same
    instances as onnxruntime's, with and without the in-graph --conf."""
    pytest.importorskip("openvino")
    from mobileinst.export.onnx import export_onnx
    from mobileinst.infer.ort import OnnxPredictor
    path = export_onnx(model, tmp_path / "pp.onnx", imgsz=SIZES[1], class_names=NAMES,
                       postprocess=True, conf=conf)
    ov = RuntimePredictor(path, backend="openvino", conf=CONF)
    assert ov.info.graph == "postprocess"
    a, b = OnnxPredictor(path, conf=CONF)(image), ov(image)
    assert len(a) >= 3
    assert assert_same_instances(vars(a), vars(b), min_score=CONF) == len(a) == len(b)


@pytest.mark.slow
def test_coreml_converts(model, tmp_path):
    """Conversion only: CoreML predictions run on macOS alone."""
    ct = pytest.importorskip("coremltools")
    path = export_format("coreml", model, tmp_path / "m.mlpackage", SIZES[0])
    spec = ct.utils.load_spec(str(path))
    shapes = {o.name: tuple(o.type.multiArrayType.shape) for o in spec.description.output}
    assert shapes == {"logits": (1, 100, 3), "objectness": (1, 100, 1), "kernels": (1, 100, 128),
                      "mask_features": (1, 128, 32, 32)}
    assert [i.name for i in spec.description.input] == ["images"]
    assert json.loads(metadata_path(path).read_text())["format"] == "coreml"


# -- wrong files and missing packages (no runtime needed) -----------------------------------------
def header_only(tmp_path: Path, kind: str) -> Path:
    """A file (or NCNN folder) that carries `kind`'s signature and nothing else."""
    if kind == "ncnn":
        (tmp_path / "m_ncnn").mkdir()
        (tmp_path / "m_ncnn" / "model.ncnn.param").write_text("7767517\n")
        return tmp_path / "m_ncnn"
    name, data = {"openvino": ("m.xml", b'<?xml version="1.0"?>\n<net name="m" version="11">\n'),
                  "executorch": ("m.pte", b"\x1c\x00\x00\x00ET12" + bytes(24)),
                  "litert": ("m.tflite", b"\x1c\x00\x00\x00TFL3" + bytes(24)),
                  "unknown": ("m.bin", b"\x00" * 32)}[kind]
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


@pytest.mark.parametrize("backend,kind", [(b, k) for b in OUT for k in [*OUT, "unknown"] if k != b])
def test_a_file_for_another_runtime_is_a_clear_error(backend, kind, tmp_path):
    path = header_only(tmp_path, kind)
    assert file_kind(path) == (None if kind == "unknown" else kind)
    hint = "not a file of any known runtime" if kind == "unknown" else rf"\(use the {kind} backend\)"
    with pytest.raises(CheckpointError, match=rf"not one the {backend} backend runs|{hint}"):
        open_backend(path, backend)


@pytest.mark.parametrize("backend", list(OUT))
def test_missing_runtime_package_is_one_line(backend, tmp_path, monkeypatch):
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None)
    extra = backends.RUNTIME_PACKAGES[backend][1]
    with pytest.raises(MobileInstError, match=rf"pip install 'mobileinst\[{extra}\]'") as err:
        open_backend(header_only(tmp_path, backend))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("backend", list(OUT))
def test_a_broken_file_of_the_right_kind_is_a_checkpoint_error(backend, tmp_path):
    pytest.importorskip(PACKAGES[backend][-1])
    with pytest.raises(CheckpointError, match=f"{backend} could not load it|NCNN could not read"):
        open_backend(header_only(tmp_path, backend))


def test_missing_metadata_is_a_clear_error(model, exports, tmp_path):
    path = exports(model, "ncnn", SIZES[0])
    shutil.copytree(path, tmp_path / "m_ncnn", ignore=shutil.ignore_patterns("*.json"))
    with pytest.raises(CheckpointError, match=r"no .*mobileinst\.json \(written by"):
        RuntimePredictor(tmp_path / "m_ncnn")


@pytest.mark.slow
def test_cli_export_predict_val_on_openvino(tmp_path, capsys):
    """`export --format openvino`, then `predict` / `val --backend openvino` on the file; a .pt
    given to a runtime backend says how to export it."""
    pytest.importorskip("openvino")
    from mobileinst.cli import main
    from mobileinst.train.config import TrainConfig
    from mobileinst.train.engine import train
    data = make_synthetic_coco(tmp_path / "synth", n_train=4, n_val=2, seed=0)
    train(TrainConfig(data=str(data), out_dir=str(tmp_path / "run"), iters=2, imgsz=128, batch=2,
                      workers=0, num_queries=8, model="mobileinst-topformer-t"))
    pt = tmp_path / "run" / "weights" / "last.pt"
    xml = tmp_path / "m.xml"
    assert main(["export", "--weights", str(pt), "--format", "openvino", "--imgsz", "128", "128",
                 "--out", str(xml)]) == 0
    assert main(["predict", "--weights", str(xml), "--backend", "openvino", "--source",
                 str(data.parent / "val"), "--conf", "0", "--out-dir", str(tmp_path / "p")]) == 0
    assert "2 images" in capsys.readouterr().out
    assert main(["val", "--weights", str(xml), "--backend", "openvino", "--data", str(data)]) == 0
    assert main(["predict", "--weights", str(pt), "--backend", "openvino", "--source",
                 str(data.parent / "val")]) == 2
    assert "mobileinst export --weights" in capsys.readouterr().err
