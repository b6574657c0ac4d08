"""`ModelInfo` is the one contract between the exporters and the predictors: `to_metadata` writes
what `from_metadata` reads back, unchanged, for every kind of graph."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from mobileinst.models.model_info import FORMAT_VERSION, ModelInfo, graph_kind
from mobileinst.models.postprocess import InferenceConfig
from mobileinst.models.registry import get_config

BASE = ModelInfo.for_model(get_config("mobileinst-topformer-t"), imgsz=320, source="m.onnx")
NAMED = ModelInfo.for_model(get_config("mobileinst-mobilenetv2"), [f"c{i}" for i in range(80)],
                            list(range(101, 181)), imgsz=512, source="m.onnx")


@pytest.mark.parametrize("info", [
    BASE,  # a PyTorch model's
    BASE.for_graph("raw", (320, 480)),
    BASE.for_graph("raw", None, dtype="uint8"),
    BASE.for_graph("postprocess", (640, 640), batch=4, dtype="uint8", max_det=20, conf=0.3),
    BASE.for_graph("postprocess", None),
    BASE.for_graph("features", (256, 256)),
    NAMED.for_graph("raw", None),
    ModelInfo("m", 2, ("a", "b"), (1, 2), source="m.onnx",
              inference=InferenceConfig(0.1, 0.5, 7), graph_conf=0.25, graph="postprocess"),
], ids=lambda i: i.graph)
def test_to_metadata_is_the_inverse_of_from_metadata(info):
    meta = info.to_metadata({"exporter": "dynamo", "source": "best.pt"})
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert ModelInfo.from_metadata(info.source, meta) == info
    assert meta["format_version"] == str(FORMAT_VERSION) == "1"
    assert graph_kind(meta) == info.graph and list(json.loads(meta["outputs"])) == list(info.outputs)


def test_for_graph_sets_what_an_export_fixes():
    info = BASE.for_graph("postprocess", (320, 480), batch=2, dtype="uint8", max_det=1000, conf=0.3)
    assert info.input.size == (320, 480) and info.input.batch == 2 and info.input.dtype == "uint8"
    assert info.imgsz == 320  # a fixed graph's default short side is its own
    assert info.inference.max_detections == 100  # at most the queries
    assert info.graph_conf == 0.3 and info.outputs == ("labels", "scores", "masks", "kernels")
    assert info.part == "full" and BASE.for_graph("features").part == "features"
    dynamic = BASE.for_graph("raw", None)
    assert dynamic.input.size is None and dynamic.input.batch is None and dynamic.imgsz == 320


def test_files_written_before_the_writer_moved_still_read():
    """Metadata as `export_onnx` wrote it before `to_metadata` (key order and all), read the same."""
    old = {"producer": "mobileinst", "format_version": "1", "mobileinst_version": "0.1.0",
           "model_name": "mobileinst-topformer-t",
           "model_config": json.dumps(get_config("mobileinst-topformer-t").to_dict()),
           "class_names": json.dumps([str(i) for i in range(80)]),
           "cat_ids": json.dumps(list(range(1, 81))), "input_name": "images", "input_dtype": "uint8",
           "size_divisor": "32", "dynamic": "false", "input_size": "[320, 320]", "batch": "1",
           "imgsz": "320", "postprocess": "false",
           "outputs": json.dumps({"logits": "", "objectness": "", "kernels": "", "mask_features": ""}),
           "score_threshold": "0.005", "mask_threshold": "0.45", "max_det": "100",
           "exporter": "dynamo", "graph": "raw"}
    assert ModelInfo.from_metadata("m.onnx", old) == BASE.for_graph("raw", (320, 320), dtype="uint8")


@pytest.mark.parametrize("part", ["full", "features"])
def test_other_formats_write_the_same_metadata_in_a_sidecar(tmp_path, monkeypatch, part):
    """`export_format` writes `ModelInfo.to_metadata` (+ format) beside the file; it reads back
    to the ModelInfo the export was made from (the converter itself is stubbed here)."""
    from mobileinst import build_model
    from mobileinst.export import formats
    from mobileinst.models.model_info import metadata_path
    monkeypatch.setattr(formats, "require", lambda fmt: None)
    monkeypatch.setitem(formats.CONVERTERS, "litert", lambda graph, x, out: out.write_bytes(b"x") and out)
    model = build_model("mobileinst-topformer-t", num_classes=2)
    path = formats.export_format("litert", model, tmp_path / "m.tflite", (64, 96), class_names=["a", "b"],
                                 metadata={"source": "best.pt"}, cat_ids=[3, 7], part=part)
    meta = json.loads(metadata_path(path).read_text())
    assert meta["format"] == meta["exporter"] == "litert" and meta["source"] == "best.pt"
    info = ModelInfo.from_metadata(path, meta)
    want = formats.format_info(model, (64, 96), part, ["a", "b"], [3, 7])
    assert info == replace(want, source=str(path))
    assert info.graph == ("features" if part == "features" else "raw") and info.input.size == (64, 96)
