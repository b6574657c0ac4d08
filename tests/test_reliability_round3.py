"""Issue 23, third round: `track --out-dir`, `demo --out` and `benchmark --out` never replace or
remove a file mobileinst did not write and refuse a second command writing into the folder (as
`predict` and `data synth` do); a killed track leaves no file under a final name; a failed image
write of `data synth` is one error naming the image, and no json names an image that was not
written; benchmarks/peak_rss.py's train row at a given batch and size. All fast: refusals come
before any model is loaded, the runs use a tiny model at 64 px."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from mobileinst.cli import main
from mobileinst.errors import MobileInstError
from mobileinst.utils import WRITTEN_MANIFEST, folder_lock, write_json, written_files
from test_reliability_files import one_line_error, snapshot
from test_reliability_memory_video import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def second_writer_refused(argv: list[str], out: Path, what: str, capsys) -> None:
    """`argv` (writing into `out`) while another command holds `out`'s lock, as a running one
    does: exit 2, one line naming `out`, nothing written."""
    out.mkdir()
    with folder_lock(out, what):
        assert main(argv) == 2
        one_line_error(capsys, str(out), f"another command is writing into this {what}")
    assert list(out.iterdir()) == []


def users_files(folder: Path) -> dict[str, bytes]:
    """`snapshot` without mobileinst's manifests (a refusal may have claimed other names)."""
    return {k: v for k, v in snapshot(folder).items() if Path(k).name != WRITTEN_MANIFEST}


