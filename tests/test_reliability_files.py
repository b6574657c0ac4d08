"""Issue 23, files: nothing of the user's overwritten or deleted, outputs never an input, a crafted
polygon refused before it reaches pycocotools' C code (it was a SIGSEGV), atomic writes with the
mode a plain write gives, `eval --gt` checked by the dataset validator. All fast: tiny generated
data, checks that run before any model is loaded."""
from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from mobileinst.checkpoint import save_checkpoint
from mobileinst.cli import main
from mobileinst.data.synthetic import make_synthetic_coco
from mobileinst.data.validate import check_segmentation
from mobileinst.errors import MobileInstError
from mobileinst.utils import folder_lock, write_json

FAR = 1e9  # a coordinate that crashed pycocotools' polygon -> RLE conversion (SIGSEGV)
TRIANGLE_FAR = [[0.0, 0.0, FAR, 0.0, FAR, FAR]]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_synthetic_coco(tmp_path_factory.mktemp("synth"), n_train=2, n_val=1, seed=0)


def val_json(data: Path) -> Path:
    return data.parent / "annotations" / "instances_val.json"


def edited_copy(src: Path, dst: Path, edit: Callable[[dict], Any]) -> Path:
    d = json.loads(src.read_text())
    edit(d)
    dst.write_text(json.dumps(d))
    return dst


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert all(w in err for w in words), err
    return err


# -- 1. the user's files are never replaced ----------------------------------------------------------
def synth(out: Path, *extra: str) -> int:
    return main(["data", "synth", "--out", str(out), "--n-train", "2", "--n-val", "1", *extra])


def test_data_synth_refuses_a_folder_with_the_users_files(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "train").mkdir(parents=True)
    (out / "data.yaml").write_text("my: own data\n")
    (out / "train" / "train_00000.jpg").write_bytes(b"my photo")
    before = snapshot(out)
    assert synth(out) == 2
    one_line_error(capsys, str(out), "did not write", "--exist-ok")
    assert synth(out, "--exist-ok") == 2  # it would replace data.yaml and the image: refused too
    one_line_error(capsys, "not written by mobileinst", "nothing was written")
    assert snapshot(out) == before


def test_data_synth_exist_ok_writes_beside_the_users_files_and_reruns_over_its_own(tmp_path, capsys):
    out = tmp_path / "beside"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert synth(out, "--exist-ok") == 0
    assert (out / "notes.txt").read_text() == "keep me" and (out / "data.yaml").is_file()
    assert synth(out) == 2  # notes.txt is still not ours
    capsys.readouterr()
    ours = tmp_path / "ours"
    assert synth(ours) == 0 and synth(ours) == 0  # a folder of its own output: rewritten
    assert not [p for p in ours.iterdir() if p.name.startswith(".mobileinst-stage-")]


@pytest.mark.parametrize("target", ["val json", "weights", "data yaml"])
def test_val_out_naming_an_input_is_refused(data, tmp_path, capsys, target):
    weights = tmp_path / "best.pt"
    weights.write_bytes(b"refused before it is read")
    out = {"val json": val_json(data), "weights": weights, "data yaml": data}[target]
    before = out.read_bytes()
    assert main(["val", "--weights", str(weights), "--data", str(data), "--out", str(out)]) == 2
    one_line_error(capsys, str(out), "this command reads", "choose another path")
    assert out.read_bytes() == before


@pytest.mark.parametrize("weights_name, out_name", [("best.pt", "best.pt"), ("m.onnx", None)])
def test_export_out_naming_the_checkpoint_is_refused(tmp_path, capsys, weights_name, out_name):
    weights = tmp_path / weights_name  # None: the default out, beside the weights: m.onnx itself
    weights.write_bytes(b"refused before it is read")
    argv = ["export", "--weights", str(weights)] + (["--out", str(tmp_path / out_name)] if out_name else [])
    assert main(argv) == 2
    one_line_error(capsys, "--weights file this command reads")
    assert weights.read_bytes() == b"refused before it is read"


def test_train_exist_ok_never_deletes_the_users_files(tmp_path):
    from mobileinst.train.run_dir import clear_run
    foreign = tmp_path / "foreign"  # not a mobileinst run: its config.yaml and weights are the user's
    (foreign / "weights").mkdir(parents=True)
    (foreign / "weights" / "mymodel.onnx").write_bytes(b"mine")
    (foreign / "config.yaml").write_text("my: settings\n")
    run = tmp_path / "run"  # a run into which the user later put a file of theirs
    (run / "weights").mkdir(parents=True)
    (run / "weights" / "mymodel.onnx").write_bytes(b"mine")
    (run / "weights" / "last.pt").write_bytes(b"old run")
    (run / "config.yaml").write_text("train: {}\nmodel: {}\nclass_names: []\n")
    before = snapshot(foreign)
    with contextlib.suppress(MobileInstError):  # refusing the folder is as good
        clear_run(foreign)
    clear_run(run)
    assert snapshot(foreign) == before
    assert (run / "weights" / "mymodel.onnx").read_bytes() == b"mine"
    assert not (run / "weights" / "last.pt").exists()


