"""Adversarial use of the CLI, as a table: every case is a one-line error (exit code 2, the file or
option named, no traceback), or a correct result. The data-side and prediction-side cases live in
tests/test_data_validation.py and tests/test_predict_robust.py."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mobileinst.checkpoint import load_checkpoint, save_checkpoint
from mobileinst.cli import main
from mobileinst.data.synthetic import make_synthetic_coco
from mobileinst.train.config import TrainConfig
from mobileinst.train.engine import train

TINY = dict(model="mobileinst-topformer-t", imgsz=128, batch=2, workers=0, lr=1e-3,
            warmup_iters=2, num_queries=8, seed=3)


class Payload:
    """Unpickling this runs `Path(marker).touch()`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny trained run, its DATA file, a folder of frames, and bad files to feed the CLI."""
    root = tmp_path_factory.mktemp("fuzz")
    data = make_synthetic_coco(root / "synth", n_train=6, n_val=2, seed=0)
    run = root / "run"
    train(TrainConfig(data=str(data), out_dir=str(run), iters=2, eval_interval=2, **TINY))
    frames = root / "frames"
    frames.mkdir()
    for i, p in enumerate(sorted((data.parent / "val").iterdir())[:2]):
        shutil.copy(p, frames / f"{i:03d}.jpg")
    (root / "a_file").write_text("not a folder")
    ckpt = load_checkpoint(run / "weights" / "last.pt")
    save_checkpoint({**ckpt, "class_names": ckpt["class_names"][:1]}, root / "short_names.pt")
    save_checkpoint({**ckpt, "format_version": 99}, root / "future.pt")  # save adds its own version
    future = torch.load(root / "future.pt", weights_only=True)
    torch.save({**future, "format_version": 99}, root / "future.pt")
    (root / "batch_two.yaml").write_text("warmup_iters: two\n")
    (root / "typo.yaml").write_text("lr: 0.001\nbacth: 2\n")
    return {"root": root, "data": data, "run": run, "last": run / "weights" / "last.pt",
            "frames": frames}


def _train(*extra: str) -> list[str]:
    return ["train", "--data", "{data}", "--model", "mobileinst-topformer-t", "--imgsz", "128",
            "--batch", "2", "--workers", "0", "--num-queries", "8", *extra]


# (case, argv with {root} / {data} / {last} / {frames} / {run} placeholders, words the one error
# line must contain)
ERRORS = [
    ("train lr negative", _train("--lr", "-0.001"), "lr must be in"),
    ("train batch 0", _train("--batch", "0"), "batch must be in"),
    ("train workers -1", _train("--workers", "-1"), "workers must be in"),
    ("train num-queries 0", _train("--num-queries", "0"), "num_queries must be in"),
    ("train imgsz 10000", _train("--imgsz", "10000"), "imgsz must be in"),
    ("train imgsz -64", _train("--imgsz", "-64"), "imgsz must be in"),
    ("train iters 0", _train("--iters", "0"), "--iters must be >= 1"),
    ("train iters -3", _train("--iters", "-3"), "--iters must be >= 1"),
    ("train epochs 0", _train("--epochs", "0"), "epochs must be in"),
    ("train eval-interval -1", _train("--eval-interval", "-1"), "eval_interval must be in"),
    ("train device cuda on CPU", _train("--device", "cuda"), "CUDA is not available"),
    ("train device tpu", _train("--device", "tpu"), "unknown device"),
    ("train cfg warmup_iters: two", _train("--cfg", "{root}/batch_two.yaml"), "warmup_iters must be an integer"),
    ("train cfg typo", _train("--cfg", "{root}/typo.yaml"), "did you mean 'batch'"),
    ("train unknown preset", _train("--cfg", "no_such_preset"), "no_such_preset"),
    ("train out-dir is a file", _train("--out-dir", "{root}/a_file"), "is an existing file"),
    ("train out-dir under a file", _train("--out-dir", "{root}/a_file/run"), "cannot be created"),
    ("train over an existing run", _train("--out-dir", "{run}", "--iters", "2"), "holds a training run"),
    ("resume with another model", _train("--out-dir", "{run}", "--resume", "--model",
                                         "mobileinst-mobilenetv2"), "trained with model="),
    ("resume with another lr", _train("--out-dir", "{run}", "--resume", "--lr", "0.5"), "trained with lr="),
    ("resume shorter than done", _train("--out-dir", "{run}", "--resume", "--iters", "1"),
     "the run is at iteration 2"),
    ("val batch 0", ["val", "--weights", "{last}", "--data", "{data}", "--batch", "0"], "--batch must be in"),
    ("val workers -1", ["val", "--weights", "{last}", "--data", "{data}", "--workers", "-1"], "--workers must be in"),
    ("val device tpu", ["val", "--weights", "{last}", "--data", "{data}", "--device", "tpu"], "unknown device"),
    ("val out is a folder", ["val", "--weights", "{last}", "--data", "{data}", "--out", "{root}"], "existing folder"),
    ("val short class_names", ["val", "--weights", "{root}/short_names.pt", "--data", "{data}"],
     "'class_names' has 1 entries"),
    ("val newer format", ["val", "--weights", "{root}/future.pt", "--data", "{data}"], "format 99 is newer"),
    ("info imgsz -64", ["info", "mobileinst-topformer-t", "--imgsz", "-64"], "--imgsz must be in"),
    ("export out under a file", ["export", "--weights", "{last}", "--out", "{root}/a_file/m.onnx"],
     "cannot be created"),
    ("export batch 0", ["export", "--weights", "{last}", "--batch", "0"], "--batch must be in"),
    ("export features coreml", ["export", "--weights", "{last}", "--part", "features", "--format",
                                "coreml"], "--part features is for the formats that run here"),
    ("export features int8", ["export", "--weights", "{last}", "--part", "features", "--int8",
                              "--calib", "{data}"], "--int8 is for the full graph"),
    ("track conf 2", ["track", "--weights", "{last}", "--source", "{frames}", "--out-dir", "{root}/t",
                      "--conf", "2"], "--conf must be in"),
    ("track conf nan", ["track", "--weights", "{last}", "--source", "{frames}", "--out-dir", "{root}/t",
                        "--conf", "nan"], "--conf must be in"),
    ("track reuse 0", ["track", "--weights", "{last}", "--source", "{frames}", "--out-dir", "{root}/t",
                       "--reuse", "0"], "--reuse must be in"),
    ("track out-dir is a file", ["track", "--weights", "{last}", "--source", "{frames}", "--out-dir",
                                 "{root}/a_file"], "is an existing file"),
    ("track device tpu", ["track", "--weights", "{last}", "--source", "{frames}", "--out-dir", "{root}/t",
                          "--device", "tpu"], "unknown device"),
    ("data synth out is a file", ["data", "synth", "--out", "{root}/a_file"], "is an existing file"),
    ("data synth n-train 0", ["data", "synth", "--out", "{root}/s", "--n-train", "0"], "--n-train must be in"),
]


@pytest.mark.parametrize("case,argv,words", ERRORS, ids=[c[0] for c in ERRORS])
def test_bad_input_is_one_clear_line(env, capsys, case, argv, words):
    before = _snapshot(env["run"])
    argv = [a.format(**env) for a in argv]
    assert main(argv) == 2, case
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert words in err, err
    assert _snapshot(env["run"]) == before, "the existing run was touched"


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock"}


VERBS = [  # every verb that reads a checkpoint
    ("predict", ["predict", "--weights", "{pt}", "--source", "{frames}", "--out-dir", "{root}/p"]),
    ("val", ["val", "--weights", "{pt}", "--data", "{data}"]),
    ("export", ["export", "--weights", "{pt}", "--out", "{root}/x.onnx"]),
    ("track", ["track", "--weights", "{pt}", "--source", "{frames}", "--out-dir", "{root}/t"]),
    ("predict onnxruntime", ["predict", "--weights", "{pt}", "--source", "{frames}", "--backend",
                             "onnxruntime", "--out-dir", "{root}/p2"]),
]


@pytest.mark.parametrize("verb,argv", VERBS, ids=[v[0] for v in VERBS])
def test_checkpoint_payload_runs_nothing(env, tmp_path, capsys, verb, argv):
    marker = tmp_path / "pwned"
    ckpt = load_checkpoint(env["last"])
    pt = tmp_path / "evil.pt"
    torch.save({**ckpt, "extra": Payload(marker)}, pt)
    assert main([a.format(pt=pt, **env) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert not marker.exists(), f"{verb} ran code from the checkpoint"
    assert "refused" in err and "evil.pt" in err and "\n" not in err, err


def test_resume_payload_runs_nothing(env, tmp_path, capsys):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    (run / "weights").mkdir(parents=True)
    torch.save({**load_checkpoint(env["last"]), "extra": Payload(marker)}, run / "weights" / "last.pt")
    argv = [a.format(**env) for a in _train("--out-dir", str(run), "--resume")]
    assert main(argv) == 2
    assert not marker.exists() and "refused" in capsys.readouterr().err


def test_checkpoints_load_with_weights_only(env):
    ckpt = torch.load(env["last"], map_location="cpu", weights_only=True)  # no allow-list at all
    assert ckpt["format_version"] == 2 and ckpt["iteration"] == 2


def test_every_cli_option_has_help():
    import argparse

    from mobileinst.cli import build_parser

    def walk(parser, path):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    yield from walk(sub, f"{path} {name}")
            elif not a.help:
                yield f"{path} {a.option_strings or a.dest}"

    assert list(walk(build_parser(), "mobileinst")) == []


def test_unreadable_training_image_is_skipped_and_counted_on_the_console(env, tmp_path, capsys):
    data_dir = tmp_path / "synth"
    shutil.copytree(env["data"].parent, data_dir)
    victim = sorted((data_dir / "train").glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a truncated JPEG
    argv = [a.format(data=data_dir / env["data"].name) for a in
            _train("--out-dir", str(tmp_path / "run"), "--iters", "3", "--eval-interval", "3")]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "1 unreadable images skipped" in out.out
    assert victim.name in out.out + out.err  # named where the user looks


def _edit_json(path: Path, edit) -> None:
    import json
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_val_json_without_annotation_ids_fails_before_training(env, tmp_path, capsys):
    data_dir = tmp_path / "synth"
    shutil.copytree(env["data"].parent, data_dir)
    val_json = next(p for p in data_dir.rglob("*.json") if "val" in p.name)
    _edit_json(val_json, lambda d: [a.pop("id") for a in d["annotations"]])
    run = tmp_path / "run"
    argv = [a.format(data=data_dir / env["data"].name) for a in _train("--out-dir", str(run), "--iters", "2")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert val_json.name in err and "'id'" in err and "\n" not in err, err
    assert not (run / "results.csv").exists()  # refused before the run started


def test_predict_skips_a_truncated_jpeg_and_names_it(env, tmp_path, capsys):
    src = tmp_path / "imgs"
    shutil.copytree(env["frames"], src)
    victim = sorted(src.glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert main(["predict", "--weights", str(env["last"]), "--source", str(src),
                 "--out-dir", str(tmp_path / "p"), "--conf", "0.0"]) == 0
    out = capsys.readouterr().out
    assert "1 unreadable skipped" in out and victim.name in out, out
