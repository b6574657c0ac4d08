"""Issue 23, second round: a full disk (ENOSPC) on every write is one line naming the file with the
old file intact and no temporary left; every metadata file and checkpoint field read is checked;
results that would be silently wrong are refused; sizes that would exhaust memory are refused up
front. All fast: tiny generated data and untrained tiny models, errors raised before any real work."""
from __future__ import annotations

import builtins
import json
import re
import errno
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from mobileinst.checkpoint import save_checkpoint
from mobileinst.cli import main
from mobileinst.errors import MobileInstError
from mobileinst.utils import write_json

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert all(w in err for w in words), err
    return err


# -- 1. a full disk: one line naming the file, the old file intact, no temporary left --------------
# FullFile and the full_disk fixture (every file opened for writing refuses its bytes with ENOSPC)
# are in conftest.py: the tracker's mp4 tests use them too.


def save_tiny_onnx(path: Path) -> None:
    helper, tensor = pytest.importorskip("onnx.helper"), pytest.importorskip("onnx").TensorProto
    from mobileinst.infer.onnx_graph import save_atomic
    io_ = [helper.make_tensor_value_info(n, tensor.FLOAT, [1]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", io_[:1], io_[1:])
    save_atomic(helper.make_model(graph), path)


def plot_into(path: Path) -> None:
    from mobileinst.viz import plot_curves
    csv = path.parent / "results.csv"
    csv.write_text("iteration,loss,AP,AP50,AP75\n1,0.5,0.1,0.2,0.1\n")
    plot_curves(csv, path.parent)


def overlay(path: Path) -> None:
    from mobileinst.viz import save_rgb
    save_rgb(path, np.zeros((8, 8, 3), np.uint8))


WRITERS: dict[str, tuple[str, Callable[[Path], Any]]] = {
    "write_json (predictions, val results, metadata)": ("out.json", lambda p: write_json(p, {"a": 1})),
    "save_checkpoint (last.pt, best.pt)": ("last.pt", lambda p: save_checkpoint({"model": {}}, p)),
    "export save_atomic (onnx)": ("m.onnx", save_tiny_onnx),
    "viz.plot_curves (loss.png)": ("loss.png", plot_into),
    "viz.save_rgb (overlays)": ("a.jpg", overlay),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, request, writer):
    name, write = WRITERS[writer]
    path = tmp_path / name
    path.write_bytes(b"the previous good file")
    request.getfixturevalue("full_disk")
    with pytest.raises(MobileInstError) as e:
        write(path)
    message = str(e.value)
    assert message.startswith(f"{path}: could not be written") and "(ENOSPC)" in message
    assert "\n" not in message
    assert path.read_bytes() == b"the previous good file"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_full_disk_on_the_rename_and_mkdir_is_named_too(tmp_path, monkeypatch):
    import os
    path = tmp_path / "out.json"
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(MobileInstError, match=r"out.json: could not be written: I/O error \(EIO\)"):
        write_json(path, [1])
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    (tmp_path / "file").write_text("")
    with pytest.raises(MobileInstError, match=r"could not be written: .*\((EEXIST|ENOTDIR)\)"):
        write_json(tmp_path / "file" / "sub" / "x.json", [1])


def test_train_run_folder_write_failure_is_one_line(tmp_path, monkeypatch, capsys):
    """results.csv on a full disk: the run stops with one line naming the file and the errno."""
    import mobileinst.train.engine as engine
    from mobileinst.data.synthetic import make_synthetic_coco
    data = make_synthetic_coco(tmp_path / "d", n_train=2, n_val=1, seed=0)

    def full_disk_open(file, mode="r", *args, **kwargs):
        if str(file).endswith("results.csv") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return builtins.open(file, mode, *args, **kwargs)
    monkeypatch.setattr(engine, "open", full_disk_open, raising=False)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out-dir", str(run), "--iters", "2",
                 "--log-interval", "1", "--imgsz", "64", "--batch", "1", "--workers", "0"]) == 2
    err = capsys.readouterr().err  # the progress bar shares stderr: one error line, no traceback
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error:" in line]
    assert "Traceback" not in err and len(errors) == 1, err
    assert f"{run / 'results.csv'}: could not be written" in errors[0] and "(ENOSPC)" in errors[0]