def test_predict_never_replaces_an_earlier_predictions_json(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jpg").write_bytes(b"refused before it is read")
    out = tmp_path / "pred"
    out.mkdir()
    (out / "predictions.json").write_text('["the earlier run\'s"]')
    argv = ["predict", "--weights", str(tmp_path / "w.pt"), "--source", str(tmp_path / "src"),
            "--out-dir", str(out)]
    assert main(argv) == 2
    one_line_error(capsys, "predictions.json of an earlier predict", "--exist-ok")
    with folder_lock(out, "output folder (--out-dir)"):  # a predict still writing there
        assert main([*argv, "--exist-ok"]) == 2
        one_line_error(capsys, str(out), "another command is writing")
    assert (out / "predictions.json").read_text() == '["the earlier run\'s"]'
    assert main([*argv, "--exist-ok"]) == 2  # let through: it fails later, on the fake weights
    assert "predictions.json" not in capsys.readouterr().err


# -- 2. coordinates and sizes bounded before C code ----------------------------------------------------
def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mobileinst.cli", *argv], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, f"exit {proc.returncode} (negative: killed by a signal): {proc.stderr[-500:]}"
    err = proc.stderr.strip()
    assert "\n" not in err and all(w in err for w in words), err


def test_sigsegv_guard_eval_results_polygon(data, tmp_path):
    image_id = json.loads(val_json(data).read_text())["images"][0]["id"]
    results = tmp_path / "far.json"
    results.write_text(json.dumps([{"image_id": image_id, "category_id": 1, "score": 0.9,
                                    "segmentation": TRIANGLE_FAR}]))
    proc = run_cli("eval", "--gt", str(val_json(data)), "--results", str(results))
    assert_refused(proc, "far.json: record 0", "far outside the image")


def test_sigsegv_guard_training_json_polygon(data, tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    (root / "annotations").mkdir()
    for name in ("train", "val"):
        (root / name).symlink_to(data.parent / name)
    edited_copy(val_json(data), root / "annotations" / "instances_val.json", lambda d: None)
    src = data.parent / "annotations" / "instances_train.json"
    edited_copy(src, root / "annotations" / "instances_train.json",
                lambda d: d["annotations"][0].update(segmentation=TRIANGLE_FAR))
    (root / "data.yaml").write_text(data.read_text())
    proc = run_cli("train", "--data", str(root / "data.yaml"), "--out-dir", str(tmp_path / "run"),
                   "--iters", "1", "--batch", "1", "--workers", "0", "--imgsz", "64")
    assert_refused(proc, "instances_train.json: annotation", "far outside image")
    assert not (tmp_path / "run" / "weights").exists()


@pytest.mark.parametrize("far", [1e8, -1e8, 1e9])
def test_validator_bounds_polygon_coordinates(far):
    problem, _ = check_segmentation([[10, 10, far, 10, 50, 50]], (120, 128), "image 1")
    assert "far outside image 1 (128 wide, 120 high)" in problem
    assert check_segmentation([[-5, -5, 130, 0, 60, 125]], (120, 128), "image 1") == (None, False)


@pytest.mark.parametrize("case, edit, words", [
    ("iscrowd a string", lambda d: d["annotations"][0].update(iscrowd="0"),
     ["iscrowd must be 0 or 1, got '0' (a string)"]),
    ("height 1e9", lambda d: d["images"][0].update(height=10**9), ["height 1000000000 is over 65535"]),
    ("far polygon", lambda d: d["annotations"][0].update(segmentation=TRIANGLE_FAR), ["far outside image"]),
])
def test_eval_ground_truth_goes_through_the_dataset_validator(data, tmp_path, capsys, case, edit, words):
    gt = edited_copy(val_json(data), tmp_path / "gt.json", edit)
    results = tmp_path / "results.json"
    results.write_text("[]")
    assert main(["eval", "--gt", str(gt), "--results", str(results)]) == 2
    one_line_error(capsys, "gt.json: ", *words)


# -- 3. atomic writes keep a plain write's mode ----------------------------------------------------------
@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def save_tiny_onnx(path: Path) -> None:
    """An Identity graph written by the exporter's atomic save."""
    helper, tensor = pytest.importorskip("onnx.helper"), pytest.importorskip("onnx").TensorProto
    from mobileinst.infer.onnx_graph import save_atomic
    io = [helper.make_tensor_value_info(n, tensor.FLOAT, [1]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", io[:1], io[1:])
    save_atomic(helper.make_model(graph), path)


WRITERS = {
    "write_json": lambda p: write_json(p, {"a": 1}),
    "save_checkpoint": lambda p: save_checkpoint({"model": {}, "model_config": {}}, p),
    "export save_atomic": save_tiny_onnx,
}


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize("mask", [0o022, 0o002], ids=["umask-022", "umask-002"])
def test_atomic_writes_get_the_umask_mode(tmp_path, writer, mask):
    path = tmp_path / "out.file"
    with umask(mask):
        WRITERS[writer](path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    path.chmod(0o640)  # replacing a file keeps its mode, as open("w") would
    WRITERS[writer](path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["out.file"]  # no temporary left

