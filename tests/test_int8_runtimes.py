"""Static int8 per runtime (`export_int8`, `mobileinst export --int8 --format F`).

Per runtime (skipped where its package is missing; `make test-runtimes` installs them): the int8
file of `export_int8`, calibrated on a synthetic DATA file's train images, loads in its runtime
through `RuntimePredictor` (what `predict/val --backend F` run), returns the raw outputs' shapes
and instances, carries the float export's metadata plus "int8", and is smaller than the float32
file. Its AP change is measured by benchmarks/int8_accuracy.py, not here. The option checks
(formats without int8, --int8 without --calib) and LiteRT's integer I/O conversion need no runtime.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mobileinst import build_model
from mobileinst.data.synthetic import make_synthetic_coco
from mobileinst.errors import MobileInstError
from mobileinst.export.formats import INT8_FORMATS, NO_INT8, export_format, metadata_path
from mobileinst.export.quantize_runtimes import export_int8, int8_path
from mobileinst.infer import runtimes as backends
from mobileinst.infer.preprocess import input_arrays
from mobileinst.infer.runtimes import RuntimePredictor, dequantize_io, file_kind, quantize_io

HW = (128, 128)
NAMES = ["circle", "square", "triangle"]
SUFFIX = {"openvino": ".xml", "executorch": ".pte"}  # int8 besides onnxruntime (formats.INT8_FORMATS)
PACKAGES = {"openvino": ["openvino", "nncf"], "executorch": ["executorch", "torchao"]}


def file_bytes(path: Path) -> int:
    """An export's size on disk (OpenVINO: .xml + .bin)."""
    total = path.stat().st_size
    if path.suffix == ".xml":
        total += path.with_suffix(".bin").stat().st_size
    return total


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A synthetic DATA yaml: 6 train images (calibration), 2 val."""
    return make_synthetic_coco(tmp_path_factory.mktemp("synth"), n_train=6, n_val=2, seed=0)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("mobileinst-topformer-t", num_classes=3).eval()
    return model


@pytest.fixture(scope="module")
def image(data) -> np.ndarray:
    path = sorted((data.parent / "val").iterdir())[0]
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


# -- per runtime -----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(set(INT8_FORMATS) - {"onnx"}))
def test_int8_export_loads_and_predicts_in_its_runtime(fmt, model, data, image, tmp_path):
    for module in PACKAGES[fmt]:
        pytest.importorskip(module)
    fp32 = export_format(fmt, model, tmp_path / f"m{SUFFIX[fmt]}", HW, class_names=NAMES,
                         metadata={"source": "seeded"})
    q = export_int8(fmt, model, int8_path(fp32), HW, data, n=4, class_names=NAMES,
                    metadata={"source": "seeded"})
    assert q == tmp_path / f"m-int8{SUFFIX[fmt]}" and file_kind(q) == fmt
    # metadata: the float export's, plus "int8"
    meta, meta32 = (json.loads(metadata_path(p).read_text()) for p in (q, fp32))
    assert meta["format"] == fmt and meta["source"] == "seeded"
    assert "int8" in meta and "int8" not in meta32 and "calibrated on 4 images" in meta["int8"]
    assert {k: v for k, v in meta.items() if k != "int8"} == meta32
    # smaller than float32 (weights stored as int8)
    print(f"{fmt}: fp32 {file_bytes(fp32)} B, int8 {file_bytes(q)} B")
    assert file_bytes(q) < 0.6 * file_bytes(fp32)
    # runs through RuntimePredictor, as `predict --backend F --weights m-int8...` does
    predictor = RuntimePredictor(q, backend=fmt, conf=0.0)
    assert type(predictor.backend) is backends.BACKENDS[fmt]
    ref = RuntimePredictor(fp32, backend=fmt, conf=0.0)
    batch = prepared(ref, image)
    raw, raw32 = predictor.run(batch), ref.run(batch)
    assert {k: v.shape for k, v in raw.items()} == {k: v.shape for k, v in raw32.items()}
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in raw.values())
    # quantized, not garbage: the class logits follow the float ones
    corr = np.corrcoef(raw["logits"].ravel(), raw32["logits"].ravel())[0, 1]
    print(f"{fmt}: int8 vs fp32 logits correlation {corr:.3f}")
    assert corr > 0.8
    result = predictor(image)
    assert len(result) > 0 and result.masks.shape[1:] == image.shape[:2]
    assert all(name in NAMES for name in result.names)


def prepared(predictor, image: np.ndarray) -> np.ndarray:
    """The (1, 3, H, W) array the predictor feeds its network for `image`."""
    return input_arrays([image], predictor.info.input, predictor.imgsz)[0]


@pytest.mark.slow
def test_cli_export_int8_openvino_then_predict_and_val(tmp_path, data, capsys):
    """`export --format openvino --int8 --calib DATA` writes m.xml and m-int8.xml; `predict` and
    `val --backend openvino` run the int8 file."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from mobileinst.cli import main
    from mobileinst.train.config import TrainConfig
    from mobileinst.train.engine import train
    train(TrainConfig(data=str(data), out_dir=str(tmp_path / "run"), iters=2, imgsz=128, batch=2,
                      workers=0, num_queries=8, model="mobileinst-topformer-t"))
    pt = tmp_path / "run" / "weights" / "last.pt"
    xml = tmp_path / "m.xml"
    assert main(["export", "--weights", str(pt), "--format", "openvino", "--imgsz", "128", "128",
                 "--out", str(xml), "--int8", "--calib", str(data), "--calib-n", "4"]) == 0
    assert "m-int8.xml (int8" in capsys.readouterr().out
    q = tmp_path / "m-int8.xml"
    assert q.is_file() and q.with_suffix(".bin").is_file()
    assert "int8" in json.loads(metadata_path(q).read_text())
    assert main(["predict", "--weights", str(q), "--backend", "openvino", "--source",
                 str(data.parent / "val"), "--conf", "0", "--out-dir", str(tmp_path / "p")]) == 0
    assert "2 images" in capsys.readouterr().out
    assert main(["val", "--weights", str(q), "--backend", "openvino", "--data", str(data)]) == 0