# -- track --out-dir ---------------------------------------------------------------------------------
def noise_video(path: Path, frames: int) -> Path:
    """An mp4 of `frames` noise frames, 96 x 64."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (96, 64))
    rng = np.random.default_rng(0)
    for _ in range(frames):
        w.write(rng.integers(0, 255, (64, 96, 3), np.uint8))
    w.release()
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[Path, Path]:
    """(a 3-frame clip.mp4, a tiny 10-query checkpoint trained at 64 px)."""
    root = tmp_path_factory.mktemp("clip")
    return noise_video(root / "short" / "clip.mp4", 3), tiny_checkpoint(root / "w.pt", num_queries=10)


def track_argv(weights: Path, source: Path, out: Path, *extra: str) -> list[str]:
    return ["track", "--weights", str(weights), "--source", str(source), "--out-dir", str(out),
            "--imgsz", "64", "--device", "cpu", *extra]


@pytest.mark.parametrize("name", ["results.json", "summary.json", "clip.mp4"])
def test_track_never_replaces_a_users_file(clip, tmp_path, capsys, name):
    video, weights = clip
    out = tmp_path / "mine"
    out.mkdir()
    (out / name).write_bytes(b"my own " + name.encode())
    before = snapshot(out)
    assert main(track_argv(weights, video, out)) == 2
    one_line_error(capsys, str(out / name), "not written by mobileinst", "nothing was written")
    assert snapshot(out) == before  # not even a manifest


def test_track_writes_beside_the_users_files_and_reruns_over_its_own(clip, tmp_path, capsys):
    video, weights = clip
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_bytes(b"keep me")
    assert main(track_argv(weights, video, out)) == 0
    assert written_files(out) == {"clip.mp4", "results.json", "summary.json"}
    assert main(track_argv(weights, video, out, "--no-video")) == 0  # its own files: replaced
    assert json.loads((out / "summary.json").read_text())["video"] is None
    assert (out / "notes.txt").read_bytes() == b"keep me" and (out / "clip.mp4").is_file()


def test_a_second_track_into_the_folder_is_refused(clip, tmp_path, capsys):
    video, weights = clip
    out = tmp_path / "busy"
    second_writer_refused(track_argv(weights, video, out), out, "track output folder (--out-dir)", capsys)


def test_a_killed_track_leaves_no_file_under_its_names_and_a_rerun_works(clip, tmp_path, capsys):
    """SIGKILL mid-video (the mp4's temporary is being written): no clip.mp4 / results.json /
    summary.json, the lock gone with the process, and a rerun into the folder writes them."""
    short, weights = clip
    long = noise_video(tmp_path / "long" / "clip.mp4", 3000)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mobileinst.cli", *track_argv(weights, long, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob(".clip.mp4.*.tmp.mp4")) and time.monotonic() < deadline:
            assert proc.poll() is None, "the track ended before it was killed"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert list(out.glob(".clip.mp4.*.tmp.mp4")), "no frame was being written"
    assert not any((out / n).exists() for n in ("clip.mp4", "results.json", "summary.json"))
    assert main(track_argv(weights, short, out)) == 0
    assert json.loads((out / "summary.json").read_text())["complete"] is True


# -- demo --out --------------------------------------------------------------------------------------
@pytest.fixture
def demo(monkeypatch):
    """mobileinst.demo with its work replaced by a failure: a refusal must come before it."""
    import mobileinst.demo as demo

    def started(*args, **kwargs):
        raise AssertionError("the demo started working")
    monkeypatch.setattr(demo, "make_hard_coco", started)
    monkeypatch.setattr(demo, "train", started)
    return demo


@pytest.mark.parametrize("name", ["val_results.json", "data/data.yaml", "predict/predictions.json",
                                  "video_data/train/JPEGImages/x.jpg", "track/results.json",
                                  "track/val_0000.mp4"])
def test_demo_refuses_before_any_work_to_replace_a_users_file(demo, tmp_path, name):
    out = tmp_path / "demo"
    (out / name).parent.mkdir(parents=True)
    (out / name).write_bytes(b"mine")
    before = users_files(out)
    first = name.split("/")[0]
    with pytest.raises(MobileInstError, match=re.escape(str(out / first))):
        demo.run_demo(out, fast=True)
    assert users_files(out) == before


def test_a_second_demo_into_the_folder_is_refused(demo, tmp_path, capsys):
    out = tmp_path / "demo"
    second_writer_refused(["demo", "--fast", "--out", str(out)], out, "demo folder (--out)", capsys)


def test_an_interrupted_demo_data_step_leaves_no_file_under_its_names(demo, tmp_path, monkeypatch):
    """Ctrl-C once the data set is written but before it is moved in: data/ holds no file (the
    staging folder is gone with it); a rerun would not meet a half data set."""
    from mobileinst.data.synthetic_hard import make_hard_coco

    def interrupted(folder: Path, **kwargs) -> Path:
        make_hard_coco(folder, n_train=2, n_val=1)
        raise KeyboardInterrupt
    monkeypatch.setattr(demo, "make_hard_coco", interrupted)
    out = tmp_path / "demo"
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out, fast=True)
    assert [p for p in (out / "data").rglob("*") if p.is_file()] == []


# -- benchmark --out ---------------------------------------------------------------------------------
@pytest.fixture
def bench(tmp_path) -> list[str]:
    """benchmark's options up to --out: a .pt and a DATA yaml that pass the option checks (they
    come first) and would fail as soon as they are read."""
    (tmp_path / "w.pt").write_bytes(b"not read: the folder is refused first")
    (tmp_path / "data.yaml").write_text("not read either")
    return ["benchmark", "--weights", str(tmp_path / "w.pt"), "--data", str(tmp_path / "data.yaml"),
            "--formats", "onnx", "--out"]


def test_benchmark_refuses_a_folder_with_the_users_files(bench, tmp_path, capsys):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "w.onnx").write_bytes(b"my own export, which the benchmark's would replace")
    before = snapshot(out)
    assert main([*bench, str(out)]) == 2
    one_line_error(capsys, str(out), "did not write", "w.onnx")
    assert snapshot(out) == before


def test_a_second_benchmark_into_the_folder_is_refused(bench, tmp_path, capsys):
    out = tmp_path / "bench"
    second_writer_refused([*bench, str(out)], out, "benchmark folder (--out)", capsys)


def test_benchmark_records_what_it_wrote_so_a_rerun_may_replace_it(bench, tmp_path, monkeypatch):
    """The measuring itself stood in for (`_benchmark`): its files, also those of a run that
    failed, are recorded as mobileinst's; a file of the user's added later is refused."""
    from mobileinst import benchmark
    fail = []

    def measured(out_dir: Path, *opts) -> list[dict]:
        write_json(out_dir / "records" / "torch-t1.json", [])
        write_json(out_dir / "benchmark.json", {"rows": []})
        if fail:
            write_json(out_dir / "records" / "onnx-t1.json", [])
            raise MobileInstError("the row failed")
        return []
    monkeypatch.setattr(benchmark, "_benchmark", measured)
    out, weights, data = tmp_path / "b", bench[2], bench[4]
    assert benchmark.run_benchmark(weights, data, out=out) == []
    assert written_files(out) == {"benchmark.json", "records/torch-t1.json"}
    fail.append(True)
    with pytest.raises(MobileInstError, match="the row failed"):  # its own error, not the manifest's
        benchmark.run_benchmark(weights, data, out=out)
    assert "records/onnx-t1.json" in written_files(out)
    (out / "mine.txt").write_text("added by the user")
    with pytest.raises(MobileInstError, match="mine.txt"):
        benchmark.run_benchmark(weights, data, out=out)
    assert (out / "mine.txt").read_text() == "added by the user"


# -- data synth: every image write checked ------------------------------------------------------------
def encoder_failing_from(monkeypatch, call: int) -> None:
    """cv2.imencode fails (False, as cv2.imwrite returns on a failure) from its `call`-th call."""
    real, calls = cv2.imencode, []

    def imencode(ext, img, params=()):
        calls.append(ext)
        return (False, None) if len(calls) >= call else real(ext, img, params)
    monkeypatch.setattr(cv2, "imencode", imencode)


def json_names_only_written_images(root: Path) -> None:
    for path in (root / "annotations").glob("*.json"):
        d = json.loads(path.read_text())
        names = [img["file_name"] for img in d.get("images", [])]
        names += [f for v in d.get("videos", []) for f in v["file_names"]]
        split = path.stem.removeprefix("instances_")
        images = root / split / ("JPEGImages" if "videos" in d else "")
        assert all((images / n).is_file() for n in names), path


def test_a_failed_image_write_names_the_image_and_no_json_names_it(tmp_path, monkeypatch):
    from mobileinst.data.synthetic import make_synthetic_coco
    encoder_failing_from(monkeypatch, 4)  # train: 3 images; the first val image fails
    with pytest.raises(MobileInstError, match=r"val_00000\.jpg: could not be written"):
        make_synthetic_coco(tmp_path, n_train=3, n_val=2)
    assert (tmp_path / "annotations" / "instances_train.json").is_file()
    assert not (tmp_path / "annotations" / "instances_val.json").exists()
    json_names_only_written_images(tmp_path)


def test_a_failed_video_frame_write_names_the_frame(tmp_path, monkeypatch):
    from mobileinst.data.synthetic_video import make_synthetic_ytvis
    encoder_failing_from(monkeypatch, 5)
    with pytest.raises(MobileInstError, match=r"train_0000/00004\.jpg: could not be written"):
        make_synthetic_ytvis(tmp_path, n_train=1, n_val=1, length=6)
    assert not (tmp_path / "annotations" / "train.json").exists()


@pytest.mark.parametrize("extra", [[], ["--video"], ["--preset", "hard"]])
def test_data_synth_on_a_full_disk_is_one_line_naming_the_image(tmp_path, capsys, request, extra):
    out = tmp_path / "synth"
    request.getfixturevalue("full_disk")
    assert main(["data", "synth", "--out", str(out), "--n-train", "1", "--n-val", "1", *extra]) == 2
    err = one_line_error(capsys, "could not be written: No space left on device (ENOSPC)")
    assert re.search(r"(train_00000\.(jpg|png)|train_0000/00000\.jpg): could not", err), err
    assert [p for p in out.rglob("*") if p.is_file()] == []  # nothing under a final name


def test_a_second_data_synth_into_the_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "synth"
    second_writer_refused(["data", "synth", "--out", str(out), "--n-train", "1", "--n-val", "1"], out,
                          "output folder (--out)", capsys)


# -- benchmarks/peak_rss.py: a training step's peak at a batch and size -------------------------------
def test_peak_rss_train_row_runs_at_a_batch_and_size(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("peak_rss", ROOT / "benchmarks" / "peak_rss.py")
    peak_rss = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peak_rss)
    table = tmp_path / "peak.md"
    peak_rss.main(["--rows", "train", "--batch", "2", "--imgsz", "64", "--iters", "2", "--out", str(table)])
    row = [c.strip() for c in table.read_text().splitlines()[-1].strip("|").split("|")]
    assert row[0] == "train" and "batch 2, --imgsz 64" in row[1] and row[2] == "0", row
    assert float(row[3]) > 0 and float(row[4]) > 0, row  # peak MiB, bytes per input pixel
