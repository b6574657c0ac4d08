"""Per-verb options as data: every CLI option of val/predict/track/export/benchmark is a dataclass field, a
--cfg YAML sets any of them, options given on the command line win, bad files are one line."""
from __future__ import annotations

from dataclasses import fields

import pytest

from mobileinst.cli import build_parser, main
from mobileinst.errors import MobileInstError
from mobileinst.verb_config import (VERB_CONFIGS, ExportConfig, PredictConfig, TrackConfig,
                                    ValConfig, config_from_args)


def subparser(verb: str):
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices[verb]


@pytest.mark.parametrize("verb", sorted(VERB_CONFIGS))
def test_every_option_is_a_field_and_back(verb):
    dests = {a.dest for a in subparser(verb)._actions} - {"help", "cfg"}
    assert dests == {f.name for f in fields(VERB_CONFIGS[verb])}


@pytest.mark.parametrize("verb", sorted(VERB_CONFIGS))
def test_defaults_equal_the_dataclass_defaults(verb):
    """Without --cfg the parsed options give the dataclass's own defaults (for what is not given)."""
    required = {"val": ["--weights", "w.pt", "--data", "d.yaml"],
                "predict": ["--weights", "w.pt", "--source", "imgs"],
                "track": ["--weights", "w.pt", "--source", "v.mp4", "--out-dir", "o"],
                "export": ["--model", "mobileinst-topformer-t"],
                "benchmark": ["--weights", "w.pt", "--data", "d.yaml"]}[verb]
    cfg = config_from_args(build_parser().parse_args([verb, *required]))
    default = VERB_CONFIGS[verb]()
    given = {a.lstrip("-").replace("-", "_") for a in required[::2]}
    for f in fields(cfg):
        if f.name not in given:
            assert getattr(cfg, f.name) == getattr(default, f.name), f.name


def parse(tmp_path, argv: list[str], text: str | None = None):
    if text is not None:
        path = tmp_path / "opts.yaml"
        path.write_text(text)
        argv = [*argv, "--cfg", str(path)]
    return config_from_args(build_parser().parse_args(argv))


def test_yaml_sets_options_and_the_command_line_wins(tmp_path):
    cfg = parse(tmp_path, ["predict", "--source", "imgs", "--conf", "0.3"],
                "weights: w.pt\nconf: 0.7\nimgsz: 320\noverlays: false\nbackend: onnxruntime\n")
    assert cfg == PredictConfig(weights="w.pt", source="imgs", conf=0.3, imgsz=320, overlays=False,
                                backend="onnxruntime")  # --conf 0.3 given: it wins, even at its default
    cfg = parse(tmp_path, ["val", "--data", "d.yaml"],
                "weights: w.pt\nbatch: 8\nthreads: 2\n")
    assert cfg == ValConfig(weights="w.pt", data="d.yaml", batch=8, threads=2)
    cfg = parse(tmp_path, ["track", "--source", "v.mp4", "--out-dir", "o", "--video"],
                "weights: w.pt\nreuse: 3\nvideo: false\n")
    assert cfg == TrackConfig(weights="w.pt", source="v.mp4", out_dir="o", reuse=3, video=True)
    cfg = parse(tmp_path, ["export", "--format", "onnx"], "weights: w.pt\nimgsz: [256, 320]\ndynamic: true\n")
    assert cfg == ExportConfig(weights="w.pt", imgsz=[256, 320], dynamic=True)


@pytest.mark.parametrize("argv,text,error", [
    (["predict", "--source", "s"], "weights: w.pt\nconff: 0.5\n", r"unknown option 'conff'; did you mean 'conf'\?"),
    (["predict", "--source", "s"], "weights: w.pt\nconf: high\n", "conf must be a number, got 'high'"),
    (["predict", "--source", "s"], "weights: w.pt\noverlays: 'no'\n", "overlays must be true or false"),
    (["predict", "--source", "s"], "conf: 0.5\n", r"predict needs --weights \(on the command line or as `weights:`"),
    (["predict", "--source", "s"], "- a\n- b\n", "must be a mapping of options"),
    (["predict", "--source", "s"], "weights: [unclosed\n", "cannot read the options file"),
    (["val", "--data", "d"], "weights: w.pt\nbackend: tensorrt\n", "backend must be one of torch, onnxruntime"),
    (["export"], "weights: w.pt\nmodel: mobileinst-topformer-t\n", "exactly one of --weights / --model"),
    (["export"], "format: onx\nmodel: m\n", r"did you mean 'onnx'\?"),
    (["track", "--source", "v", "--out-dir", "o"], "weights: w.pt\nimgsz: 1.5\n", "imgsz must be an integer or null"),
])
def test_bad_options_files_are_one_line(tmp_path, argv, text, error):
    with pytest.raises(MobileInstError, match=error) as e:
        parse(tmp_path, argv, text)
    assert "\n" not in str(e.value)


def test_cli_reports_a_bad_options_file_and_a_missing_one(tmp_path, capsys):
    bad = tmp_path / "p.yaml"
    bad.write_text("weights: w.pt\nbogus: 1\n")
    assert main(["predict", "--source", str(tmp_path), "--cfg", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown option 'bogus'" in err and len(err.splitlines()) == 1
    assert main(["val", "--data", "d.yaml", "--weights", "w.pt", "--cfg", str(tmp_path / "none.yaml")]) == 2
    assert "cannot read the options file" in capsys.readouterr().err