def test_cli_prints_an_unwrapped_os_error_as_one_line(monkeypatch, capsys):
    import mobileinst.cli as cli

    def fail(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/some/file")
    monkeypatch.setattr(cli, "cmd_models", fail)
    assert main(["models"]) == 2
    one_line_error(capsys, "mobileinst models: error: /some/file: No space left on device (ENOSPC)")


# -- 2. every metadata file and checkpoint field read is checked ----------------------------------
def good_meta(**change: str) -> dict[str, str]:
    from mobileinst.export.onnx import RAW_OUTPUTS
    meta = {"producer": "mobileinst", "format_version": "1", "model_name": "mobileinst-topformer-t",
            "model_config": json.dumps({"name": "mobileinst-topformer-t", "num_classes": 2}),
            "class_names": '["a", "b"]', "cat_ids": "[1, 2]", "input_dtype": "uint8",
            "size_divisor": "32", "input_size": "[64, 64]", "batch": "1", "imgsz": "64",
            "outputs": json.dumps(RAW_OUTPUTS), "score_threshold": "0.005",
            "mask_threshold": "0.45", "max_det": "100", "graph": "raw"}
    return {**meta, **change}


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("change, words", [
    ({"outputs": ["masks"]}, "metadata outputs must be a string"),
    ({"outputs": '"masks"'}, "metadata outputs '\"masks\"' is not a json object of output name"),
    ({"outputs": '{"masks": 3}'}, "metadata outputs '{\"masks\": 3}' is not a json object"),
    ({"format_version": "two"}, "metadata format_version 'two' is not an integer"),
    ({"batch": "many"}, "metadata batch 'many' is not an integer"),
    ({"batch": "0"}, "metadata batch '0' is not an integer in [1,"),
    ({"class_names": DEEP}, "metadata class_names '[[[["),
    ({"class_names": "[1, 2]"}, "is not a json list of strings"),
    ({"cat_ids": '["1", "2"]'}, "metadata cat_ids"),
    ({"input_size": "[64]"}, "metadata input_size"),
    ({"model_config": "[]"}, "metadata model_config '[]' is not a json object"),
    ({"score_threshold": "nan"}, "metadata score_threshold"),
    ({"input_dtype": "int4"}, "metadata input_dtype 'int4' is not one of uint8, float32"),
    ({"graph": "other"}, "metadata graph 'other' is not one of"),
    ({"conf": "{}"}, "metadata conf"),
])
def test_export_metadata_fields_are_checked(change, words):
    from mobileinst.errors import CheckpointError
    from mobileinst.models.model_info import ModelInfo
    ModelInfo.from_metadata("m.onnx", good_meta())  # the reference passes
    with pytest.raises(CheckpointError) as e:
        ModelInfo.from_metadata("m.onnx", good_meta(**change))
    assert str(e.value).startswith("m.onnx: ") and words in str(e.value) and "\n" not in str(e.value)
    assert len(str(e.value)) < 300


@pytest.mark.parametrize("sidecar, words", [
    ("{broken", "m.tflite.json: not a readable metadata json"),
    (json.dumps(["a", "list"]), "m.tflite: its metadata was not written by mobileinst"),
    (DEEP, "m.tflite.json: not a readable metadata json: nested too deeply"),
    (json.dumps(good_meta(outputs=7)), "m.tflite: metadata outputs must be a string"),
    (json.dumps(good_meta(batch=[1])), "m.tflite: metadata batch must be a string"),
])
def test_sidecar_metadata_is_one_line_naming_the_file(tmp_path, capsys, sidecar, words):
    model = tmp_path / "m.tflite"
    model.write_bytes(b"not read: the metadata is checked first")
    (tmp_path / "m.tflite.json").write_text(sidecar)
    from mobileinst.errors import CheckpointError
    from mobileinst.infer.runtimes import load_metadata
    with pytest.raises(CheckpointError, match="^" + re.escape(str(tmp_path))):
        load_metadata(model)
    (tmp_path / "img.jpg").write_bytes(b"x")
    argv = ["predict", "--weights", str(model), "--source", str(tmp_path / "img.jpg"),
            "--backend", "litert", "--out-dir", str(tmp_path / "out")]
    if main(argv) != 2:
        pytest.skip("the litert backend is not installed here")  # refused before the metadata
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and ("Traceback" not in err), err
    assert words in err or "not installed" in err or "pip install" in err, err


def identity_onnx(path: Path, meta: dict[str, str]) -> Path:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("images", TensorProto.UINT8, [1, 3, 64, 64])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 3, 64, 64])
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, path)
    return path


