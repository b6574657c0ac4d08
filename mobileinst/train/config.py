"""Training configuration: one dataclass, filled from a YAML preset and/or CLI options.

Defaults follow the MobileInst/SparseInst recipe (the MobileInst public reproduction,
Ambitious-idiot/MobileInst-Reproduction `configs/Base-MobileInst.yaml`; hustvl/SparseInst
`configs/Base-SparseInst.yaml` and detectron2's `WarmupMultiStepLR`): AdamW lr 5e-5, weight decay
0.05, backbone lr x 0.5, 1000 warm-up iterations, lr x 0.1 at 210/270 and 250/270 of the run, short
side 416..640, long side <= 853.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import MobileInstError
from .schedule import SCHEDULES


CLASS_LOSSES = ("focal", "ia_bce")  # SparseInst's sigmoid focal loss; LW-DETR / RF-DETR's IoU-aware BCE
# `loss_weights` keys: the weighted terms of MobileInstCriterion (loss_cls, loss_dice, loss_mask, loss_obj)
LOSS_TERMS = ("cls", "dice", "mask", "obj")
MASK_LOSS_STRIDES = (1, 2, 4)  # the mask losses' grid: 4 = the predicted masks' own, 2 and 1 upsampled
PRESETS = Path(__file__).resolve().parent.parent / "configs"  # the package's YAML presets


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def preset_path(path: str | Path) -> Path:
    """A YAML path as given, or mobileinst/configs/<name>.yaml for a bare preset name."""
    p = Path(path)
    if not p.exists() and p.suffix == "" and len(p.parts) == 1 and (PRESETS / f"{p}.yaml").is_file():
        return PRESETS / f"{p}.yaml"
    return p


@dataclass
class TrainConfig:
    model: str = "mobileinst-topformer-t"
    data: str = ""  # DATA yaml (train/val json + image folders)
    out_dir: str = ""  # run folder; empty -> runs/train/expN
    iters: int = 0  # total iterations; 0 -> epochs x iterations per epoch
    time: float = 0.0  # a wall-clock budget in minutes (replaces iters/epochs; lr schedule fitted to it)
    epochs: int = 12
    imgsz: int = 640  # largest training short side, and the evaluation short side
    batch: int = 16  # images per iteration, over all workers
    workers: int = 2  # DataLoader processes per worker
    seed: int = 0
    lr: float = 5e-5
    weight_decay: float = 0.05
    backbone_lr_mult: float = 0.5
    warmup_iters: int = 1000  # capped at a quarter of the run
    schedule: str = "step"  # lr decay: 'step' (x0.1 at 210/270, 250/270: the paper's) or 'linear' (to 0)
    grad_clip: float = 0.0  # max gradient norm; 0 = off (the recipe's default)
    # mixed precision: bf16 autocast on CPU, fp16 + GradScaler on CUDA; 'auto': on CUDA, and on
    # CPUs with native bf16 (AVX512-BF16 or AMX), where it is faster (train/precision.py)
    amp: bool | str = False
    depthwise_fp32: bool = True  # under CPU bf16 autocast, depthwise convolutions in fp32 (faster there)
    channels_last: bool = True  # NHWC weights and batches: ~1.3x faster CPU steps here (docs/performance.md)
    freeze_backbone_bn: bool = False  # backbone BatchNorm: ImageNet statistics and affine kept (small batches)
    fold_frozen_bn: bool = True  # frozen BNs computed inside their convolutions in training steps (train/fold_bn.py)
    ema: bool = False
    ema_decay: float = 0.9999
    ema_tau: int = 2000  # EMA ramp: decay x (1 - exp(-updates / ema_tau))
    freeze_at: int = 0  # backbone levels fixed and run without gradient: 1 stride 2, 2 up to stride 4, ...
    log_interval: int = 50  # iterations between loss rows in results.csv
    crop: bool = False  # SparseInst's "_aug" random crop
    copy_paste: float = 0.0  # probability of pasting another image's instances (Simple Copy-Paste)
    color_jitter: float = 0.0  # brightness/contrast/saturation factors in [1 - c, 1 + c]; 0 = off
    cls_loss: str = "focal"  # 'focal' (SparseInst) or 'ia_bce' (IoU-aware BCE, LW-DETR / RF-DETR)
    mask_loss_stride: int = 4  # grid of the mask losses: 4 = the predicted masks' (SparseInst), 2 or 1 upsampled
    # weights of the criterion's terms over its defaults (SparseInst's cls 2, dice 2, mask 5, obj 1),
    # e.g. {dice: 5} (Mask2Former / FastInst weigh dice 5); YAML only
    loss_weights: dict = field(default_factory=dict)
    aspect_grouping: bool = True  # batches of landscape or of portrait images only (train/sampler.py)
    eval_interval: int = 0  # iterations between evaluations; 0 -> once per epoch
    save_interval: int = 0  # iterations between last.pt saves; 0 -> eval_interval
    backbone_weights: str = ""  # 'imagenet' / 'ssdlite' (installed files, models/pretrained.py) or a checkpoint path
    device: str = "auto"  # auto | cpu | cuda
    num_queries: int = 100
    model_overrides: dict = field(default_factory=dict)  # other ModelConfig fields, e.g. {local_pool: 4}
    exist_ok: bool = False  # a fresh run may take over a folder that holds a run (its files removed)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """A preset file (or the name of a built-in one: `coco`, `demo`, ...), with non-None
        overrides applied on top."""
        path = preset_path(path)
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise MobileInstError(f"{path}: cannot read the training config: {e}") from None
        if not isinstance(values, dict):
            raise MobileInstError(f"{path}: a training config must be a mapping of options")
        return cls.from_dict({**values, **{k: v for k, v in overrides.items() if v is not None}},
                             source=str(path))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "options") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        for key in sorted(set(values) - known):
            close = difflib.get_close_matches(key, known, n=1)
            raise MobileInstError(f"{source}: unknown training option {key!r}"
                                  + (f"; did you mean {close[0]!r}?" if close else
                                     f"; known: {', '.join(sorted(known))}"))
        cfg = cls(**{k: typed(source, k, v, cls.__dataclass_fields__[k].type) for k, v in values.items()})
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "options") -> None:
        """Ranges of every numeric option; MobileInstError naming the option before any work."""
        for name, low, high in LIMITS:
            v = getattr(self, name)
            if not (math.isfinite(v) and low <= v <= high):
                raise MobileInstError(f"{source}: {name} must be in [{low}, {high}], got {v!r}")
        for name in ("lr", "ema_decay"):
            if getattr(self, name) <= 0:
                raise MobileInstError(f"{source}: {name} must be > 0, got {getattr(self, name)!r}")
        for name, allowed in (("cls_loss", CLASS_LOSSES), ("mask_loss_stride", MASK_LOSS_STRIDES)):
            if getattr(self, name) not in allowed:
                raise MobileInstError(f"{source}: {name} must be one of {', '.join(map(str, allowed))}, "
                                      f"got {getattr(self, name)!r}")
        for key, value in self.loss_weights.items():
            if key not in LOSS_TERMS:
                raise MobileInstError(f"{source}: loss_weights: unknown term {key!r}; "
                                      f"known: {', '.join(LOSS_TERMS)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not (math.isfinite(value) and 0 <= value <= 100):
                raise MobileInstError(f"{source}: loss_weights: {key} must be a number in [0, 100], "
                                      f"got {value!r}")
        if isinstance(self.amp, str) and self.amp != "auto":
            raise MobileInstError(f"{source}: amp must be true, false or auto, got {self.amp!r}")
        if self.schedule not in SCHEDULES:
            raise MobileInstError(f"{source}: schedule must be one of {', '.join(SCHEDULES)}, "
                                  f"got {self.schedule!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# (option, lowest, highest) accepted. imgsz: the network needs 32 px (stride 32); above 4096 a
# single image's activations outgrow any machine this targets (10000 px ran out after a minute).
LIMITS = [("iters", 0, 10**9), ("time", 0, 10**6), ("ema_tau", 1, 10**9), ("freeze_at", 0, 5),
          ("log_interval", 1, 10**9), ("epochs", 1, 10**6), ("imgsz", 32, 4096), ("batch", 1, 4096),
          ("workers", 0, 256), ("lr", 0, 1), ("weight_decay", 0, 1), ("backbone_lr_mult", 0, 10),
          ("warmup_iters", 0, 10**9), ("grad_clip", 0, 1e6), ("ema_decay", 0, 1),
          ("eval_interval", 0, 10**9), ("save_interval", 0, 10**9), ("num_queries", 1, 1000),
          ("seed", 0, 2**32 - 1), ("copy_paste", 0, 1), ("color_jitter", 0, 1)]
_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,),
          "list": (list,)}
_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "dict": "a mapping", "list": "a list"}


def typed(source: str, key: str, value: Any, type_name: str) -> Any:
    """value if it has the field's type, or one of them for a union (an int where a float is due
    becomes a float; None where the type admits None), else a MobileInstError naming the option
    (YAML `batch: two`, `amp: "yes"`)."""
    parts = str(type_name).split(" | ")
    if value is None and "None" in parts:
        return None
    for base in (p for p in parts if p != "None"):
        ok = _TYPES[base]
        if isinstance(value, ok) and not (isinstance(value, bool) and bool not in ok):
            return float(value) if base == "float" else value
    names = " or ".join([_TYPE_NAMES[p] for p in parts if p != "None"] + ["null"] * ("None" in parts))
    raise MobileInstError(f"{source}: {key} must be {names}, got {value!r}")


# What `--resume` may change: how long the run goes on and how it is watched, not what it learns.
RESUME_MAY_CHANGE = {"iters", "epochs", "time", "eval_interval", "save_interval", "log_interval",
                     "workers", "device", "out_dir", "exist_ok"}


def resumed_config(saved: dict[str, Any], given: TrainConfig, source: str) -> TrainConfig:
    """The configuration of a resumed run: the checkpoint's own, with the user's changes to
    RESUME_MAY_CHANGE applied (a longer --iters/--epochs extends the schedule). Any other option
    set to a different value, a different --model or --data included, is refused."""
    saved = {**saved, "iters": saved.get("iters") or 0}
    default = TrainConfig()
    for f in fields(TrainConfig):
        new, old = getattr(given, f.name), saved.get(f.name, getattr(default, f.name))
        if new == getattr(default, f.name) or new == old or f.name in RESUME_MAY_CHANGE:
            continue
        if f.name == "data" and _same_file(new, old):
            continue
        raise MobileInstError(f"{source}: the run was trained with {f.name}={old!r}, not {new!r}; "
                              "--resume continues a run as it was (it may change only "
                              f"{', '.join(sorted(RESUME_MAY_CHANGE))}); start a new run instead")
    changes = {k: getattr(given, k) for k in RESUME_MAY_CHANGE
               if getattr(given, k) != getattr(default, k)}
    return TrainConfig.from_dict({**saved, **changes}, source=source)


def _same_file(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    try:
        return pa.resolve() == pb.resolve() or pa.read_bytes() == pb.read_bytes()
    except OSError:
        return False
