"""The options of `val`, `predict`, `track`, `export` and `benchmark` as data, like `train`'s TrainConfig.

    mobileinst predict --cfg predict.yaml --conf 0.5     # the file's options, --conf on top
    cfg = PredictConfig.from_yaml("predict.yaml", conf=0.5)

Each verb's options are one dataclass; a `--cfg FILE.yaml` holds any of its fields (unknown keys
and wrong types are one error naming the file and the key), and the options given on the command
line override the file. The ranges are checked by the jobs themselves (`predict_source`,
`validate`, `track_source`, `export.command.run`), so a YAML value and a CLI value meet the
same check.
"""
from __future__ import annotations

import argparse
import difflib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import MobileInstError
from .train.config import typed


@dataclass
class ValConfig:
    weights: str = ""
    data: str = ""
    out: str | None = None
    imgsz: int | None = None
    batch: int = 4
    workers: int = 2
    device: str = "auto"
    backend: str = "torch"
    threads: int | None = None


@dataclass
class PredictConfig:
    weights: str = ""
    source: str = ""
    out_dir: str | None = None
    conf: float = 0.3
    imgsz: int | None = None
    device: str = "auto"
    backend: str = "torch"
    threads: int | None = None
    overlays: bool = True
    exist_ok: bool = False


@dataclass
class TrackConfig:
    weights: str = ""
    source: str = ""
    out_dir: str = ""
    reuse: int = 1
    conf: float = 0.3
    patience: int = 10
    imgsz: int | None = None
    video_id: int = 1
    device: str = "auto"
    video: bool = True
    backend: str = "torch"
    threads: int | None = None
    features: str | None = None


@dataclass
class ExportConfig:
    weights: str | None = None
    model: str | None = None
    num_classes: int = 80
    format: str = "onnx"
    out: str | None = None
    imgsz: list | None = None  # S or H W; None: the default size
    dynamic: bool = False
    batch: int = 1
    simplify: bool = True
    part: str = "full"
    postprocess: bool = False
    max_det: int | None = None
    conf: float | None = None
    input_dtype: str = "uint8"
    opset: int = 18
    int8: bool = False
    calib: str | None = None
    calib_n: int = 64


@dataclass
class BenchmarkConfig:
    weights: str = ""
    data: str = ""
    formats: list | None = None  # None: every installed format
    threads: list = field(default_factory=lambda: [1])
    imgsz: int | None = None
    runs: int = 30
    warmup: int = 5
    conf: float = 0.3
    int8: bool = False
    calib: str | None = None
    calib_n: int = 64
    out: str | None = None


VERB_CONFIGS = {"val": ValConfig, "predict": PredictConfig, "track": TrackConfig, "export": ExportConfig,
                "benchmark": BenchmarkConfig}


def from_dict(cls: type, values: dict[str, Any], source: str = "options") -> Any:
    """cls(**values), each value of its field's type; MobileInstError naming an unknown key (with
    the closest known one) or a wrong type."""
    known = {f.name for f in fields(cls)}
    for key in sorted(set(values) - known):
        close = difflib.get_close_matches(key, known, n=1)
        raise MobileInstError(f"{source}: unknown option {key!r}"
                              + (f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"))
    types = {f.name: str(f.type) for f in fields(cls)}
    return cls(**{k: typed(source, k, v, types[k]) for k, v in values.items()})


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of options; MobileInstError naming the file when it is not one."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise MobileInstError(f"{path}: cannot read the options file (--cfg): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(values, dict):
        raise MobileInstError(f"{path}: an options file (--cfg) must be a mapping of options")
    return values


# -- the CLI side ----------------------------------------------------------------------------------
class Unset:
    """An argparse default the user did not give: the --cfg file's value wins over it."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def add_cfg_option(parser: argparse.ArgumentParser, verb: str) -> None:
    """--cfg FILE.yaml for `verb`, and every option of its dataclass marked so that only the
    options given on the command line override the file. Options argparse would require may
    come from the file instead (checked by `config_from_args`)."""
    cls = VERB_CONFIGS[verb]
    names = {f.name for f in fields(cls)}
    required, choices, one_of = [], {}, []
    for action in parser._actions:  # noqa: SLF001 - argparse keeps its actions here
        if action.dest in names:
            action.default = Unset(action.default)
            if action.required:
                action.required = False
                required.append(action.dest)
            if action.choices:
                choices[action.dest] = list(action.choices)
    for group in parser._mutually_exclusive_groups:  # noqa: SLF001 - e.g. export's --weights | --model
        if group.required:
            group.required = False
            one_of.append([a.dest for a in group._group_actions])  # noqa: SLF001
    parser.add_argument("--cfg", default=None,
                        help=f"a YAML file of {verb} options (any of: {', '.join(sorted(names))}); "
                             "options given on the command line override it")
    parser.set_defaults(_required=required, _choices=choices, _one_of=one_of, _verb=verb)


def config_from_args(args: argparse.Namespace) -> Any:
    """The verb's dataclass from parsed arguments: the --cfg file, then the given options."""
    cls = VERB_CONFIGS[args._verb]
    names = [f.name for f in fields(cls)]
    values = read_yaml(args.cfg) if getattr(args, "cfg", None) else {}
    cfg = from_dict(cls, values, source=str(args.cfg)) if values else cls()
    given = {n: getattr(args, n) for n in names if not isinstance(getattr(args, n), Unset)}
    merged = {**asdict(cfg), **{n: getattr(args, n).value for n in names
                                if isinstance(getattr(args, n), Unset) and n not in values}, **given}
    for name in args._required:
        if merged.get(name) in (None, ""):
            raise MobileInstError(f"{args._verb} needs --{name.replace('_', '-')} (on the command line "
                                  f"or as `{name}:` in the --cfg file)")
    for group in args._one_of:
        if sum(merged.get(n) not in (None, "") for n in group) != 1:
            raise MobileInstError(f"{args._verb} needs exactly one of "
                                  f"{' / '.join('--' + n.replace('_', '-') for n in group)}")
    for name, allowed in args._choices.items():
        if merged[name] not in allowed:
            close = difflib.get_close_matches(str(merged[name]), [str(c) for c in allowed], n=1)
            raise MobileInstError(f"{args.cfg}: {name} must be one of {', '.join(map(str, allowed))}, "
                                  f"got {merged[name]!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    return cls(**merged)


def as_namespace(cfg: Any) -> argparse.Namespace:
    """A config as the argparse.Namespace the older job code reads."""
    return argparse.Namespace(**asdict(cfg))