def test_a_foreign_graph_carrying_our_metadata_is_refused(tmp_path, capsys):
    onnx_file = identity_onnx(tmp_path / "foreign.onnx", good_meta())
    (tmp_path / "img.jpg").write_bytes(b"x")
    argv = ["predict", "--weights", str(onnx_file), "--source", str(tmp_path / "img.jpg"),
            "--backend", "onnxruntime", "--out-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    one_line_error(capsys, f"{onnx_file}: the graph lacks the outputs its mobileinst metadata names")


def test_onnx_metadata_with_a_wrong_type_is_one_line(tmp_path, capsys):
    onnx_file = identity_onnx(tmp_path / "m.onnx", good_meta(batch="lots"))
    (tmp_path / "img.jpg").write_bytes(b"x")
    assert main(["predict", "--weights", str(onnx_file), "--source", str(tmp_path / "img.jpg"),
                 "--backend", "onnxruntime", "--out-dir", str(tmp_path / "out")]) == 2
    one_line_error(capsys, f"{onnx_file}: metadata batch 'lots' is not an integer")


def tiny_state(**change: Any) -> dict[str, Any]:
    state = {"model": {}, "model_config": {"name": "mobileinst-topformer-t", "num_classes": 2},
             "class_names": ["a", "b"], "cat_ids": [1, 2], "ema": None,
             "train_config": {"imgsz": 64}}
    return {**state, **change}


@pytest.mark.parametrize("change, words", [
    ({"ema": [1, 2]}, "'ema' must be null or {'module': state dict"),
    ({"ema": {"module": "weights"}}, "'ema' must be null"),
    ({"cat_ids": "1,2"}, "'cat_ids' must be a list of integers, got str"),
    ({"cat_ids": ["1", "2"]}, "'cat_ids' must be a list of integers"),
    ({"class_names": [1, 2]}, "'class_names' must be a list of strings"),
    ({"model_config": ["x"]}, "'model_config' must be a dict"),
    ({"train_config": "fast"}, "'train_config' must be a dict"),
    ({"train_config": {"imgsz": 0}}, "training size imgsz 0 is outside [32, 4096]"),
    ({"train_config": {"imgsz": 20000}}, "training size imgsz 20000 is outside [32, 4096]"),
])
def test_checkpoint_fields_are_checked_when_loaded(tmp_path, capsys, change, words):
    ckpt = tmp_path / "edited.pt"
    save_checkpoint(tiny_state(**change), ckpt)
    (tmp_path / "img.jpg").write_bytes(b"x")
    assert main(["predict", "--weights", str(ckpt), "--source", str(tmp_path / "img.jpg"),
                 "--out-dir", str(tmp_path / "out")]) == 2
    one_line_error(capsys, f"{ckpt}: ", words)


# -- 3. results that would be silently wrong are refused --------------------------------------------
@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from mobileinst.data.synthetic import make_synthetic_coco
    return make_synthetic_coco(tmp_path_factory.mktemp("synth"), n_train=2, n_val=1, seed=0)


@pytest.fixture(scope="module")
def tiny_weights() -> dict[str, Any]:
    """An untrained 4-class model's checkpoint contents (the synthetic set's classes)."""
    from mobileinst.data.synthetic import CLASSES
    from mobileinst.models.factory import build_model
    model = build_model("mobileinst-topformer-t", num_classes=len(CLASSES), num_queries=8)
    return {"model": model.state_dict(), "model_config": model.cfg.to_dict(), "ema": None,
            "class_names": list(CLASSES), "cat_ids": list(range(1, len(CLASSES) + 1)),
            "train_config": {"imgsz": 64}}


@pytest.mark.parametrize("case", ["other names", "permuted ids", "fewer classes"])
def test_val_refuses_a_checkpoint_of_other_classes(synth, tiny_weights, tmp_path, capsys, case):
    from mobileinst.data.synthetic import CLASSES
    names, ids = list(CLASSES), list(range(1, len(CLASSES) + 1))
    if case == "other names":
        names = ["cat", "dog", "bird", "fish"]
    elif case == "permuted ids":
        ids = [2, 1, 3, 4]
    ckpt = tmp_path / "w.pt"
    if case == "fewer classes":
        from mobileinst.models.factory import build_model
        model = build_model("mobileinst-topformer-t", num_classes=2, num_queries=8)
        save_checkpoint({**tiny_weights, "model": model.state_dict(), "model_config": model.cfg.to_dict(),
                         "class_names": names[:2], "cat_ids": ids[:2]}, ckpt)
    else:
        save_checkpoint({**tiny_weights, "class_names": names, "cat_ids": ids}, ckpt)
    assert main(["val", "--weights", str(ckpt), "--data", str(synth), "--workers", "0"]) == 2
    one_line_error(capsys, "instances_val.json: its categories are not the classes", str(ckpt))


def test_val_of_the_datas_own_classes_runs(synth, tiny_weights, tmp_path, capsys):
    ckpt = tmp_path / "w.pt"
    save_checkpoint(tiny_weights, ckpt)
    assert main(["val", "--weights", str(ckpt), "--data", str(synth), "--workers", "0",
                 "--imgsz", "64"]) == 0


def test_a_file_named_like_a_glob_is_that_file(tmp_path):
    from mobileinst.data.sources import list_sources
    image = tmp_path / "photo[1].jpg"
    image.write_bytes(b"x")
    assert list_sources(image) == [image]
    assert list_sources(tmp_path) == [image]


def test_a_symlink_loop_lists_each_image_once(tmp_path):
    from mobileinst.data.sources import list_sources
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "loop").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "again.jpg").symlink_to(tmp_path / "a.jpg")
    assert list_sources(f"{tmp_path}/**/*.jpg") == [tmp_path / "a.jpg"]
    assert list_sources(tmp_path) == [tmp_path / "a.jpg"]