# -- no runtime needed -----------------------------------------------------------------------------
def test_every_format_either_has_int8_or_says_why():
    from mobileinst.export.command import FORMATS
    assert set(INT8_FORMATS) | set(NO_INT8) == set(FORMATS)
    assert not set(INT8_FORMATS) & set(NO_INT8)
    assert "ncnn2table" in NO_INT8["ncnn"] and "ncnn2int8" in NO_INT8["ncnn"]


def test_int8_path_names():
    assert int8_path("a/m.xml") == Path("a/m-int8.xml")
    assert int8_path("m.pte") == Path("m-int8.pte") and int8_path("m.tflite") == Path("m-int8.tflite")


@pytest.mark.parametrize("fmt", sorted(NO_INT8))
def test_int8_for_a_format_without_it_is_one_line_before_loading(fmt, tmp_path, capsys):
    from mobileinst.cli import main
    missing = tmp_path / "missing.pt"  # never read: the option check comes first
    out = tmp_path / ("m_ncnn" if fmt == "ncnn" else "m.mlpackage")
    assert main(["export", "--weights", str(missing), "--format", fmt, "--int8", "--calib",
                 str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--int8 is not available for --format {fmt}" in err and "\n" not in err


def test_int8_needs_calib(tmp_path, capsys):
    from mobileinst.cli import main
    assert main(["export", "--weights", str(tmp_path / "missing.pt"), "--format", "openvino",
                 "--int8", "--out", str(tmp_path / "m.xml")]) == 2
    assert "--int8 needs --calib" in capsys.readouterr().err


def test_export_int8_refuses_other_formats(model):
    with pytest.raises(MobileInstError, match="no int8 for --format ncnn: ncnn int8 needs"):
        export_int8("ncnn", model, "m_ncnn", HW, [np.zeros((8, 8, 3), np.uint8)])


def test_litert_integer_io_is_quantized_and_dequantized():
    """A full-integer .tflite's int8 input / output are converted with their scale and zero point."""
    x = np.array([[0.0, 1.0, 127.5, 255.0, 300.0]], np.float32)
    detail = {"dtype": np.int8, "quantization": (1.0, -128)}
    q = quantize_io(x, detail)
    assert q.dtype == np.int8 and q.tolist() == [[-128, -127, 0, 127, 127]]  # rounded, clipped
    back = dequantize_io(q, detail)
    assert back.dtype == np.float32 and np.allclose(back[0, :2], [0.0, 1.0])
    f = {"dtype": np.float32, "quantization": (0.0, 0)}
    assert quantize_io(x, f) is x and dequantize_io(x, f) is x
    u = {"dtype": np.uint8, "quantization": (0.5, 10)}
    assert dequantize_io(quantize_io(np.float32([[2.0]]), u), u).tolist() == [[2.0]]