def test_data_synth_video_writes_the_asked_counts(tmp_path):
    assert main(["data", "synth", "--video", "--n-train", "2", "--n-val", "2", "--out",
                 str(tmp_path / "v")]) == 0
    for split in ("train", "val"):
        videos = json.loads((tmp_path / "v" / "annotations" / f"{split}.json").read_text())["videos"]
        assert len(videos) == 2
        assert len(list((tmp_path / "v" / split / "JPEGImages").iterdir())) == 2


@pytest.mark.parametrize("seed", ["-1", str(2**40)])
@pytest.mark.parametrize("verb", ["data synth", "train"])
def test_seed_out_of_range_is_one_line(synth, tmp_path, capsys, seed, verb):
    if verb == "data synth":
        argv = ["data", "synth", "--out", str(tmp_path / "d"), "--seed", seed]
    else:
        argv = ["train", "--data", str(synth), "--out-dir", str(tmp_path / "r"), "--iters", "1",
                "--seed", seed]
    assert main(argv) == 2
    one_line_error(capsys, "seed must be in [0, 4294967295]", seed)
    assert not (tmp_path / "d").exists() and not (tmp_path / "r").exists()


def test_export_int8_checks_the_calibration_source_first(tmp_path, capsys):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not read: the calibration source is checked first")
    empty = tmp_path / "empty"
    empty.mkdir()
    for calib, words in ((empty, "no images found"), (tmp_path / "nothing", "no such file, folder")):
        assert main(["export", "--weights", str(weights), "--int8", "--calib", str(calib)]) == 2
        one_line_error(capsys, str(calib), words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "w.pt"]


def test_benchmark_fails_when_a_requested_format_is_skipped(monkeypatch, tmp_path, capsys):
    import mobileinst.benchmark as benchmark
    rows = [{"format": "torch", "status": "ok"},
            {"format": "openvino", "status": "skipped: openvino: not installed (no openvino): "
                                                "pip install 'mobileinst[openvino]'"}]
    monkeypatch.setattr(benchmark, "run_benchmark", lambda *a, **k: rows)
    monkeypatch.setattr(benchmark, "config_from_args", lambda args: args)
    args = type("A", (), {"weights": "w", "data": "d", "formats": ["openvino"], "threads": [1],
                          "imgsz": None, "runs": 1, "warmup": 0, "conf": 0.3, "int8": False,
                          "calib": None, "calib_n": 1, "out": None})()
    with pytest.raises(MobileInstError, match=r"1 requested format\(s\) not measured: openvino: "
                                              r"not installed .*mobileinst\[openvino\]"):
        benchmark.cmd_benchmark(args)
    benchmark.check_none_skipped(rows[:1])  # all measured: no error


# -- 4. sizes that would exhaust memory are refused up front -----------------------------------------
@pytest.fixture
def four_gb(monkeypatch):
    import mobileinst.utils as utils
    monkeypatch.setattr(utils, "available_memory", lambda: 4 * 10**9)


def test_predict_at_an_imgsz_beyond_memory_is_refused_before_any_image(tiny_weights, tmp_path,
                                                                        capsys, four_gb):
    ckpt = tmp_path / "w.pt"
    save_checkpoint(tiny_weights, ckpt)
    (tmp_path / "img.jpg").write_bytes(b"not read: refused before")
    assert main(["predict", "--weights", str(ckpt), "--source", str(tmp_path / "img.jpg"),
                 "--imgsz", "4096", "--out-dir", str(tmp_path / "out")]) == 2
    err = one_line_error(capsys, "--imgsz 4096: inference at 4096x5459 needs about 5.6 GB",
                         "only 4.0 GB is available; use --imgsz 3456 or less")
    assert "Traceback" not in err


@pytest.mark.parametrize("verb", ["train", "val"])
def test_train_and_val_batches_beyond_memory_are_refused(synth, tiny_weights, tmp_path, capsys,
                                                         four_gb, verb):
    ckpt = tmp_path / "w.pt"
    save_checkpoint(tiny_weights, ckpt)
    if verb == "train":
        argv = ["train", "--data", str(synth), "--out-dir", str(tmp_path / "r"), "--imgsz", "2048",
                "--batch", "4", "--iters", "1"]
    else:
        argv = ["val", "--weights", str(ckpt), "--data", str(synth), "--imgsz", "2048", "--batch", "4"]
    assert main(argv) == 2
    need = "17.9 GB (~800 bytes" if verb == "train" else "5.6 GB (~250 bytes"  # training keeps more
    one_line_error(capsys, "--imgsz 2048: ", f"x 4 images needs about {need}", "or a smaller batch")
    assert not (tmp_path / "r").exists()


def test_training_is_checked_at_trainings_memory_not_inferences(synth, tmp_path, capsys, four_gb):
    """One 2048 image: inference's 1.4 GB fits in 4 GB, training's ~800 bytes per pixel (4.5 GB)
    does not (measured: 800-930 bytes at batch 1, 1210-1370 at 640 x 16; utils.TRAIN_BYTES_PER_PIXEL)."""
    argv = ["train", "--data", str(synth), "--out-dir", str(tmp_path / "r"), "--imgsz", "2048",
            "--batch", "1", "--iters", "1"]
    assert main(argv) == 2
    one_line_error(capsys, "--imgsz 2048: training at 2048x2730 needs about 4.5 GB",
                   "use --imgsz 1920 or less")
    assert not (tmp_path / "r").exists()


def test_an_annotation_file_with_too_many_categories_is_refused(synth, tmp_path, capsys):
    gt = json.loads((synth.parent / "annotations" / "instances_val.json").read_text())
    gt["categories"] = [{"id": i, "name": f"c{i}"} for i in range(1, 100_001)]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text("[]")
    assert main(["eval", "--gt", str(tmp_path / "gt.json"), "--results", str(tmp_path / "results.json")]) == 2
    one_line_error(capsys, "gt.json: 100000 categories, more than the 2000 mobileinst takes")
